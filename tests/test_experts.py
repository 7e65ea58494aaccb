"""LoRA on MoE experts stored as 3-D parameters (PEFT's ``target_parameters``), merged in memory.

Judged here against PEFT's adapter mode run in fp64 (not by loramerge's verification), with
negative controls that break loramerge's own merge math and must fail its verification.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

import loramerge as lm
import loramerge.plan.checkpoint_plan as checkpoint_plan
import loramerge.plan.param_targets as param_targets
from conftest import save_adapter
from loramerge.numerics.tolerance import Tolerance, relative_errors, ulp
from loramerge.plan.fused import FusedParam
from loramerge.proof.model_runs import make_probes, run_model
from loramerge.proof.output_checks import same_route_positions
from loramerge.proof.widened_runs import run_widened

SMALL = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "tie_word_embeddings": False}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
MOES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 32,
        },
    ),
}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _moe(arch: str, **extra: Any) -> nn.Module:
    model, config, moe = MOES[arch]
    torch.manual_seed(0)
    built = getattr(tf, model)(getattr(tf, config)(**{**SMALL, **HEADS, **moe, **extra}))
    if not any(p.dim() == 3 for p in built.parameters()):
        pytest.skip("this transformers stores the experts as separate Linear layers")
    return built.eval()


def _adapter_mode(base: nn.Module, adapter: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()


def _outputs(model: nn.Module, probes: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return run_model(model, probes).double()


def _off_by_five_percent(own: Any) -> Any:
    """``param_targets.expert_update`` with every scale 5 % too large: a fault in loramerge's own merge."""

    def wrong(*args: Any) -> Any:
        up = own(*args)
        return dataclasses.replace(up, scale=up.scale * 1.05)

    return wrong


def _routed(run: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``run()``'s outputs and, per token, the experts every router (``mlp.gate``) chose, as a set."""
    chosen: dict[int, torch.Tensor] = {}  # the last call of each router (a widened run may repeat one)
    hooks = [
        m.register_forward_hook(lambda m, _i, out: chosen.__setitem__(id(m), out[-1].sort(dim=-1).values))
        for n, m in model.named_modules()
        if n.endswith("mlp.gate")
    ]
    try:
        with torch.no_grad():
            out = run().double()
    finally:
        for h in hooks:
            h.remove()
    return out, torch.cat(list(chosen.values()), dim=-1)


def _same_routes(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Positions routed alike in both runs, and with no earlier position of the sequence routed otherwise:
    at a router's near-tie, rounding flips a discrete choice, and later positions attend to that one."""
    differs = (a != b).any(dim=-1).view(shape)
    return ~differs.long().cummax(dim=1).values.bool()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(MOES))
def test_expert_parameters_merge_as_adapter_mode_computes(arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    base = _moe(arch).to(dtype)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": EXPERTS}
    adapter = save_adapter(base, lora, tmp_path / "adapter")
    probes = make_probes(base)
    peft_model = _adapter_mode(base, adapter)
    exact, exact_routes = _routed(lambda: run_widened(peft_model, probes, torch.float64), peft_model)
    adapter_out, adapter_routes = _routed(lambda: run_model(peft_model, probes), peft_model)
    before = {n: p.detach().clone() for n, p in base.named_parameters() if p.dim() == 3}

    result = lm.merge(peft_model)

    assert result.report.passed, str(result.report)
    checked = {c.name: c for c in result.report.layers if c.kind == "parameter"}
    assert set(checked) == set(before), "every expert parameter has its own check against PEFT's wrapper"
    assert all(c.passed and c.probe_error <= c.limit for c in checked.values())
    merged = result.model
    assert not isinstance(merged, PeftModel)
    assert not any(hasattr(m, "base_layer") or "lora" in n for n, m in merged.named_modules())
    for name, old in before.items():
        assert not torch.equal(merged.get_parameter(name), old), f"{name} was not merged"
    merged_out, merged_routes = _routed(lambda: run_model(merged, probes), merged)
    shape = tuple(probes["input_ids"].shape)
    keep = _same_routes(merged_routes, exact_routes, shape) & _same_routes(adapter_routes, exact_routes, shape)
    assert int(keep.sum()) * 2 >= keep.numel(), "most positions are routed as in adapter mode (fp64)"
    adapter_err = relative_errors(adapter_out[keep], exact[keep])[0]
    limit = 2 * adapter_err + Tolerance().floor_for(dtype)
    err = relative_errors(merged_out[keep], exact[keep])[0]
    assert err <= limit, f"{err:.3g} from adapter mode (fp64) at {int(keep.sum())} positions, limit {limit:.3g}"

    merged.save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = lm.load_base(tmp_path / "merged").eval()
    expected = merged.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} changed on save and reload"


def test_a_wrong_expert_scale_fails_verification_and_names_the_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _moe("mixtral")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS}
    peft_model = _adapter_mode(base, save_adapter(base, lora, tmp_path / "adapter"))
    monkeypatch.setattr(param_targets, "expert_update", _off_by_five_percent(param_targets.expert_update))
    with pytest.raises(lm.VerificationError) as caught:
        lm.merge(peft_model, check_outputs=False)
    failed = [c.name for c in caught.value.report.layers if not c.passed]
    assert failed and all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in failed)
    assert "experts.down_proj" in str(caught.value)


def test_a_transposed_expert_layout_fails_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A square expert stack, merged with its layout read the wrong way round: shapes fit, values do not."""
    base = _moe("mixtral", intermediate_size=16)  # gate_up_proj: (experts, 32, 32)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": ["experts.gate_up_proj"]}
    peft_model = _adapter_mode(base, save_adapter(base, lora, tmp_path / "adapter"))
    monkeypatch.setattr(param_targets.ParamPlan, "reads_last_dim", lambda self: False)
    with pytest.raises(lm.VerificationError) as caught:
        lm.merge(peft_model, check_outputs=False)
    failed = [c.name for c in caught.value.report.layers if not c.passed]
    assert failed == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"]


@pytest.mark.filterwarnings("ignore::loramerge.LoraMergeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(MOES))
def test_expert_adapters_merge_on_files_as_in_memory(arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    """The checkpoint stores one tensor per expert and projection; transformers fuses them on load.
    Merged on files, each stored piece gets its slice of the update: the result loads bit for bit as
    the in-memory merge, is judged by PEFT's own wrapper, and unmerges back within rounding."""
    base = _moe(arch).to(dtype)
    base.save_pretrained(tmp_path / "base")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": EXPERTS}
    adapter_dir = save_adapter(base, lora, tmp_path / "adapter")
    adapter = lm.load_adapter(adapter_dir)
    assert len(adapter.parameter_factors) == 4 and len(adapter.modules) == 2
    assert "2 adapted modules, 4 target_parameters wrappers" in adapter.summary()

    report = lm.merge_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged", progress=False)
    assert report.passed and report.verification is not None
    judged = [c for c in report.verification.layers if c.kind == "parameter"]
    assert judged and all(c.passed for c in judged), "PEFT's own wrapper judged the expert parameters"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_files = lm.load_base(tmp_path / "merged").eval()
    in_memory = lm.merge(copy.deepcopy(base), adapter).model
    expected = in_memory.state_dict()
    for name, tensor in from_files.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name}: the checkpoint and in-memory merges differ"
    for name, p in base.named_parameters():
        if p.dim() == 3:
            assert not torch.equal(from_files.get_parameter(name), p), f"{name} was not merged"

    assert lm.verify_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged", progress=False).passed
    again = lm.merge_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "again", progress=False, verify="model")
    assert again.passed and again.verification is not None and again.verification.outputs is not None
    restored = lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "restored", progress=False)
    assert restored.passed
    original = load_file(tmp_path / "base" / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    back = load_file(tmp_path / "restored" / "model.safetensors")
    for name, tensor in original.items():  # ½ulp rounding W + ΔW, ½ulp rounding it back
        bound = ulp(tensor, dtype).double() + ulp(merged[name], dtype).double()
        assert not bool(((back[name].double() - tensor.double()).abs() > bound).any()), name
    checked = lm.verify(base, adapter, in_memory)  # in memory: PEFT's own wrapper on the base
    assert checked.passed and len([c for c in checked.layers if c.kind == "parameter"]) == 4
    merged_values = {n: p.detach().clone() for n, p in in_memory.named_parameters()}
    undone = lm.unmerge(in_memory, adapter)
    assert undone.passed and len([c for c in undone.report.layers if c.kind == "parameter"]) == 4
    for name, p in base.named_parameters():  # the same bound, in memory
        bound = ulp(p.detach(), dtype).double() + ulp(merged_values[name], dtype).double()
        assert not bool(((in_memory.get_parameter(name).double() - p.double()).abs() > bound).any()), name


def _mixtral_files(tmp_path: Path) -> tuple[Path, Path]:
    base = _moe("mixtral")
    base.save_pretrained(tmp_path / "base")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS}
    return tmp_path / "base", save_adapter(base, lora, tmp_path / "adapter")


def test_a_wrong_expert_scale_on_files_fails_against_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = _mixtral_files(tmp_path)
    monkeypatch.setattr(param_targets, "expert_update", _off_by_five_percent(param_targets.expert_update))
    with pytest.raises(lm.VerificationError) as caught:
        lm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert "experts.down_proj" in str(caught.value) and "PEFT's own ParamWrapper" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_pieces_assembled_in_the_wrong_order_fail_against_transformers_assembly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan puts the gate rows into the up projection's tensors and back: each piece is merged
    consistently with the plan, so loramerge's own per-tensor checks pass; the judgement assembles the
    parameter as transformers' own loader does, and fails."""
    base, adapter = _mixtral_files(tmp_path)
    real = checkpoint_plan.fused_keys

    def swapped(root: Path, stored: Any) -> dict[str, FusedParam]:
        return {k: dataclasses.replace(v, sources=v.sources[::-1]) for k, v in real(root, stored).items()}

    monkeypatch.setattr(checkpoint_plan, "fused_keys", swapped)
    with pytest.raises(lm.VerificationError) as caught:
        lm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    failed = [c for c in caught.value.report.layers if not c.passed]
    assert failed and all(c.name.endswith("experts.gate_up_proj") for c in failed)
    assert all(c.passed for c in caught.value.report.layers if ".w1" in c.name or ".w3" in c.name)


def test_rerouted_positions_are_left_out_only_up_to_half_of_them() -> None:
    """One token routed otherwise leaves out it and the rest of its sequence; rerouting most tokens
    leaves out nothing (everything is judged, so a merge that reroutes everything still fails)."""
    probes = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    reference = [torch.tensor([[0, 1]] * 16), torch.tensor([[2, 3]] * 16)]
    one = [reference[0], reference[1].clone()]
    one[1][5] = torch.tensor([1, 3])  # sequence 0, position 5, second router
    keep = same_route_positions(one, reference, probes, torch.Size([2, 8, 4]))
    assert keep is not None
    assert keep[0].tolist() == [True] * 5 + [False] * 3 and bool(keep[1].all())
    most = [reference[0], torch.tensor([[0, 3]] * 16)]
    assert same_route_positions(most, reference, probes, torch.Size([2, 8, 4])) is None
    assert same_route_positions(reference, reference, probes, torch.Size([2, 8, 4])) is None


def test_a_receipt_restores_an_expert_merge_bit_for_bit(tmp_path: Path) -> None:
    base, adapter = _mixtral_files(tmp_path)
    assert lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False, receipt=True).passed
    assert lm.unmerge_checkpoint(tmp_path / "merged", adapter, tmp_path / "restored", progress=False).passed
    original = load_file(base / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    restored = load_file(tmp_path / "restored" / "model.safetensors")
    assert any(not torch.equal(merged[n], original[n]) for n in original if ".experts." in n)
    assert all(torch.equal(restored[n], original[n]) for n in original)


def test_an_in_memory_unmerge_with_a_wrong_scale_fails_against_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapter mode on the restored experts must reproduce the merged ones; a 5 % scale error in the
    subtraction does not, and the parameters are named."""
    base = _moe("mixtral")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS}
    adapter = lm.load_adapter(save_adapter(base, lora, tmp_path / "adapter"))
    merged = lm.merge(copy.deepcopy(base), adapter).model
    monkeypatch.setattr(param_targets, "expert_update", _off_by_five_percent(param_targets.expert_update))
    with pytest.raises(lm.VerificationError) as caught:
        lm.unmerge(merged, adapter, check_outputs=False)
    failed = {c.name for c in caught.value.report.layers if not c.passed}
    assert failed and all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in failed)


def test_parameters_keep_their_order_after_adapter_mode_ran(tmp_path: Path) -> None:
    """PEFT's ParamWrapper re-registers its parameter whenever it runs alone, which moves it to the end of its
    module's parameters, and the next adapter's wrappers would nest otherwise (its file then names its
    tensors otherwise). A merge, a verification and an unmerge give the order back as it was."""
    base = _moe("mixtral")
    experts = base.model.layers[0].mlp.experts
    order = list(experts._parameters)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS}
    adapter = lm.load_adapter(save_adapter(base, lora, tmp_path / "adapter"))
    merged = lm.merge(copy.deepcopy(base), adapter).model
    assert list(merged.model.layers[0].mlp.experts._parameters) == order
    assert lm.verify(base, adapter, merged).passed
    assert list(experts._parameters) == order and list(merged.model.layers[0].mlp.experts._parameters) == order
    lm.unmerge(merged, adapter)
    assert list(merged.model.layers[0].mlp.experts._parameters) == order
    with warnings.catch_warnings():  # the negative control: running one of PEFT's wrappers does move it
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    inner = peft_model.base_model.model.model.layers[0].mlp.experts.base_layer  # the nested wrapper
    with inner._activate_lora(["default"]):
        pass
    assert list(inner.get_base_layer()._parameters) != order


class _TransposedExperts(nn.Module):
    """Experts stored ``[experts, in, out]`` (the module says ``is_transposed``, as GPT-OSS's do);
    token ``t`` goes to expert ``t % experts``."""

    is_transposed = True

    def __init__(self, experts: int = 3, d_in: int = 12, d_out: int = 10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_in, d_out) / d_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = torch.arange(x.shape[0]) % self.weight.shape[0]
        return torch.einsum("ti,tio->to", x, self.weight[chosen])


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _TransposedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transposed_expert_stacks_merge_in_memory(dtype: torch.dtype) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Model().to(dtype).eval()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    x = torch.randn(9, 12, dtype=dtype)
    with torch.no_grad():
        exact = run_widened(peft_model, {"x": x}, torch.float64).double()
        adapter_out = peft_model(x).double()
    result = lm.merge(peft_model, probes={"x": x})
    assert result.passed and [c.kind for c in result.report.layers] == ["parameter"]
    merged_out = result.model(x).double()
    limit = 2 * relative_errors(adapter_out, exact)[0] + Tolerance().floor_for(dtype)
    assert relative_errors(merged_out, exact)[0] <= limit
    assert not torch.equal(result.model.experts.weight, base.experts.weight)
