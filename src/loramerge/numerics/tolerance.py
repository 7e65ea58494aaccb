"""The tolerance rule: how far a merged model may be from adapter mode (pure math, no I/O).

A merge in a 16-bit dtype cannot reproduce adapter mode bit for bit: adapter mode rounds the base
output and the LoRA output separately, the merged model rounds ``W + ΔW`` once. Neither is "the
truth"; both approximate the same computation done in a wider dtype. So loramerge measures both
against a *reference* (adapter mode run in a wider dtype: fp32 for 16-bit models, fp64 for fp32
models) and passes a merge when::

    err(merged) <= factor * err(adapter mode) + floor(dtype)

"The merge adds no more error than running the adapter does", with a floor so that an adapter mode
that happens to be nearly exact does not make the rule impossible to meet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from loramerge.errors import InvalidArgumentError

__all__ = ["Tolerance", "reference_dtype", "ulp", "unit_roundoff"]

_SIGNIFICAND_BITS: dict[torch.dtype, int] = {
    torch.float64: 53,
    torch.float32: 24,
    torch.bfloat16: 8,
    torch.float16: 11,
}
_MIN_NORMAL_EXPONENT: dict[torch.dtype, int] = {
    torch.float64: -1022,
    torch.float32: -126,
    torch.bfloat16: -126,
    torch.float16: -14,
}
# Default floors, relative to the reference output's scale: a few units of rounding of the dtype.
_FLOOR_IN_UNITS = 1.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1.0 to the next representable number of ``dtype``.

    Example:
        >>> unit_roundoff(torch.bfloat16)
        0.00390625
    """
    if dtype not in _SIGNIFICAND_BITS:
        raise InvalidArgumentError(f"unit_roundoff: {dtype} is not a supported floating-point dtype")
    return 2.0 ** (-_SIGNIFICAND_BITS[dtype])


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The wider dtype loramerge computes references in: fp64 for fp32/fp64 models, fp32 otherwise.

    Example:
        >>> reference_dtype(torch.float16)
        torch.float32
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s numbers at the magnitude of each element of ``x`` (as fp32/fp64).

    ``x`` may be in any floating dtype (typically fp32 values that are about to be rounded to
    ``dtype``). Subnormal ranges and zeros get the smallest subnormal spacing. Computed from the
    exponent bits (no transcendental functions), so it costs a few integer passes.

    Example:
        >>> ulp(torch.tensor([1.0, 3.0]), torch.bfloat16).tolist()
        [0.0078125, 0.015625]
    """
    if dtype not in _SIGNIFICAND_BITS:
        raise InvalidArgumentError(f"ulp: {dtype} is not a supported floating-point dtype")
    p = _SIGNIFICAND_BITS[dtype]
    if x.dtype == torch.bfloat16 and dtype == torch.bfloat16:  # the same integer steps on 2-byte values
        bits = torch.bitwise_and(x.contiguous().view(torch.int16), 0x7F80)
        bits = bits.sub_((p - 1) << 7).clamp_min_(1 << 7)
        return bits.view(torch.bfloat16).to(torch.float32).clamp_min_(2.0 ** (_MIN_NORMAL_EXPONENT[dtype] - p + 1))
    if dtype == torch.float64:
        xf, int_dtype, mantissa, exp_mask = x.to(torch.float64), torch.int64, 52, 0x7FF0000000000000
    else:
        xf, int_dtype, mantissa, exp_mask = x.to(torch.float32), torch.int32, 23, 0x7F800000
    # |x| in [2**e, 2**(e+1)) has spacing 2**(e - p + 1): subtract (p - 1) from the exponent field
    bits = torch.bitwise_and(xf.contiguous().view(int_dtype), exp_mask)
    bits = bits.sub_((p - 1) << mantissa).clamp_min_(1 << mantissa)  # in place: one temporary
    spacing = bits.view(xf.dtype)
    min_spacing = 2.0 ** (_MIN_NORMAL_EXPONENT[dtype] - p + 1)
    return spacing.clamp_min_(min_spacing)


@dataclass(frozen=True)
class Tolerance:
    """How much error a merge (or unmerge) may add, relative to adapter mode.

    Args:
        factor: The merged model's error against the reference may be at most ``factor`` times
            adapter mode's own error against the same reference (plus the floor). Lower is
            stricter; 1.0 means "no worse than adapter mode".
        floor: Relative error always allowed, as a fraction of the reference output's scale.
            ``None`` picks one unit roundoff of the dtype (fp32: 6.0e-8, fp16: 4.9e-4,
            bf16: 3.9e-3).
        ulp: For the weight-space check in :func:`~loramerge.verify`: the largest allowed
            difference between ``W_merged`` and ``W_base + ΔW``, in units in the last place of the
            merged dtype. A correctly rounded merge is within 0.5; PEFT's merge, which rounds the
            delta before adding it, within about 1.

    Example:
        >>> Tolerance(factor=1.5).limit(adapter_error=0.01, dtype=torch.bfloat16)
        0.01890625
    """

    factor: float = 2.0
    floor: float | None = None
    ulp: float = 1.0

    def __post_init__(self) -> None:
        for name in ("factor", "ulp"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidArgumentError(f"Tolerance.{name} must be a positive finite number, got {value!r}")
        if self.floor is not None and not (math.isfinite(self.floor) and self.floor >= 0):
            raise InvalidArgumentError(f"Tolerance.floor must be None or a finite number >= 0, got {self.floor!r}")

    def floor_for(self, dtype: torch.dtype) -> float:
        """The relative floor used for a model or layer computing in ``dtype``."""
        if self.floor is not None:
            return self.floor
        return _FLOOR_IN_UNITS * unit_roundoff(dtype)

    def limit(self, adapter_error: float, dtype: torch.dtype) -> float:
        """The largest relative error the merged side may have, given adapter mode's."""
        return self.factor * adapter_error + self.floor_for(dtype)

    def to_dict(self) -> dict[str, float | None]:
        """A JSON-safe dict of the settings."""
        return asdict(self)


def relative_errors(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(relative RMS error, relative max error)`` of ``value`` against ``reference``.

    Both are relative to the reference: RMS error over RMS of the reference, and largest absolute
    error over the largest absolute reference value. Computed in fp64 when either side is fp64,
    else in fp32 (the reference of a 16-bit model is fp32).
    """
    wide = torch.float64 if torch.float64 in (value.dtype, reference.dtype) else torch.float32
    ref = reference.to(wide)
    diff = value - ref if value.dtype == wide else value.to(wide).sub_(ref)  # one temporary, never the caller's
    root_n = math.sqrt(max(ref.numel(), 1))
    norm = torch.linalg.vector_norm  # no squared temporary; NaN and inf propagate
    ref_rms, ref_max = float(norm(ref)) / root_n, float(norm(ref, ord=math.inf))
    d_rms, d_max = float(norm(diff)) / root_n, float(norm(diff, ord=math.inf))
    return (d_rms / ref_rms if ref_rms > 0 else d_max), (d_max / ref_max if ref_max > 0 else d_max)
