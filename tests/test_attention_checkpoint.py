"""LoRA on an ``nn.MultiheadAttention`` merged into a checkpoint (SigLIP's pooling head holds one):
each of its two stored weights through PEFT's own attention layer from the injection into the
weightless model, judged by that layer in adapter mode on whole sequences, as in memory, and
bit-identical to the in-memory merge. Negative controls: a packed projection merged off by 1 %,
and an ``out_proj`` left unmerged, fail and name the attention."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

import loramerge as lm
import loramerge.engine.checkpoint_steps as steps  # where the step looks PEFT's merge up
from conftest import save_adapter
from loramerge.errors import UnmergeImpossibleError, VerificationError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
ATTENTION = "head.attention"


def _setup(dtype: torch.dtype, tmp: Path) -> tuple[SiglipVisionModel, Path, Path]:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    base = SiglipVisionModel(config).to(dtype).eval()
    base.save_pretrained(tmp / "base")
    adapter = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ["attention", "q_proj"]}, tmp / "adapter")
    return base, tmp / "base", adapter


def _pooled(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS.to(dtype)).pooler_output.double()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_an_attention_merges_into_a_checkpoint_as_peft_computes(dtype: str, tmp_path: Path) -> None:
    dt = DTYPES[dtype]
    base, base_dir, adapter_dir = _setup(dt, tmp_path)
    adapter = lm.load_adapter(adapter_dir)
    assert adapter.variant_modules == {ATTENTION: "LoRA on an nn.MultiheadAttention"}
    report = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False, receipt=True)
    assert report.passed and report.verification is not None
    rows = {c.name: c for c in report.verification.layers}
    assert rows[f"{ATTENTION} (attention)"].passed  # judged whole, by PEFT's attention layer

    stored, merged_sd = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "merged/model.safetensors")
    for part in ("in_proj_weight", "out_proj.weight"):
        name = f"{ATTENTION}.{part}"
        assert not torch.equal(stored[name], merged_sd[name]), f"{name}: the merge changed nothing"
    for part in ("in_proj_bias", "out_proj.bias"):
        assert torch.equal(stored[f"{ATTENTION}.{part}"], merged_sd[f"{ATTENTION}.{part}"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    merged = SiglipVisionModel.from_pretrained(tmp_path / "merged").eval()
    want, got, plain = _pooled(reference, dt), _pooled(merged, dt), _pooled(base, dt)
    rel = float((got - want).norm() / want.norm())
    assert rel < (1e-5 if dtype == "fp32" else 3e-2), rel
    assert float((plain - want).norm() / want.norm()) > 10 * rel  # the adapter matters at this scale

    in_memory = lm.merge(copy.deepcopy(base), adapter, probes={"pixel_values": PIXELS.to(dt)})
    assert in_memory.passed
    memory_sd = in_memory.model.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, memory_sd[name]), f"{name}: checkpoint and in-memory merges differ"

    assert lm.verify_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False).passed
    with pytest.raises(UnmergeImpossibleError, match="in_proj_weight"):
        lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "plain", receipt=False, progress=False)
    undone = lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "undone", progress=False)
    assert undone.passed
    back = load_file(tmp_path / "undone/model.safetensors")
    assert all(torch.equal(back[n], t) for n, t in stored.items())


def test_a_packed_projection_merged_wrongly_fails_and_names_the_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: PEFT's merge of the packed projection off by 1 % fails; nothing is written."""
    _, base_dir, adapter_dir = _setup(torch.float32, tmp_path)
    real = steps.peft_merged_attention_part

    def wrong(layer: torch.nn.Module, tensor: torch.Tensor, part: str, name: str) -> torch.Tensor:
        merged = real(layer, tensor, part, name)
        return merged * 1.01 if part == "in_proj_weight" else merged

    monkeypatch.setattr(steps, "peft_merged_attention_part", wrong)
    with pytest.raises(VerificationError, match=r"head\.attention \(attention\)"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_an_out_proj_left_unmerged_fails_verification(tmp_path: Path) -> None:
    """Negative control: a merged checkpoint whose ``out_proj`` still holds the base's weight fails
    ``verify_checkpoint``, naming the attention."""
    _, base_dir, adapter_dir = _setup(torch.float32, tmp_path)
    lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False, verify=False)
    shard = tmp_path / "merged/model.safetensors"
    tensors = load_file(shard)
    name = f"{ATTENTION}.out_proj.weight"
    tensors[name] = load_file(base_dir / "model.safetensors")[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    report = lm.verify_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not report.passed and any(ATTENTION in f for f in report.failures)
