"""LoRA variants whose layer holds more than A, B and a scale (KaSA, BD-LoRA, DoRA on embeddings
and convolutions), merged from adapter files: on checkpoints and in memory, through PEFT's own layer
(built with the stored base weight widened, rounded once), judged by PEFT's layer in adapter mode.

For each variant (BD-LoRA also with a LoRA bias), in fp32 and bf16: the checkpoint merge passes its verification, every variant
layer is judged by PEFT's layer (not one per family), the merged model computes what PEFT's adapter
mode computes, the checkpoint equals the in-memory merge bit for bit, and the unmerge needs the base
weights (a receipt or ``originals=``) and then restores them byte for byte. Negative controls: a
PEFT merge that is off by 1 % fails and names the layer, and so does a LoRA bias off by 1 % of its update; ``verify``/``verify_checkpoint`` reject a
variant weight left unmerged.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import BdLoraConfig, KasaConfig
from safetensors.torch import load_file, save_file
from torch import nn

import loramerge as lm
import loramerge.engine.checkpoint_steps as steps  # where the step looks PEFT's merge up
from conftest import save_adapter, tiny_llama, tiny_qwen2, tiny_vit
from loramerge.errors import AdapterConfigError, UnmergeImpossibleError, VerificationError

ATTN = ["q_proj", "v_proj", "down_proj"]
PIXELS = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))}
TOKENS = {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))}

# id -> (base, LoRA settings, probe inputs, the modules only PEFT's layer merges)
VARIANTS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], dict[str, torch.Tensor], str]] = {
    "kasa": (tiny_llama, {"target_modules": ATTN, "kasa_config": KasaConfig()}, TOKENS, "KaSA"),
    "bdlora": (
        tiny_llama,
        {
            "target_modules": ["q_proj", "o_proj"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2),
        },
        TOKENS,
        "BD-LoRA",
    ),
    "bdlora-lora-bias": (  # a LoRA bias too: Qwen2's q/k projections have biases
        tiny_qwen2,
        {
            "target_modules": ["q_proj", "k_proj"],
            # (block-diagonal B has no bias: PEFT cannot merge a LoRA bias there, and says so)
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["q_proj", "k_proj"], target_modules_bd_b=[], nblocks=2),
            "lora_bias": True,
        },
        TOKENS,
        "BD-LoRA",
    ),
    "dora-embedding": (
        tiny_llama,
        {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True},
        TOKENS,
        "DoRA on an embedding",
    ),
    "dora-conv2d": (
        tiny_vit,
        {"target_modules": ["projection", "q_proj"], "use_dora": True},
        PIXELS,
        "DoRA on a convolution",
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _setup(variant: str, dtype: torch.dtype, tmp: Path) -> tuple[nn.Module, Path, Path, lm.Adapter]:
    build, lora, _, _ = VARIANTS[variant]
    torch.manual_seed(0)
    base = build().to(dtype).eval()
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    adapter_dir = save_adapter(base, {"r": 4, "lora_alpha": 8, **lora}, tmp / "adapter")
    return base, base_dir, adapter_dir, lm.load_adapter(adapter_dir)


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_adapter_files_merge_on_checkpoints_as_peft_computes(variant: str, dtype: str, tmp_path: Path) -> None:
    _, _, inputs, kind = VARIANTS[variant]
    base, base_dir, adapter_dir, adapter = _setup(variant, DTYPES[dtype], tmp_path)
    assert adapter.variant_modules and set(adapter.variant_modules.values()) == {kind}
    report = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False, receipt=True)
    assert report.passed and report.verification is not None
    checks = {c.name: c for c in report.verification.layers}
    assert all(checks[m].passed for m in adapter.variant_modules)  # every one judged, not one per family

    stored, merged_sd = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "merged/model.safetensors")
    for module in adapter.variant_modules:
        name = next(n for n in stored if n.endswith(f"{module.split('.', 1)[-1]}.weight"))
        assert not torch.equal(stored[name], merged_sd[name]), f"{name}: the merge changed nothing"
        if VARIANTS[variant][1].get("lora_bias"):  # and the bias, as PEFT merges it
            bias = name.removesuffix(".weight") + ".bias"
            assert not torch.equal(stored[bias], merged_sd[bias]), f"{bias}: the merge changed nothing"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    merged = type(base).from_pretrained(tmp_path / "merged").eval()
    want, got, plain = _logits(reference, inputs), _logits(merged, inputs), _logits(base, inputs)
    rel = float((got - want).norm() / want.norm())
    assert rel < (1e-5 if dtype == "fp32" else 3e-2), rel
    assert float((plain - want).norm() / want.norm()) > 10 * rel  # the adapter matters at this scale

    result = lm.merge(copy.deepcopy(base), adapter, probes=inputs)
    assert result.passed
    in_memory, loaded = result.model.state_dict(), merged.state_dict()  # by the model's names
    assert set(loaded) == set(in_memory)
    for name, tensor in loaded.items():
        if variant == "kasa":  # PEFT's SVD truncation: its last bits (or more) depend on the CPU's kernels
            continue
        assert torch.equal(tensor, in_memory[name]), f"{name}: checkpoint and in-memory merges differ"
    with torch.no_grad():
        rel_memory = float((_logits(result.model.eval(), inputs) - want).norm() / want.norm())
    assert rel_memory < (1e-5 if dtype == "fp32" else 3e-2), rel_memory

    with pytest.raises(UnmergeImpossibleError, match="merged by PEFT's own layer"):
        lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "plain", receipt=False, progress=False)
    assert not (tmp_path / "plain").exists()
    undone = lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "undone", progress=False)
    assert undone.passed
    back = load_file(tmp_path / "undone/model.safetensors")
    assert all(torch.equal(back[n], t) for n, t in stored.items())


def test_a_variant_merged_wrongly_on_a_checkpoint_fails_and_names_the_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: PEFT's merge of a variant layer off by 1 % fails against PEFT's own layer;
    nothing is written."""
    _, base_dir, adapter_dir, _ = _setup("kasa", torch.float32, tmp_path)
    real = steps.peft_merged_weight
    monkeypatch.setattr(steps, "peft_merged_weight", lambda *a, **kw: (real(*a, **kw)[0] * 1.01, None))
    with pytest.raises(VerificationError, match=r"model\.layers\.\d\.(self_attn|mlp)\.(q|v|down)_proj"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_a_variant_bias_merged_wrongly_fails_and_names_the_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: a LoRA bias of a variant layer merged off by 1 % of its update fails
    against PEFT's own layer; nothing is written."""
    _, base_dir, adapter_dir, _ = _setup("bdlora-lora-bias", torch.float32, tmp_path)
    real = steps.peft_merged_bias

    def wrong(layer: nn.Module, bias: torch.Tensor, name: str) -> torch.Tensor:
        merged = real(layer, bias, name)
        return merged + 0.01 * (merged - bias)

    monkeypatch.setattr(steps, "peft_merged_bias", wrong)
    with pytest.raises(VerificationError, match=r"model\.layers\.\d\.self_attn\.(q|k)_proj"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_a_variant_weight_left_unmerged_fails_verification(tmp_path: Path) -> None:
    """Negative control: a checkpoint (and a model) in which one variant weight is still the base's
    fails ``verify_checkpoint`` and ``verify``, naming that layer."""
    base, base_dir, adapter_dir, adapter = _setup("bdlora", torch.float32, tmp_path)
    lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False, verify=False)
    module = sorted(adapter.variant_modules)[0]
    shard = tmp_path / "merged/model.safetensors"
    tensors = load_file(shard)
    tensors[f"{module}.weight"] = load_file(base_dir / "model.safetensors")[f"{module}.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    assert json.loads((tmp_path / "merged/loramerge.json").read_text())["lineage"]  # only the weight is wrong
    report = lm.verify_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not report.passed and any(module in f for f in report.failures)
    merged = type(base).from_pretrained(tmp_path / "merged").eval()
    in_memory = lm.verify(base, adapter, merged, probes=TOKENS)
    assert not in_memory.passed and any(module in f for f in in_memory.failures)


def test_verify_leaves_a_kasa_base_as_it_was(tmp_path: Path) -> None:
    """KaSA truncates its base weight when PEFT attaches it: ``verify`` runs adapter mode on the base
    and must give it back unchanged (and pass on a correct merge)."""
    base, base_dir, adapter_dir, adapter = _setup("kasa", torch.float32, tmp_path)
    lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    merged = type(base).from_pretrained(tmp_path / "merged").eval()
    assert lm.verify(base, adapter, merged, probes=TOKENS).passed
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_in_memory_unmerge_of_a_variant_needs_the_base_weights(tmp_path: Path) -> None:
    base, _, _, adapter = _setup("dora-embedding", torch.float32, tmp_path)
    result = lm.merge(copy.deepcopy(base), adapter, probes=TOKENS)
    norms = dict(result.dora_norms)  # the DoRA linear layers' norms: loramerge's own merge records them
    with pytest.raises(UnmergeImpossibleError, match=r"model\.embed_tokens.*originals="):
        lm.unmerge(copy.deepcopy(result.model), adapter, dora_norms=norms)
    originals = {f"{m}.weight": base.get_parameter(f"{m}.weight").detach() for m in adapter.variant_modules}
    restored = lm.unmerge(result.model, adapter, dora_norms=norms, originals=originals, probes=TOKENS).model
    assert torch.equal(
        restored.get_parameter("model.embed_tokens.weight"), base.get_parameter("model.embed_tokens.weight")
    )


def test_kasa_factors_without_kasa_config_are_refused(tmp_path: Path) -> None:
    _, _, adapter_dir, _ = _setup("kasa", torch.float32, tmp_path)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["kasa_config"] = None
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterConfigError, match="lora_diag but the config sets no kasa_config"):
        lm.load_adapter(adapter_dir)


def test_the_cli_merges_and_inspects_a_variant_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loramerge.cli.main import main

    _, base_dir, adapter_dir, adapter = _setup("kasa", torch.bfloat16, tmp_path)
    assert main(["inspect", str(adapter_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["merged_by_peft"] == dict(adapter.variant_modules) and not shown["modules"]
    assert main(["merge", str(base_dir), str(adapter_dir), "-o", str(tmp_path / "merged")]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_a_stored_weight_that_does_not_fit_the_config_is_refused(tmp_path: Path) -> None:
    """The layer PEFT merges is built from config.json: a stored variant weight of another shape (a
    checkpoint whose config and tensors disagree) is refused by name, and nothing is written."""
    _, base_dir, adapter_dir, adapter = _setup("kasa", torch.float32, tmp_path)
    module = sorted(adapter.variant_modules)[0]
    shard = base_dir / "model.safetensors"
    tensors = load_file(shard)
    tensors[f"{module}.weight"] = tensors[f"{module}.weight"][:-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(lm.AdapterMismatchError, match=rf"{module}\.weight has shape"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False, verify=False)
    assert not (tmp_path / "merged").exists()
