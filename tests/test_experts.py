"""LoRA on MoE experts stored as 3-D parameters (PEFT's ``target_parameters``), merged in memory.

Judged here against PEFT's adapter mode run in fp64 (not by loramerge's verification), with
negative controls that break loramerge's own merge math and must fail its verification.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from peft import PeftModel
from torch import nn

import loramerge as lm
import loramerge.param_targets as param_targets
from conftest import save_adapter
from loramerge.model_runs import make_probes, run_model, run_widened
from loramerge.output_checks import same_route_positions
from loramerge.tolerance import Tolerance, relative_errors

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
    own = param_targets._expert_delta

    def off_by_five_percent(*args: Any) -> torch.Tensor:
        return own(*args) * 1.05

    monkeypatch.setattr(param_targets, "_expert_delta", off_by_five_percent)
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


def test_expert_adapters_from_files_are_refused_with_the_in_memory_way(tmp_path: Path) -> None:
    base = _moe("mixtral")
    base.save_pretrained(tmp_path / "base")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS}
    adapter = save_adapter(base, lora, tmp_path / "adapter")
    with pytest.raises(lm.UnsupportedAdapterError, match=r"target_parameters.*PeftModel\.from_pretrained"):
        lm.load_adapter(adapter)
    with pytest.raises(lm.UnsupportedAdapterError, match="target_parameters"):
        lm.merge_checkpoint(tmp_path / "base", adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


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
