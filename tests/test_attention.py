"""LoRA on ``nn.MultiheadAttention``: PEFT adapts the packed ``in_proj_weight`` and ``out_proj``
together (its state dict names them ``attn`` and ``attn.base_layer.out_proj``). Merged in memory
from a ``PeftModel`` and from an adapter file by PEFT's own attention layer (on a widened copy,
rounded once), and judged against that layer in adapter mode on whole sequences. PEFT's layer
(0.21) adds the ``out_proj`` update twice, in adapter mode and in its own merge alike (peft PR
#3774): the merge follows what adapter mode computes, whichever it is. Adapter mode for this layer
merges and unmerges the weights around every forward, which moves them by rounding: loramerge
keeps the weights as they were across the forwards it runs."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import loramerge as lm
from loramerge.errors import VerificationError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def _models(dtype: torch.dtype) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    base = Tiny().to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["attn"])
        peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    return base, peft_model


def _x(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_attention_merges_as_peft_s_adapter_mode_computes(dtype: str) -> None:
    base, peft_model = _models(DTYPES[dtype])
    x = _x(DTYPES[dtype])
    with torch.no_grad():
        want = copy.deepcopy(peft_model)(x).double()  # adapter mode (on a copy: it moves its weights)
        plain = base(x).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_merged = copy.deepcopy(peft_model).merge_and_unload()(x).double()
    result = lm.merge(peft_model, probes={"x": x})
    assert result.passed
    assert [c.name for c in result.report.layers] == ["attn (attention)"]  # the attention, probed whole
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) <= (0, 21):  # the report says so
        assert any("adds its out_proj update 2 times" in n for n in result.report.notes), result.report.notes
    assert isinstance(result.model.attn, nn.MultiheadAttention)
    assert isinstance(result.model.attn.out_proj, nn.Linear)
    with torch.no_grad():
        got = result.model(x).double()
    rel = float((got - want).norm() / want.norm())
    assert rel < (1e-5 if dtype == "fp32" else 3e-2), rel
    assert float((plain - want).norm() / want.norm()) > 10 * rel  # the adapter matters at this scale
    assert float((got - peft_merged).norm() / want.norm()) < (1e-5 if dtype == "fp32" else 3e-2)


def test_the_forwards_of_the_check_leave_the_weights_as_they_were() -> None:
    """PEFT's attention merges and unmerges around each forward (``W + ΔW − ΔW`` moves ``W`` by
    rounding): the verified merge, which runs adapter mode, gives the same bits as the merge that
    runs nothing."""
    _, checked = _models(torch.float32)
    _, unchecked = _models(torch.float32)
    a = lm.merge(checked, probes={"x": _x(torch.float32)}).model.state_dict()
    b = lm.merge(unchecked, verify=False).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_attention_adapter_file_merges_in_memory(tmp_path: Path) -> None:
    base, peft_model = _models(torch.bfloat16)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = lm.load_adapter(tmp_path / "adapter")
    assert dict(adapter.variant_modules) == {"attn": "LoRA on an nn.MultiheadAttention"} and not adapter.modules
    x = _x(torch.bfloat16)
    from_file = lm.merge(copy.deepcopy(base), adapter, probes={"x": x}).model.state_dict()
    from_model = lm.merge(peft_model, probes={"x": x}).model.state_dict()
    assert from_file.keys() == from_model.keys()
    assert all(torch.equal(from_file[k], from_model[k]) for k in from_file)


@pytest.mark.parametrize("mistake", ["textbook-out_proj", "packed-off-by-1%"])
def test_an_attention_merged_otherwise_than_adapter_mode_fails(mistake: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative controls, judged by PEFT's attention layer in adapter mode: the ``out_proj`` merged
    as ``W + ΔW`` (what a textbook merge gives, not what this PEFT's adapter mode computes), and the
    packed projection off by 1 %."""
    import loramerge.engine.inmemory_merge as engine

    real = engine.peft_merged_attention

    def wrong(module: Any, names: Any, name: str) -> Any:
        packed, out = real(module, names, name)
        if mistake == "packed-off-by-1%":
            return packed * 1.01, out
        once = module.get_base_layer().out_proj.get_delta_weight(names[0]).detach()
        return packed, (out.double() - once.double()).to(out.dtype)

    monkeypatch.setattr(engine, "peft_merged_attention", wrong)
    _, peft_model = _models(torch.float32)
    with pytest.raises(VerificationError, match=r"attn \(attention\): output error"):
        lm.merge(peft_model, probes={"x": _x(torch.float32)})


def test_an_attention_adapter_on_a_custom_checkpoint_is_refused_with_advice(tmp_path: Path) -> None:
    base, peft_model = _models(torch.float32)
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base/model.safetensors")
    (tmp_path / "base/config.json").write_text('{"model_type": "tiny-attention"}')
    # custom code: PEFT's attention layer, which merges it, needs the model config.json builds
    with pytest.raises(
        lm.UnsupportedAdapterError, match=r"(?s)attn'\] \(LoRA on an nn.MultiheadAttention\).*Merge in memory"
    ):
        lm.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_verify_and_unmerge_of_an_attention_adapter(tmp_path: Path) -> None:
    """``verify`` judges the merged attention against PEFT's layer on the base (and fails a wrong
    one, naming it); ``unmerge`` needs the base weights and then restores them exactly."""
    base, peft_model = _models(torch.float32)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = lm.load_adapter(tmp_path / "adapter")
    x = {"x": _x(torch.float32)}
    merged = lm.merge(copy.deepcopy(base), adapter, probes=x).model
    report = lm.verify(base, adapter, merged, probes=x)
    assert report.passed and "attn (attention)" in {c.name for c in report.layers}
    broken = copy.deepcopy(merged)
    with torch.no_grad():
        broken.attn.out_proj.weight.mul_(1.01)
    failed = lm.verify(base, adapter, broken, probes=x)
    assert not failed.passed and any("attn (attention)" in f for f in failed.failures)

    with pytest.raises(lm.UnmergeImpossibleError, match=r"attn\.in_proj_weight.*attn\.out_proj\.weight"):
        lm.unmerge(copy.deepcopy(merged), adapter)
    originals = {n: base.get_parameter(n).detach().clone() for n in adapter.weight_names("attn")}
    restored = lm.unmerge(merged, adapter, originals=originals, probes=x).model
    assert all(torch.equal(restored.get_parameter(n), originals[n]) for n in originals)


def test_objects_come_back_as_they_went_in(tmp_path: Path) -> None:
    """PEFT registers new weight parameters when it wraps an attention (and again around each
    forward): ``merge`` gives the model its own parameter objects back (merged), with their
    ``requires_grad`` and order, in training mode if it was; ``verify`` leaves the base as it was."""
    base, peft_model = _models(torch.float32)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = lm.load_adapter(tmp_path / "adapter")
    x = {"x": _x(torch.float32)}
    model = copy.deepcopy(base).train()
    model.emb.weight.requires_grad_(False)
    before = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
    merged = lm.merge(model, adapter, probes=x).model
    assert merged is model and model.training
    assert [(n, p, p.requires_grad) for n, p in model.named_parameters()] == before
    assert not torch.equal(model.attn.in_proj_weight, base.attn.in_proj_weight)  # merged into them

    kept = [(n, p, p.detach().clone()) for n, p in base.named_parameters()]
    assert lm.verify(base, adapter, merged.eval(), probes=x).passed
    for (n, p, value), (m, q) in zip(kept, base.named_parameters(), strict=True):
        assert n == m and q is p and torch.equal(q, value), n
