"""A checkpoint stores tensors, not layers: the layout of a square weight comes from the layer class
of the model the config builds, never from the adapter's fan_in_fan_out flag or a shape guess."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import loramerge as lm
from loramerge.numerics.tolerance import relative_errors
from test_modes import ARCHS


def _gpt2_with_mixed_targets(tmp: Path) -> tuple[torch.nn.Module, object, Path, Path]:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False)
    base = GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "lm_head"], init_lora_weights=False),
        )
        pm.save_pretrained(tmp / "adapter")
    return base, pm.eval(), tmp / "base", tmp / "adapter"


def test_square_conv1d_weights_are_merged_in_their_layer_layout(tmp_path: Path) -> None:
    base, pm, base_dir, adapter_dir = _gpt2_with_mixed_targets(tmp_path)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is False, "PEFT saved the flag of the last target (a Linear): the trap"
    report = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert report.passed
    merged = lm.load_base(tmp_path / "merged").eval()
    probes = lm.make_probes(merged)
    with torch.no_grad():
        err = relative_errors(merged(**probes).logits.double(), pm(**probes).logits.double())[0]
    assert err < 1e-5, f"the merged checkpoint is {err:.3g} away from adapter mode"
    in_memory = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter_dir)).model.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, in_memory[name]), name


def test_a_square_weight_of_a_model_transformers_cannot_build_is_refused(tmp_path: Path) -> None:
    _, _, base_dir, adapter_dir = _gpt2_with_mixed_targets(tmp_path)
    config = json.loads((base_dir / "config.json").read_text())
    config["model_type"] = "custom-gpt2-with-remote-code"
    config["architectures"] = ["CustomGPT2"]
    (base_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(lm.AdapterMismatchError, match="square.*would be a guess"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("config", "free"),
    [
        ({"model_type": "llama"}, True),
        ({"model_type": "qwen2"}, True),
        ({"model_type": "gpt2"}, False),  # its modeling file builds Conv1D
        ({"model_type": "decision_transformer"}, False),  # imports GPT-2's blocks: found transitively
        ({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}, False),  # custom code
        ({"model_type": "llava", "text_config": {"model_type": "gpt2"}}, False),  # a sub-model with Conv1D
        ({"model_type": "../../etc"}, False),  # a name from a file is not a path
        ({"model_type": "no_such_model"}, False),
        ({}, False),
    ],
)
def test_conv1d_free_reads_transformers_modeling_code(tmp_path: Path, config: dict[str, object], free: bool) -> None:
    from loramerge.plan.skeleton import conv1d_free

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert conv1d_free(tmp_path) is free


def test_a_square_linear_layout_needs_no_modeling_import(tmp_path: Path) -> None:
    """Llama's modeling code has no Conv1D: a checkpoint merge without verification decides its square
    layouts without importing transformers' modeling machinery (2-3 s), and merges them right."""
    import subprocess
    import sys

    from conftest import save_adapter, tiny_llama

    torch.manual_seed(0)
    base = tiny_llama().eval()
    base.save_pretrained(tmp_path / "base")

    adapter = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"]}, tmp_path / "a")
    script = (
        "import sys, loramerge as lm; "
        f"lm.merge_checkpoint({str(tmp_path / 'base')!r}, {str(adapter)!r}, {str(tmp_path / 'm')!r}, "
        "progress=False, verify=False); print('transformers.modeling_utils' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert lm.verify_checkpoint(tmp_path / "base", adapter, tmp_path / "m", progress=False).passed


def _bart() -> torch.nn.Module:
    return ARCHS["bart"][0]()


def _t5() -> torch.nn.Module:
    return ARCHS["t5"][0]()


@pytest.mark.filterwarnings("ignore::loramerge.LoraMergeWarning")
@pytest.mark.parametrize(
    ("build", "targets"), [(_bart, ["shared", "q_proj"]), (_t5, ["shared", "q"])], ids=["bart", "t5"]
)
def test_a_delta_on_a_tied_shared_embedding_leaves_its_ties_alone(
    tmp_path: Path, build: object, targets: list[str]
) -> None:
    """T5 and BART store one ``shared`` tensor for both embed_tokens and lm_head. Adapter mode adds
    the delta to ``shared`` only; the merged checkpoint writes the others with the original values."""
    torch.manual_seed(0)
    base = build().eval()  # type: ignore[operator]
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        )
        pm.save_pretrained(tmp_path / "adapter")
    pm.eval()
    report = lm.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert report.passed
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = lm.load_base(tmp_path / "merged").eval()
    probes = lm.make_probes(merged)
    with torch.no_grad():
        err = relative_errors(merged(**probes).logits.double(), pm(**probes).logits.double())[0]
    assert err < 1e-5, f"the merged checkpoint is {err:.3g} away from adapter mode"
    in_memory = lm.merge(copy.deepcopy(base), lm.load_adapter(tmp_path / "adapter")).model.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, in_memory[name]), name


@pytest.mark.filterwarnings("ignore::loramerge.LoraMergeWarning")
def test_modules_to_save_on_a_tied_head_is_written_as_its_own_tensor(tmp_path: Path) -> None:
    """A tied checkpoint stores only the input embedding; ``modules_to_save=["lm_head"]`` trains a
    copy of the head, which adapter mode uses instead (the embedding stays as it was)."""
    from conftest import save_adapter, tiny_llama

    torch.manual_seed(0)
    base = tiny_llama(tie=True).eval()
    base.save_pretrained(tmp_path / "base")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    adapter = save_adapter(base, lora, tmp_path / "adapter", perturb=("lm_head",))
    report = lm.merge_checkpoint(tmp_path / "base", adapter, tmp_path / "merged", progress=False)
    assert report.passed and "lm_head.weight" in report.changed
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = lm.load_base(tmp_path / "merged").eval()
        from peft import PeftModel

        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    probes = lm.make_probes(merged)
    with torch.no_grad():
        err = relative_errors(merged(**probes).logits.double(), pm(**probes).logits.double())[0]
    assert err < 1e-5, f"the merged checkpoint is {err:.3g} away from adapter mode"
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    in_memory = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter)).model.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, in_memory[name]), name


def test_an_adapter_name_that_fits_several_stored_tensors_is_refused_with_the_list(tmp_path: Path) -> None:
    """A name is resolved by a unique suffix at most: when several stored tensors end like it, the
    merge is refused and the error lists them, instead of picking one."""
    from safetensors.torch import load_file, save_file

    from conftest import save_adapter, tiny_llama

    torch.manual_seed(0)
    base = tiny_llama().eval()
    base.save_pretrained(tmp_path / "base")
    shard = tmp_path / "base/model.safetensors"
    tensors = load_file(shard)
    tensors["vision.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    adapter = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, tmp_path / "a")
    file = adapter / "adapter_model.safetensors"
    factors = {
        k.replace("base_model.model.model.layers.0.", "base_model.model.layers.0."): v
        for k, v in load_file(file).items()
    }
    save_file(factors, file, metadata={"format": "pt"})
    wanted = "['model.layers.0.self_attn.q_proj.weight', 'vision.layers.0.self_attn.q_proj.weight']"
    with pytest.raises(lm.AdapterMismatchError, match=re.escape(f"ambiguous: {wanted}")):
        lm.merge_checkpoint(tmp_path / "base", adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
