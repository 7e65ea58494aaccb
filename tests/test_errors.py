"""Every bad input gets a clear error that names the thing, the reason and the fix; nothing is changed."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loramerge as lm
from conftest import CASES, make_base, save_adapter, tiny_gpt2, tiny_llama

LLAMA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_adapter(tiny_llama().eval(), LLAMA, tmp_path_factory.mktemp("ad") / "adapter")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: object) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_missing_directory_and_files(tmp_path: Path, llama_adapter: Path) -> None:
    with pytest.raises(lm.AdapterNotFoundError, match="does not exist") as info:
        lm.load_adapter(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(lm.AdapterNotFoundError, match="adapter_config.json"):
        lm.load_adapter(empty)
    no_weights = _copy(llama_adapter, tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(lm.AdapterNotFoundError, match="adapter_model.safetensors"):
        lm.load_adapter(no_weights)


def test_bad_config(tmp_path: Path, llama_adapter: Path) -> None:
    bad_json = _copy(llama_adapter, tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(lm.AdapterConfigError, match="not valid JSON"):
        lm.load_adapter(bad_json)
    bad_values = _edit_config(_copy(llama_adapter, tmp_path / "bad_values"), r=0, bias="some", use_rslora="yes")
    with pytest.raises(lm.AdapterConfigError) as info:
        lm.load_adapter(bad_values)
    message = str(info.value)
    assert "'r' must be a positive integer" in message and "'bias'" in message and "'use_rslora'" in message
    wrong_rank = _edit_config(_copy(llama_adapter, tmp_path / "wrong_rank"), rank_pattern={"v_proj": 2})
    with pytest.raises(lm.AdapterConfigError, match="v_proj: the config gives rank 2 but the tensors have rank 4"):
        lm.load_adapter(wrong_rank)


def test_truncated_safetensors(tmp_path: Path, llama_adapter: Path) -> None:
    broken = _copy(llama_adapter, tmp_path / "broken")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(lm.AdapterConfigError, match="truncated or corrupt"):
        lm.load_adapter(broken)


@pytest.mark.parametrize(
    ("setting", "value", "match"),
    [
        ("layer_replication", [[0, 1], [0, 1]], "layer replication"),
        ("peft_type", "IA3", "LoRA adapters only"),
        ("init_lora_weights", "pissa", "rewrites the base weights"),
        ("use_qalora", True, "QA-LoRA"),
    ],
)
def test_unsupported_features(tmp_path: Path, llama_adapter: Path, setting: str, value: object, match: str) -> None:
    path = _edit_config(_copy(llama_adapter, tmp_path / "a"), **{setting: value})
    with pytest.raises(lm.UnsupportedAdapterError, match=match):
        lm.load_adapter(path)


def test_trainable_token_indices_without_rows_is_an_inconsistent_adapter(tmp_path: Path, llama_adapter: Path) -> None:
    path = _edit_config(_copy(llama_adapter, tmp_path / "a"), trainable_token_indices=[1, 2])
    with pytest.raises(lm.AdapterConfigError, match="trainable_token_indices is set but the file holds no"):
        lm.load_adapter(path)


def test_pickle_refused_unless_allowed(tmp_path: Path, llama_adapter: Path) -> None:
    legacy = _copy(llama_adapter, tmp_path / "legacy")
    tensors = load_file(str(legacy / "adapter_model.safetensors"))
    (legacy / "adapter_model.safetensors").unlink()
    torch.save(tensors, legacy / "adapter_model.bin")
    with pytest.raises(lm.UnsafeFormatError, match="allow_pickle=True"):
        lm.load_adapter(legacy)
    loaded = lm.load_adapter(legacy, allow_pickle=True)
    reference = lm.load_adapter(llama_adapter)
    assert set(loaded.modules) == set(reference.modules)
    for name, m in reference.modules.items():
        assert torch.equal(loaded.modules[name].update.lora_B, m.update.lora_B)


def test_load_base_pickle_and_missing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    model.save_pretrained(tmp_path / "safe")
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False) if _supports_pickle_save(
        model
    ) else _pickle_copy(tmp_path / "safe", tmp_path / "pickled")
    with pytest.raises(lm.UnsafeFormatError, match="pytorch_model.bin"):
        lm.load_base(tmp_path / "pickled")
    loaded = lm.load_base(tmp_path / "pickled", allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(lm.AdapterNotFoundError, match="config.json"):
        lm.load_base(tmp_path)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tmp_path / "safe" / "config.json", no_weights / "config.json")
    with pytest.raises(lm.AdapterNotFoundError, match="weights are missing"):
        lm.load_base(no_weights)
    assert lm.load_base(tmp_path / "safe", dtype="bf16").dtype == torch.bfloat16


def _supports_pickle_save(model: torch.nn.Module) -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(model.save_pretrained).parameters


def _pickle_copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")


def test_adapter_for_another_architecture(llama_adapter: Path) -> None:
    gpt2 = tiny_gpt2()
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(lm.AdapterMismatchError) as info:
        lm.attach(gpt2, lm.load_adapter(llama_adapter))
    message = str(info.value)
    assert "another architecture" in message
    names = [line.split(":")[0].strip(" -") for line in message.splitlines() if line.startswith("  - ")]
    assert names == sorted(names) and len(names) == 4
    assert not any("lora" in n for n, _ in gpt2.named_modules()), "nothing may be attached on failure"
    assert all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())


def test_shape_mismatch_lists_every_module_sorted(llama_adapter: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(lm.AdapterMismatchError) as info:
        lm.attach(wider, lm.load_adapter(llama_adapter))
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 4 and lines == sorted(lines)
    assert (
        "model.layers.0.self_attn.q_proj: expected A (4, 48) and B (48, 4), found A (4, 32) and B (32, 4)" in lines[0]
    )


def test_missing_target_modules(llama_adapter: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    shallow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(lm.AdapterMismatchError) as info:
        lm.attach(shallow, lm.load_adapter(llama_adapter))
    assert "model.layers.1.self_attn.q_proj: no such module in the model" in str(info.value)
    assert "model.layers.0" not in str(info.value)


def test_attach_matches_peft_from_pretrained(llama_adapter: Path) -> None:
    from peft import PeftModel

    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = torch.randint(0, 96, (2, 8))
    ours = lm.attach(copy.deepcopy(base), lm.load_adapter(llama_adapter))
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(llama_adapter))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
        assert not torch.equal(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    with pytest.raises(lm.AdapterMismatchError, match="already attached"):
        lm.attach(ours, lm.load_adapter(llama_adapter))


def test_merge_and_unmerge_argument_errors(llama_adapter: Path) -> None:
    base = tiny_llama()
    with pytest.raises(lm.AdapterMismatchError, match="needs a PeftModel or adapters"):
        lm.merge(base)
    peft_model = lm.attach(copy.deepcopy(base), lm.load_adapter(llama_adapter))
    with pytest.raises(lm.AdapterMismatchError, match="no adapter named"):
        lm.merge(peft_model, adapter_names=["other"])
    with pytest.raises(lm.AdapterMismatchError, match="plain merged model"):
        lm.unmerge(peft_model, lm.load_adapter(llama_adapter))


def test_unmerge_impossible_without_norms_or_originals(tmp_path: Path) -> None:
    for case_id, match in [("llama-dora", "dora_norms="), ("bert-seqcls-modules-to-save", "originals=")]:
        case = next(c for c in CASES if c.id == case_id)
        base = make_base(case, torch.float32)
        adapter = lm.load_adapter(save_adapter(base, case.lora, tmp_path / case_id, perturb=case.perturb))
        merged = lm.merge(copy.deepcopy(base), adapter).model
        before = {k: v.clone() for k, v in merged.state_dict().items()}
        with pytest.raises(lm.UnmergeImpossibleError, match=match) as info:
            lm.unmerge(merged, adapter)
        assert "nothing was changed" in str(info.value)
        assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())


def test_merge_subset_of_adapters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    a = lm.load_adapter(save_adapter(base, LLAMA, tmp_path / "a"))
    b = lm.load_adapter(
        save_adapter(base, {"r": 2, "lora_alpha": 2, "target_modules": ["down_proj"]}, tmp_path / "b", seed=5)
    )
    model = lm.attach(lm.attach(copy.deepcopy(base), a, name="a"), b, name="b")
    result = lm.merge(model, adapter_names=["b"])
    assert result.adapters == ("b",)
    merged = result.model
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(merged.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
