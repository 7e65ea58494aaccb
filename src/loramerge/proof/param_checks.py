"""The proof of merges of PEFT's ``target_parameters``: PEFT's own ``ParamWrapper`` in adapter mode
(the weight its parametrization hands the module), widened, on seeded probes, against the merged
parameter under the tolerance rule. It shares no code with the merge (:mod:`loramerge.plan.param_targets`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from loramerge.numerics.tolerance import Tolerance, reference_dtype, relative_errors, ulp, unit_roundoff
from loramerge.plan.param_targets import _ATTACHED, ParamPlan, _attached
from loramerge.proof.reports import LayerCheck

__all__ = ["ParamOracle", "check_param"]


KIND = "parameter"


_PROBES = 8


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
        x = _probe_vectors(plan.name, int(plan.param.shape[-1]), seed, wide).to(plan.param.device)
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
        x = _probe_vectors(name, int(tensor.shape[-1]), seed, wide).to(tensor.device)
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


def unmerged_checks(
    model: nn.Module, adapter: Any, merged: Mapping[str, ProbedValues], tol: Tolerance, seed: int
) -> list[LayerCheck]:
    """The reverse judgement: PEFT's adapter mode on the restored parameter must reproduce the merged
    one (``merged``: its values on the probes, taken before the unmerge)."""
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
