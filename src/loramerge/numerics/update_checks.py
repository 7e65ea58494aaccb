"""What must hold before a weight changes: every factor finite, and the merged weight finite and
within its dtype's range (bounded without forming ΔW)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loramerge.numerics.delta import (
    LoraUpdate,
    _compute_dtype,
    _delta_rows,
    _factors_on,
    _row_ranges,
    dora_norms,
    view2d,
)


def check_updates(updates: Sequence[LoraUpdate], weight: torch.Tensor) -> list[str]:
    """Problems that make merging ``updates`` into ``weight`` impossible (empty when fine).

    Checks that every factor is finite, that DoRA is not combined with other updates, and that
    ``weight`` itself is finite and cannot overflow its dtype once ΔW is added. The overflow check
    first uses a cheap bound (``max|W| + Σ |scale| * max_i‖left_i‖ * max_j‖right_j‖``) and computes
    ``W + ΔW`` exactly (in chunks) only where the bound cannot exclude it.
    """
    problems: list[str] = []
    if not updates:
        return problems
    for up in updates:
        for label, t in (
            ("lora_A", up.lora_A),
            ("lora_B", up.lora_B),
            ("magnitude", up.magnitude),
            ("lora_B.bias", up.bias),
        ):
            if t is not None and not bool(torch.isfinite(t).all()):
                problems.append(f"non-finite values in the adapter's {label}")
        if not math.isfinite(up.scale):
            problems.append(f"non-finite scale {up.scale}")
    if any(up.magnitude is not None for up in updates) and len(updates) > 1:
        problems.append(
            "a DoRA adapter cannot be merged together with other adapters on the same module "
            "(its norm depends on the weight it is merged into); merge them one at a time"
        )
    if problems:
        return problems
    w = view2d(weight.detach())
    max_w = 0.0
    for start, stop in _row_ranges(w.shape[0], w.shape[1]):
        lo, hi = torch.aminmax(w[start:stop])  # a read pass, no temporary; NaN/Inf propagate
        max_w = max(max_w, abs(float(lo)), abs(float(hi)))
    if not math.isfinite(max_w):
        return ["the base weight itself contains non-finite values"]
    dtype_max = float(torch.finfo(weight.dtype).max)
    factors = _factors_on(updates, weight)
    if updates[0].magnitude is not None:
        norms = dora_norms(updates[0], weight)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            return ["DoRA weight norm ‖W + ΔW‖ is zero or non-finite for some output feature"]
        if float(updates[0].magnitude.detach().abs().max()) >= dtype_max:
            return [f"DoRA magnitude exceeds the largest {weight.dtype} value"]
        return problems
    bound = max_w
    for left, right in factors:
        bound += float(left.norm(dim=1).max()) * float(right.norm(dim=0).max())
    if bound < dtype_max * (1 - 2.0**-8):
        return problems
    worst = 0.0
    for start, stop in _row_ranges(w.shape[0], w.shape[1]):
        merged = w[start:stop].to(_compute_dtype(w.dtype)) + _delta_rows(updates, factors, start, stop)
        rounded = merged.to(weight.dtype)
        if not bool(torch.isfinite(rounded).all()):
            peak = float(torch.linalg.vector_norm(merged, ord=math.inf))
            worst = math.inf if not math.isfinite(peak) else max(worst, peak)  # NaN counts as overflow too
    if worst == math.inf:
        scales = ", ".join(f"{up.scale:.3g}" for up in updates)
        problems.append(
            f"ΔW itself is not finite in {_compute_dtype(w.dtype)} (scale {scales} times the LoRA factors overflows): "
            "check lora_alpha and r in the adapter config"
        )
    elif worst:
        problems.append(f"W + ΔW overflows {weight.dtype} (largest |value| {worst:.4g} > {dtype_max:.4g})")
    return problems
