"""LoRA on raw parameters: PEFT's ``target_parameters`` (MoE expert stacks stored as 3-D parameters).

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama 4 and most new
MoE models as one parameter per projection, ``experts.gate_up_proj`` of shape
``(experts, d1, d2)``, not as one ``nn.Linear`` per expert. PEFT adapts such a parameter with a
``ParamWrapper`` (nested, one per parameter, when several parameters of one module are targeted):
rank ``r`` per expert, ``lora_A`` of shape ``(r · experts, in)`` and ``lora_B`` of shape
``(out, r · experts)``, where ``in`` is the dimension the projection reads (the last one, unless
the module says ``is_transposed``).

Two independent halves, which share no code:

* :func:`merge_param_` is loramerge's own merge: expert by expert, ``ΔW_e = s · B_e A_e`` in fp32,
  added in fp32 and rounded once to the stored dtype, with no full-size temporary beyond one
  expert.
* :class:`ParamOracle` is the proof: PEFT's own wrapper, in adapter mode (the weight its
  parametrization hands the module when it runs), evaluated in the wide dtype on seeded probes
  before the merge, and compared with the merged parameter afterwards under the tolerance rule.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from loramerge.delta import LoraUpdate, check_updates, merge_tensor_, unmerge_tensor_
from loramerge.fused import FusedParam
from loramerge.reports import LayerCheck
from loramerge.tolerance import Tolerance, reference_dtype, relative_errors, ulp, unit_roundoff

__all__ = ["ParamOracle", "ParamPlan", "check_param", "merge_param_"]

KIND = "parameter"
_PROBES = 8


@dataclass
class ParamPlan:
    """One targeted parameter: PEFT's wrapper of it and the adapters to merge into it, in order."""

    name: str  # full parameter path, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    wrapper: Any  # PEFT's ParamWrapper that adapts it
    adapters: list[str]
    owner: nn.Module  # the module that owns the parameter, under every nested wrapper (stays after unwrapping)
    path: str = ""  # the wrapper's module path, as adapter files name its tensors

    @property
    def attr(self) -> str:
        return str(self.wrapper.parameter_name)

    @property
    def param(self) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self.owner, self.attr))

    def updates(self) -> list[tuple[str, LoraUpdate]]:
        """Each adapter's factors, as stored (for fingerprints and lineage)."""
        w = self.wrapper
        return [
            (a, LoraUpdate("linear", w.lora_A[a].weight.detach(), w.lora_B[a].weight.detach(), float(w.scaling[a])))
            for a in self.adapters
        ]

    def fingerprinted(self) -> list[tuple[str, LoraUpdate]]:
        """Each adapter's factors with ``lora_alpha / r`` as the scale: what
        :func:`~loramerge.lineage_records.fingerprint_of` records for the same adapter read from its
        file (which cannot know the parameter, nor rsLoRA's scale, before it is planned)."""
        w = self.wrapper
        return [
            (
                a,
                LoraUpdate(
                    "linear", w.lora_A[a].weight.detach(), w.lora_B[a].weight.detach(), w.lora_alpha[a] / w.r[a]
                ),
            )
            for a in self.adapters
        ]

    def reads_last_dim(self) -> bool:
        """Whether the projection reads the parameter's last dimension (``lora_A`` acts on it)."""
        return self.param.dim() == 2 or not bool(getattr(self.owner, "is_transposed", False))


# ---- loramerge's own merge -----------------------------------------------------------------


def expert_update(
    a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, e: int, last: bool, rows: slice = slice(None)
) -> LoraUpdate:
    """Expert ``e``'s update as a plain LoRA update of its 2-D matrix (``rows`` of it, when a checkpoint
    stores the matrix in row blocks). ``lora_A``'s rows are grouped by expert (rows ``e·r … e·r + r − 1``),
    ``lora_B``'s columns interleaved (``e, e + E, e + 2E, …``). A matrix stored ``[in, out]`` (the module
    says ``is_transposed``) is updated as GPT-2's ``Conv1D`` is."""
    r = a.shape[0] // experts
    a_e = a[e * r : (e + 1) * r].detach()
    b_e = b[rows, e::experts].detach().contiguous()
    return LoraUpdate("linear" if last else "conv1d", a_e, b_e, scale)


def _experts(param: torch.Tensor) -> int:
    return int(param.shape[0]) if param.dim() == 3 else 1


def _expert_updates(plan: ParamPlan, e: int) -> list[LoraUpdate]:
    w, experts, last = plan.wrapper, _experts(plan.param), plan.reads_last_dim()
    return [
        expert_update(w.lora_A[n].weight, w.lora_B[n].weight, float(w.scaling[n]), experts, e, last)
        for n in plan.adapters
    ]


def _matrix(param: torch.Tensor, e: int) -> torch.Tensor:
    return param[e] if param.dim() == 3 else param


def param_problems(plan: ParamPlan) -> list[str]:
    """Shape, finiteness and overflow problems of merging ``plan``, found without changing anything."""
    param = plan.param
    if param.dim() not in (2, 3) or not param.is_floating_point():
        return [f"{plan.name}: a {param.dim()}-D {param.dtype} parameter; LoRA adapts 2-D and 3-D float parameters"]
    experts = _experts(param)
    d_out, d_in = (param.shape[-2], param.shape[-1]) if plan.reads_last_dim() else (param.shape[-1], param.shape[-2])
    problems = []
    for a_name in plan.adapters:
        a, b = plan.wrapper.lora_A[a_name].weight, plan.wrapper.lora_B[a_name].weight
        if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1] or a.shape[0] % experts:
            problems.append(
                f"{plan.name}: adapter {a_name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do "
                f"not fit a parameter of shape {tuple(param.shape)}"
            )
    if problems:
        return problems
    for e in range(experts):
        found = check_updates(_expert_updates(plan, e), _matrix(param, e))
        if found:
            return [f"{plan.name} (expert {e}): {m}" for m in found]
    return []


def merge_param_(plan: ParamPlan) -> float:
    """Merge ``plan``'s adapters into its parameter in place, one expert at a time, with the same
    arithmetic as every other weight (:func:`~loramerge.delta.merge_tensor_`: fp32, one rounding).

    Returns:
        ``‖ΔW‖`` over the whole parameter (fp32, before rounding).
    """
    param = plan.param
    total = 0.0
    with torch.no_grad():
        for e in range(_experts(param)):
            total += merge_tensor_(_matrix(param, e), _expert_updates(plan, e)).delta_norm ** 2
    return math.sqrt(total)


def stored_updates(
    wrapper: Any, adapter: str, fused: FusedParam, shapes: Mapping[str, Sequence[int]]
) -> dict[str, LoraUpdate] | str:
    """For a parameter a checkpoint stores in pieces (:class:`~loramerge.fused.FusedParam`), each
    stored tensor's own update, by stored name; or why that cannot be done."""
    param = wrapper.get_param()
    if fused.unsupported:
        return fused.unsupported
    if param.dim() != 3 or bool(getattr(wrapper.get_base_layer(), "is_transposed", False)):
        return f"a {param.dim()}-D parameter{' stored [experts, in, out]' if param.dim() == 3 else ''}"
    experts, rows, cols = (int(d) for d in param.shape)
    if any(len(names) != experts for names in fused.sources):
        return f"the checkpoint stores {len(fused.sources[0])} experts, the model has {experts}"
    heights = [int(shapes[names[0]][0]) for names in fused.sources]
    if sum(heights) != rows or any(
        tuple(shapes[n]) != (h, cols) for names, h in zip(fused.sources, heights, strict=True) for n in names
    ):
        return f"the stored pieces do not add up to the parameter's shape {tuple(param.shape)}"
    a, b, scale = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, float(wrapper.scaling[adapter])
    if a.shape[0] % experts or a.shape[1] != cols or b.shape[0] != rows:
        return (
            f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit a parameter of shape {tuple(param.shape)}"
        )
    out: dict[str, LoraUpdate] = {}
    start = 0
    for names, height in zip(fused.sources, heights, strict=True):
        for e, name in enumerate(names):
            out[name] = expert_update(a, b, scale, experts, e, True, slice(start, start + height))
        start += height
    return out


# ---- the proof: PEFT's own wrapper in adapter mode -----------------------------------------


@contextmanager
def _widened(plan: ParamPlan, wide: torch.dtype) -> Iterator[None]:
    """The wrapper's LoRA factors and the parameter as ``wide`` copies, for the duration."""
    w = plan.wrapper
    factors = [p for name in plan.adapters for m in (w.lora_A[name], w.lora_B[name]) for p in m.parameters()]
    saved = [(p, p.data) for p in factors]
    owner, attr = plan.owner, plan.attr
    original = getattr(owner, attr)
    try:
        for p, data in saved:
            p.data = data.to(wide, copy=True)
        setattr(owner, attr, nn.Parameter(original.detach().to(wide, copy=True), requires_grad=False))
        yield
    finally:
        setattr(owner, attr, original)
        for p, data in saved:
            p.data = data


def _adapter_mode_weight(plan: ParamPlan) -> torch.Tensor:
    """The parameter as PEFT's wrapper presents it to its module in adapter mode."""
    with plan.wrapper._activate_lora(plan.adapters):
        return cast(torch.Tensor, getattr(plan.owner, plan.attr)).detach().clone()


def _probe_vectors(name: str, features: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Seeded vectors along a parameter's last dimension."""
    digest = hashlib.sha256(f"param:{seed}:{name}".encode()).digest()[:4]
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return torch.randn(features, _PROBES, generator=gen, dtype=dtype)


@dataclass
class ParamOracle:
    """What PEFT's adapter mode computes with one parameter, taken before the merge.

    Attributes:
        reference: ``W_adapter_mode @ x`` in the wide dtype (PEFT's wrapper, widened).
        adapter: The same in the parameter's own dtype (adapter mode as it runs).
        arithmetic: The output variance that the fp32 arithmetic of any merge of ΔW may add:
            per element ``((r + 2) u32 · |s| |B| |A|)² / 3``, weighted by ``x²`` (``|s| |B| |A|``
            from PEFT's own wrapper with every factor made positive).
        probes: ``x``.
    """

    reference: torch.Tensor
    adapter: torch.Tensor
    arithmetic: torch.Tensor
    probes: torch.Tensor
    seed: int

    @classmethod
    def of(cls, plan: ParamPlan, seed: int) -> ParamOracle:
        stored = plan.param.dtype
        wide = reference_dtype(stored)
        x = _probe_vectors(plan.name, int(plan.param.shape[-1]), seed, wide)
        with torch.no_grad():
            adapter = _adapter_mode_weight(plan).to(wide) @ x
            with _widened(plan, wide):
                reference = _adapter_mode_weight(plan) @ x
                w = plan.wrapper
                for name in plan.adapters:  # |ΔW| with every factor made positive: PEFT's own delta
                    for m in (w.lora_A[name], w.lora_B[name]):
                        m.weight.data.abs_()
                bound = _adapter_mode_weight(plan).sub_(getattr(plan.owner, plan.attr).detach()).abs_()
            rank = max(int(w.r[name]) for name in plan.adapters)
            arithmetic = bound.mul_((rank + 2) * unit_roundoff(torch.float32)).pow_(2).div_(3) @ x.pow(2)
        return cls(reference, adapter, arithmetic, x, seed)


@dataclass(frozen=True)
class ProbedValues:
    """A parameter's values on the seeded probes, and the output variance storing them may add."""

    name: str
    dtype: torch.dtype
    value: torch.Tensor
    variance: torch.Tensor

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, seed: int) -> ProbedValues:
        """``tensor @ x`` in the wide dtype, and ``ulp(tensor)² / 12 @ x²`` (½ulp per element)."""
        stored = tensor.dtype
        wide = reference_dtype(stored)
        x = _probe_vectors(name, int(tensor.shape[-1]), seed, wide)
        with torch.no_grad():
            value = tensor.detach().to(wide) @ x
            variance = ulp(tensor.detach(), stored).to(wide).pow_(2).div_(12) @ x.pow(2)
        return cls(name, stored, value, variance)


def verdict(
    merged: ProbedValues, oracle: ParamOracle, tol: Tolerance, rounded_base: ProbedValues | None = None
) -> LayerCheck:
    """The merged parameter's probed values against PEFT's adapter mode, under the tolerance rule of a
    layer check: ``probe_error <= factor * storage_error + floor / 4``, where ``storage_error`` is
    the output error that storing the merged values in their dtype (½ulp per element) and the fp32
    arithmetic of ΔW may add. ``rounded_base``: the base the oracle was taken on was itself computed
    and rounded (an unmerge's output): its rounding is allowed too."""
    stored = merged.dtype
    variance = merged.variance.clone()
    if stored != torch.float64:
        variance.add_(oracle.arithmetic)
    if rounded_base is not None:
        variance.add_(rounded_base.variance)
    err, _ = relative_errors(merged.value, oracle.reference)
    a_err, _ = relative_errors(oracle.adapter, oracle.reference)
    ref_rms = float(oracle.reference.double().pow(2).mean().sqrt())
    s_err = float(variance.double().mean().sqrt()) / ref_rms if ref_rms > 0 else 0.0
    limit = tol.factor * s_err + tol.floor_for(stored) / 4
    ok = math.isfinite(err) and err <= limit
    reason = (
        ""
        if ok
        else (f"output error {err:.3g} against PEFT's own ParamWrapper in adapter mode exceeds the limit {limit:.3g}")
    )
    return LayerCheck(merged.name, KIND, str(stored)[6:], math.nan, math.nan, err, a_err, s_err, limit, ok, reason)


def check_param(
    plan: ParamPlan, oracle: ParamOracle, tol: Tolerance, rounded_base: torch.Tensor | None = None
) -> LayerCheck:
    """:func:`verdict` for the parameter as ``plan`` holds it now."""
    base = None if rounded_base is None else ProbedValues.of(plan.name, rounded_base, oracle.seed)
    return verdict(ProbedValues.of(plan.name, plan.param, oracle.seed), oracle, tol, base)


def parameter_path(wrapper_path: str, wrapper: Any) -> str:
    """The model's name of the parameter PEFT's wrapper at ``wrapper_path`` adapts (a wrapper nested
    in another sits at ``<module>.base_layer``; all of them adapt a parameter of ``<module>``)."""
    owner = wrapper_path
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    return f"{owner}.{wrapper.parameter_name}"


def param_plans(model: nn.Module, adapter_names: Sequence[str]) -> list[ParamPlan]:
    """One :class:`ParamPlan` per parameter PEFT adapts with ``adapter_names`` (``target_parameters``)."""
    from peft.tuners.lora.layer import ParamWrapper

    plans = []
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        active = [a for a in adapter_names if a in module.lora_A]
        if not active:
            continue
        plans.append(ParamPlan(parameter_path(name, module), module, active, module.get_base_layer(), name))
    return plans


@contextmanager
def _holding(owner: nn.Module, attr: str, value: torch.Tensor) -> Iterator[None]:
    saved = getattr(owner, attr)
    try:
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
        yield
    finally:
        setattr(owner, attr, saved)


def judge_values(
    name: str,
    wrapper: Any,
    adapter: str,
    base: torch.Tensor,
    merged: torch.Tensor,
    tol: Tolerance,
    seed: int,
    rounded_base: bool = False,
) -> LayerCheck:
    """``merged`` against what PEFT's ``wrapper`` computes in adapter mode on ``base`` (both the
    parameter's values, e.g. read from checkpoints), under the rule of :func:`check_param`."""
    owner = cast(nn.Module, wrapper.get_base_layer())
    plan = ParamPlan(name, wrapper, [adapter], owner)
    if tuple(base.shape) != tuple(wrapper.get_param().shape) or base.shape != merged.shape:
        reason = f"shape {tuple(merged.shape)} is not the parameter's {tuple(wrapper.get_param().shape)}"
        dtype = str(merged.dtype)[6:]
        return LayerCheck(name, KIND, dtype, math.nan, math.nan, math.inf, math.nan, 0.0, 0.0, False, reason)
    with _holding(owner, plan.attr, base.to(merged.dtype)):
        oracle = ParamOracle.of(plan, seed)
    with _holding(owner, plan.attr, merged):
        return check_param(plan, oracle, tol, base.to(merged.dtype) if rounded_base else None)


# ---- a saved adapter on a live model: verify and unmerge ------------------------------------

_ATTACHED = "loramerge_0"  # the name peft_glue.adapter_mode gives the (first) adapter it attaches


@contextmanager
def _attached(model: nn.Module, adapter: Any) -> Iterator[list[ParamPlan]]:
    """``adapter``'s parameter plans with the adapter attached to ``model`` by PEFT (taken off after)."""
    from loramerge.peft_glue import adapter_mode

    with adapter_mode(model, [adapter]) as peft_model:
        yield param_plans(cast(nn.Module, cast(Any, peft_model).base_model.model), [_ATTACHED])


def attached_checks(
    base: nn.Module, adapter: Any, merged: Mapping[str, torch.Tensor], tol: Tolerance, seed: int
) -> list[LayerCheck]:
    """Each parameter ``adapter`` adapts (``target_parameters``), in ``merged``, against PEFT's own
    wrapper attached to ``base`` as adapter mode runs it."""
    checks = []
    with _attached(base, adapter) as plans:
        for plan in plans:
            got = merged.get(plan.name)
            if got is None:
                got = torch.full_like(plan.param, math.nan)  # judged as missing: fails
            checks.append(
                judge_values(plan.name, plan.wrapper, _ATTACHED, plan.param.detach(), got.detach(), tol, seed)
            )
    return checks


@dataclass
class Unmerge:
    """One parameter to unmerge: where it is, each expert's updates, and its merged values on probes."""

    name: str
    owner: nn.Module
    attr: str
    updates: list[list[LoraUpdate]]
    merged: ProbedValues | None

    @property
    def param(self) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self.owner, self.attr))


def planned_unmerges(model: nn.Module, adapter: Any, seed: int, verify: bool) -> list[Unmerge]:
    """What unmerging ``adapter``'s ``target_parameters`` from ``model`` does, planned by PEFT's own
    injection (attached and taken off again; nothing changes)."""
    found = []
    with _attached(model, adapter) as plans:
        for plan in plans:
            updates = [_expert_updates(plan, e) for e in range(_experts(plan.param))]
            merged = ProbedValues.of(plan.name, plan.param, seed) if verify else None
            found.append(Unmerge(plan.name, plan.owner, plan.attr, updates, merged))
    return found


def unmerge_param_(item: Unmerge) -> None:
    """Subtract each expert's updates in place (fp32, one rounding)."""
    with torch.no_grad():
        for e, updates in enumerate(item.updates):
            unmerge_tensor_(_matrix(item.param, e), updates)


def unmerged_checks(
    model: nn.Module, adapter: Any, items: Sequence[Unmerge], tol: Tolerance, seed: int
) -> list[LayerCheck]:
    """The reverse judgement: PEFT's adapter mode on the restored parameter must reproduce the merged one."""
    merged = {item.name: item.merged for item in items if item.merged is not None}
    checks = []
    with _attached(model, adapter) as plans:
        for plan in plans:
            before = merged.get(plan.name)
            if before is None:
                continue
            oracle = ParamOracle.of(plan, seed)
            restored = ProbedValues.of(plan.name, plan.param, seed)
            checks.append(verdict(before, oracle, tol, restored))
    return checks
