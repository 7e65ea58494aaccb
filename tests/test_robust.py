"""Verification that neither crashes nor lets a wrong merge pass: LoRA variants with extra layer
state are refused before anything changes, references fall back module by module where torch has
no wide kernel, and a failure inside verification after the merge is a VerificationError."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import loramerge
from conftest import tiny_llama
from loramerge.errors import UnsupportedAdapterError, VerificationError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 32)
        self.lin2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def peft(model: nn.Module, **kwargs: Any) -> Any:
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(**{"init_lora_weights": False, **kwargs}))


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(dict(kasa_config=KasaConfig()), id="kasa"),
        pytest.param(
            dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)),
            id="bdlora",
        ),
        pytest.param(dict(velora_config=VeloraConfig()), id="velora"),
        pytest.param(dict(monteclora_config=MontecloraConfig()), id="monteclora"),
        pytest.param(dict(init_lora_weights="mica"), id="mica"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_variants_with_extra_layer_state_are_merged_by_peft_s_own_layer(
    variant: dict[str, Any], dtype: torch.dtype
) -> None:
    """KaSA's and BD-LoRA's layers hold more than A, B and a scale: PEFT's own layer merges them
    (on a widened copy, rounded once), and PEFT's own layer in adapter mode is the check."""
    torch.manual_seed(0)
    pm = peft(MLP().to(dtype), r=4, lora_alpha=8, target_modules=["lin0", "lin1"], **variant)
    pm.eval()
    x = torch.randn(64, 16).to(dtype)
    with torch.no_grad():
        adapter_out = pm(x).double()
    result = loramerge.merge(pm, probes={"x": x})
    assert result.passed and result.report.outputs is not None
    assert {c.name for c in result.report.layers} == {"lin0", "lin1"}
    with torch.no_grad():
        merged_out = result.model(x).double()
    rel = float((merged_out - adapter_out).norm() / adapter_out.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 3e-2), rel


def test_a_variant_merged_wrongly_fails_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a PEFT-merged layer whose result is off by 1 % fails against PEFT's own layer."""
    import loramerge.engine.inmemory_merge as inmemory

    real = inmemory.peft_merged_weight

    def off(*args: Any, **kwargs: Any) -> Any:
        weight, bias = real(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(inmemory, "peft_merged_weight", off)
    torch.manual_seed(0)
    pm = peft(MLP(), r=4, lora_alpha=8, target_modules=["lin0", "lin1"], kasa_config=KasaConfig())
    with pytest.raises(VerificationError, match="against PEFT's own LoRA layer"):
        loramerge.merge(pm, probes={"x": torch.randn(8, 16)})


def test_a_variant_peft_cannot_merge_is_refused_before_any_change() -> None:
    """A LoRA variant PEFT's own layer cannot merge is refused with PEFT's reason, nothing changed."""

    class FutureVariant:
        pass

    torch.manual_seed(0)
    pm = peft(MLP(), r=4, lora_alpha=8, target_modules=["lin0"])
    pm.base_model.model.lin0.lora_variant["default"] = FutureVariant()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(UnsupportedAdapterError, match="PEFT cannot merge this LoRA layer.*nothing was changed"):
        loramerge.merge(pm, probes={"x": torch.randn(4, 16)})
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())


def test_dora_still_merges_through_the_variant_check() -> None:
    torch.manual_seed(0)
    pm = peft(MLP(), r=4, lora_alpha=8, target_modules=["lin0", "lin1"], use_dora=True)
    assert loramerge.merge(pm, probes={"x": torch.randn(4, 16)}).passed


def _mixtral() -> nn.Module:
    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        )
    )


def _qwen2_moe() -> nn.Module:
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        )
    )


@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe], ids=["mixtral", "qwen2-moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_models_verify_with_experts_run_narrow_in_the_reference(build: Any, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = build().to(dtype).eval()
    pm = peft(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    result = loramerge.merge(pm)
    assert result.passed and result.report.outputs is not None
    if dtype == torch.float32:  # torch has no fp64 grouped matmul: those modules ran in fp32, and the report says so
        assert any("no float64 kernel" in n and "experts" in n for n in result.report.notes)


def test_probes_the_model_cannot_run_are_refused_before_any_change() -> None:
    torch.manual_seed(0)
    pm = peft(tiny_llama().eval(), r=4, lora_alpha=8, target_modules=["q_proj"])
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    bad_probes = {"input_ids": torch.full((2, 8), 1000)}  # beyond the vocabulary
    with pytest.raises(loramerge.LoraMergeError, match="nothing was changed"):
        loramerge.merge(pm, probes=bad_probes)
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())


def test_a_crash_inside_verification_after_the_merge_is_a_verification_error(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    pm = peft(tiny_llama().eval(), r=4, lora_alpha=8, target_modules=["q_proj"])
    before = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault in the output check")

    monkeypatch.setattr("loramerge.engine.inmemory_merge.output_check", crash)
    with pytest.raises(VerificationError, match="verification could not run after the merge") as e:
        loramerge.merge(pm)
    assert "injected fault" in str(e.value)
    assert e.value.result is not None and not e.value.report.passed
    merged = e.value.result.model
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.Linear) and not torch.equal(layer.weight, before), "documented: merged and unwrapped"


def test_a_crash_inside_unmerge_verification_is_a_verification_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from conftest import CASES, make_base, save_adapter

    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.float32)
    adapter = loramerge.load_adapter(save_adapter(base, case.lora, tmp_path / "a"))
    merged = loramerge.merge(base, adapter).model

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault in the output check")

    monkeypatch.setattr("loramerge.engine.inmemory_unmerge.output_check", crash)
    with pytest.raises(VerificationError, match="could not run after the unmerge") as e:
        loramerge.unmerge(merged, adapter)
    assert e.value.result is not None and e.value.result.model is merged


def test_a_mistake_shared_by_the_merge_and_its_own_reference_is_caught_by_peft_s_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong scale read the same way by the merge and by loramerge's own per-layer reference is
    self-consistent; PEFT's own layer (the oracle) is not fooled, and names the layer."""
    import dataclasses

    import loramerge.plan.peft_plans as glue

    real = glue._lora_update

    def wrong_scale(*args: Any, **kwargs: Any) -> Any:
        up = real(*args, **kwargs)
        return dataclasses.replace(up, scale=up.scale * 1.1)

    monkeypatch.setattr(glue, "_lora_update", wrong_scale)
    torch.manual_seed(0)
    pm = peft(tiny_llama().eval(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(VerificationError, match="against PEFT's own LoRA layer") as e:
        loramerge.merge(pm, check_outputs=False)  # only the per-layer checks
    failed = [c for c in e.value.report.layers if not c.passed]
    assert failed and all("PEFT's own LoRA layer" in c.reason for c in failed)
    assert not any("on probe vectors" in c.reason for c in failed), "loramerge's own reference was fooled, as designed"
    assert {c.name for c in failed} == {c.name for c in e.value.report.layers}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_on_an_embedding_is_merged_by_peft_s_own_layer(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    pm = peft(
        tiny_llama().to(dtype).eval(), r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True
    )
    pm.eval()
    probes = loramerge.make_probes(pm, seed=2)
    with torch.no_grad():
        adapter_out = pm(**probes).logits.double()
    result = loramerge.merge(pm)
    assert result.passed and result.report.outputs is not None
    with torch.no_grad():
        merged_out = result.model(**probes).logits.double()
    rel = float((merged_out - adapter_out).norm() / adapter_out.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 3e-2), rel


class _Convs(nn.Module):
    """Conv1d, Conv2d (with padding and stride) and Conv3d layers, as PEFT's own conv tests use."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, kernel_size=3, padding=1)
        self.c2 = nn.Conv2d(6, 8, kernel_size=3, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 4, kernel_size=(1, 3, 3))

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)  # [n, 6, 8]
        b = self.c2(a.unsqueeze(-1).expand(-1, -1, -1, 8))  # [n, 8, 4, 4]
        c = self.c3(v)
        return torch.cat([b.flatten(1), c.flatten(1)], dim=1)


def _conv_probes() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {"x": torch.randn(4, 3, 8, generator=gen), "v": torch.randn(4, 2, 2, 5, 5, generator=gen)}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_convolutions_are_judged_by_peft_s_own_layer_and_dora_on_them_merges(dora: bool) -> None:
    """A convolution's probes (flattened patches) run through PEFT's conv layer as one-kernel
    images; DoRA on Conv1d/2d/3d, which loramerge's own math does not model, is merged by PEFT's
    layer and proven against it."""
    torch.manual_seed(0)
    pm = peft(_Convs().eval(), r=2, lora_alpha=4, target_modules=["c1", "c2", "c3"], use_dora=dora)
    pm.eval()
    probes = _conv_probes()
    with torch.no_grad():
        adapter_out = pm(**probes).double()
    result = loramerge.merge(pm, probes=probes)
    assert result.passed, str(result.report)
    assert {c.name for c in result.report.layers} == {"c1", "c2", "c3"}
    with torch.no_grad():
        merged_out = result.model(**probes).double()
    assert float((merged_out - adapter_out).norm() / adapter_out.norm()) < 1e-5


def test_a_conv_scale_mistake_shared_with_loramerges_reference_is_caught_by_peft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    import loramerge.plan.peft_plans as glue

    real = glue._lora_update
    monkeypatch.setattr(
        glue, "_lora_update", lambda *a, **k: dataclasses.replace(real(*a, **k), scale=real(*a, **k).scale * 1.1)
    )
    torch.manual_seed(0)
    pm = peft(_Convs().eval(), r=2, lora_alpha=4, target_modules=["c1", "c2", "c3"])
    with pytest.raises(VerificationError, match="against PEFT's own LoRA layer") as e:
        loramerge.merge(pm, probes=_conv_probes(), check_outputs=False)
    assert {c.name for c in e.value.report.layers if not c.passed} == {"c1", "c2", "c3"}


def test_a_weight_mapped_from_its_file_is_copied_before_the_merge_writes_it(tmp_path: Path) -> None:
    """transformers maps safetensors weights copy-on-write; the merge copies such a weight into the
    process's own memory first (each page fault was most of a merge's time), and the file stays as it was."""
    from safetensors.torch import load_file

    from loramerge.engine.inmemory_common import FileMappings

    torch.manual_seed(0)
    tiny_llama().eval().save_pretrained(tmp_path / "base")
    before = load_file(tmp_path / "base" / "model.safetensors")
    model = loramerge.load_base(tmp_path / "base")
    q = model.model.layers[0].self_attn.q_proj
    own = torch.randn(8, 8)
    mapped = FileMappings()
    assert not mapped.holds(own)
    if not mapped.holds(q.weight):
        pytest.skip("this transformers loads weights into the process's own memory")
    pm = peft(model, r=4, lora_alpha=8, target_modules=["q_proj"])
    result = loramerge.merge(pm)
    assert result.passed
    merged_q = result.model.model.layers[0].self_attn.q_proj.weight
    assert merged_q is q.weight and not FileMappings().holds(merged_q)  # the same parameter, its own memory
    assert all(torch.equal(t, load_file(tmp_path / "base" / "model.safetensors")[n]) for n, t in before.items())
