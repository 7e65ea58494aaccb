"""Pure tensor math of LoRA merges: ΔW for each layer kind, DoRA, fp32 accumulation, one rounding.

Nothing here knows about PEFT, transformers or files. Every weight is handled in its *stored*
layout, viewed as a 2-D matrix ``[rows, cols]``:

========== ======================= ============================= ===================
kind       stored weight           view                          output features on
========== ======================= ============================= ===================
linear     ``[out, in]``           ``[out, in]``                 rows
conv       ``[out, in, *kernel]``  ``[out, in * prod(kernel)]``  rows
conv1d     ``[in, out]`` (GPT-2)   ``[in, out]``                 columns
embedding  ``[num, dim]``          ``[num, dim]``                columns
========== ======================= ============================= ===================

and the delta of one adapter is ``scale * left @ right`` in that view (:meth:`LoraUpdate.factors`).
Large weights are processed in row chunks, so the extra memory of a merge is bounded by the chunk
size, not by the size of the weight.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from loramerge.numerics.unmerge_checks import unmerged_rows_checks

__all__ = ["Kind", "LoraUpdate", "TensorStats", "dora_norms", "merge_tensor_", "unmerge_tensor_"]

Kind = Literal["linear", "conv1d", "embedding", "conv"]
KINDS: tuple[Kind, ...] = ("linear", "conv1d", "embedding", "conv")
CHUNK_ELEMENTS = 1 << 20  # 1M elements: 4 MiB per fp32 temporary (cache-sized; measured fastest of 2^14..2^22)


def _outputs_on_rows(kind: Kind) -> bool:
    return kind in ("linear", "conv")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit weights, fp64 for fp32/fp64 weights: always wider than the result."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's low-rank update of one weight tensor, as PEFT stores it.

    Args:
        kind: The layer kind (see the module docstring).
        lora_A: ``lora_A.weight`` (``[r, in]``, ``[r, in, *kernel]``) or ``lora_embedding_A``
            (``[r, num_embeddings]``).
        lora_B: ``lora_B.weight`` (``[out, r]``, ``[out, r, 1, ...]``) or ``lora_embedding_B``
            (``[dim, r]``).
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        magnitude: DoRA's magnitude vector (one value per output feature), or ``None``.
        bias: ``lora_B.bias`` when the adapter was trained with ``lora_bias=True``; merged as
            ``bias += scale * lora_B.bias``.
    """

    kind: Kind
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {KINDS}")

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.lora_A.shape[0])

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ``ΔW_view = scale * left @ right`` in the stored-layout view."""
        a = self.lora_A.detach().to(dtype)
        b = self.lora_B.detach().to(dtype)
        r = self.rank
        if self.kind == "linear":
            return b, a
        if self.kind == "conv":
            return b.reshape(b.shape[0], r), a.reshape(r, -1)
        # conv1d: W is [in, out], ΔW = (B @ A)^T; embedding: W is [num, dim], ΔW = (B @ A)^T.
        return a.t(), b.t()

    def delta(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full ``ΔW`` in the weight's stored layout and ``shape``, computed in ``dtype``.

        Example:
            >>> up = LoraUpdate("linear", torch.ones(2, 3), torch.ones(4, 2), scale=0.5)
            >>> up.delta((4, 3))[0].tolist()
            [1.0, 1.0, 1.0]
        """
        left, right = self.factors(dtype)
        return (left @ right).mul_(self.scale).reshape(tuple(shape))

    def lora_output(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The LoRA branch's output ``scale * B(A(x))`` for probe inputs ``x``, in ``dtype``.

        ``x`` is ``[k, in_features]`` (flattened patches for conv), or ``[k]`` token ids for
        embeddings.
        """
        left, right = self.factors(dtype)
        if self.kind == "embedding":
            return (left[x] @ right) * self.scale
        xd = x.to(dtype)
        if _outputs_on_rows(self.kind):
            return ((xd @ right.t()) @ left.t()) * self.scale
        return ((xd @ left) @ right) * self.scale


def view2d(weight: torch.Tensor) -> torch.Tensor:
    """The stored-layout 2-D view of a weight (no copy)."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() != 2 else weight


def _row_ranges(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


_scratch = threading.local()


def _workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A ``rows × cols`` buffer for merge temporaries, reused between chunks and calls on the CPU
    (a fresh 16 MiB tensor per chunk makes the kernel fault in and zero its pages every time, which
    cost more than the arithmetic when streaming a checkpoint). One per thread, dtype and ``slot``."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    cache: dict[tuple[torch.dtype, int], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buffer = cache.get((dtype, slot))
    if buffer is None or buffer.numel() < rows * cols:
        buffer = cache[(dtype, slot)] = torch.empty(max(rows * cols, CHUNK_ELEMENTS), dtype=dtype)
    return buffer[: rows * cols].view(rows, cols)


def _delta_rows(
    updates: Sequence[LoraUpdate],
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    stop: int,
) -> torch.Tensor:
    """Rows ``start:stop`` of ``Σ scale * left @ right`` (scales already folded into ``left``)."""
    total: torch.Tensor | None = None
    for left, right in factors:
        if total is None:
            total = left[start:stop] @ right
        else:
            total.addmm_(left[start:stop], right)
    assert total is not None
    return total


def _factors_on(updates: Sequence[LoraUpdate], weight: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The factors of each update in the compute dtype on the weight's device, ``scale`` folded into ``left``."""
    cdt = _compute_dtype(weight.dtype)
    out = []
    for up in updates:
        left, right = up.factors(cdt)
        out.append(((left * up.scale).to(weight.device), right.to(weight.device)))
    return out


def _low_rank_norm(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """‖Σ left_i @ right_i‖_F from the r×r products alone (no full-size matrix)."""
    total = 0.0
    for li, ri in factors:
        for lj, rj in factors:
            total += float(((li.t() @ lj) * (ri @ rj.t())).sum())
    return math.sqrt(max(total, 0.0))


def dora_norms(update: LoraUpdate, weight: torch.Tensor) -> torch.Tensor:
    """DoRA's ``‖W + ΔW‖`` per output feature, computed in fp32 (fp64 for fp32/fp64 weights)."""
    if update.kind not in ("linear", "conv1d"):
        raise ValueError(f"DoRA is supported on linear and conv1d layers, not {update.kind}")
    cdt = _compute_dtype(weight.dtype)
    w = view2d(weight.detach())
    factors = _factors_on([update], weight)
    on_rows = _outputs_on_rows(update.kind)
    out = torch.zeros(w.shape[0] if on_rows else w.shape[1], dtype=cdt, device=w.device)
    for start, stop in _row_ranges(w.shape[0], w.shape[1]):
        merged = w[start:stop].to(cdt) + _delta_rows([update], factors, start, stop)
        if on_rows:
            out[start:stop] = merged.pow(2).sum(dim=1)
        else:
            out += merged.pow(2).sum(dim=0)
    return out.sqrt_()


def _dora_factor(update: LoraUpdate, norms: torch.Tensor, on_rows: bool, start: int, stop: int) -> torch.Tensor:
    assert update.magnitude is not None
    mag = update.magnitude.detach().to(norms.dtype).to(norms.device).reshape(-1)
    factor = mag / norms
    return factor[start:stop].unsqueeze(1) if on_rows else factor.unsqueeze(0)


def _prepare(
    weight: torch.Tensor, updates: Sequence[LoraUpdate]
) -> tuple[torch.dtype, torch.dtype, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], LoraUpdate | None, bool]:
    """``(dtype, compute dtype, 2-D view, factors, DoRA update or None, outputs on rows)`` of a merge/unmerge."""
    dora = updates[0] if updates[0].magnitude is not None else None
    return (
        weight.dtype,
        _compute_dtype(weight.dtype),
        view2d(weight.data),
        _factors_on(updates, weight),
        dora,
        _outputs_on_rows(updates[0].kind),
    )


@dataclass
class TensorStats:
    """What one in-place merge or unmerge of a weight did, numerically."""

    delta_norm: float = 0.0
    """‖applied change‖ in fp32: ‖ΔW‖ for LoRA, ‖W' − W‖ for DoRA."""
    residual_norm: float = 0.0
    """‖rounded result − exact fp32 result‖."""
    max_ulp: float = math.nan
    """Largest rounding residual in ulps of the weight's dtype (measured by unmerge; a merge rounds to
    nearest by construction, so it is not re-measured there)."""
    error_bound: float = 0.0
    """Unmerge only: a bound on every element's distance to the base, ``½ulp(W_merged) +
    ½ulp(W_recovered)`` taken at the largest magnitudes of each in a chunk of rows, so that no
    element's own bound is larger (for DoRA it is taken element by element, the first term divided by
    the DoRA factor ``m / ‖W + ΔW‖``)."""
    remerge_gap: float = 0.0
    """Unmerge only: largest gap between re-merging the result and the merged weight, as a fraction
    of what rounding allows (``ulp(W_recovered) + ulp(W_merged)``): above 1 means precision was lost."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def relative_residual(self) -> float:
        """‖rounding residual‖ / ‖ΔW‖: the fraction of the delta lost to rounding."""
        return self.residual_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def merge_tensor_(
    weight: torch.Tensor,
    updates: Sequence[LoraUpdate],
    norms: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    residual: bool = True,
) -> TensorStats:
    """Merge ``updates`` into ``weight`` in place: ``W ← round(W + Σ ΔW)``, computed in fp32
    (fp64 for fp32 weights) and rounded once.

    With ``source`` (same shape, any dtype exactly representable in the compute dtype, e.g. a
    dequantized weight), ``weight ← round(source + Σ ΔW)``: ``weight`` is only written.

    For a DoRA update, ``W ← round(m / ‖W + ΔW‖ ⊙ (W + ΔW))``; the norms used are returned in
    ``stats.extras["dora_norms"]`` (they are what an exact unmerge needs). Call
    :func:`~loramerge.numerics.update_checks.check_updates` first: this function assumes the result is finite.

    ``residual=False`` skips measuring the rounding residual (a pass over the tensor, about a third of
    the cost) where nothing reports it: ``stats.residual_norm`` is then 0 when every result is finite
    and fits the weight's dtype, and infinite otherwise, so that a non-finite result is still seen.

    Example:
        >>> w = torch.zeros(2, 2, dtype=torch.bfloat16)
        >>> up = LoraUpdate("linear", torch.ones(1, 2), torch.ones(2, 1), scale=1.0)
        >>> merge_tensor_(w, [up]).residual_norm, w.tolist()
        (0.0, [[1.0, 1.0], [1.0, 1.0]])
    """
    stats = TensorStats()
    if not updates:
        return stats
    _, cdt, w, factors, dora, on_rows = _prepare(weight, updates)
    base = w if source is None else view2d(source.detach())
    if dora is not None:
        norms = dora_norms(dora, weight if source is None else source) if norms is None else norms.to(cdt).to(w.device)
        stats.extras["dora_norms"] = norms
    else:
        stats.delta_norm = _low_rank_norm(factors)
    change_sq = 0.0
    residual_sq = 0.0
    peak = 0.0  # largest |W + ΔW| when the residual is not measured
    for start, stop in _row_ranges(w.shape[0], w.shape[1]):
        chunk = w[start:stop]
        exact = _workspace(stop - start, w.shape[1], cdt, w.device)
        exact.copy_(base[start:stop])  # exact: the compute dtype holds every value of the weight's
        for left, right in factors:  # W + ΔW in the compute dtype (the product accumulated onto W)
            exact.addmm_(left[start:stop], right)
        if dora is not None:
            assert norms is not None
            exact.mul_(_dora_factor(dora, norms, on_rows, start, stop))
            change_sq += float(torch.linalg.vector_norm(exact - base[start:stop].to(cdt)) ** 2)
        if not residual and dora is None:
            lo, hi = (float(v) for v in torch.aminmax(exact))  # NaN and infinities propagate
            peak = max(peak, -lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.inf
            chunk.copy_(exact)  # the one rounding, straight into the weight
            continue
        chunk.copy_(exact)  # the one rounding, straight into the weight
        exact.sub_(chunk)  # the rounding residual (negated)
        residual_sq += float(torch.linalg.vector_norm(exact) ** 2)
    if not residual and dora is None:
        fits = peak <= float(torch.finfo(weight.dtype).max)
        stats.residual_norm = 0.0 if fits else math.inf
    else:
        stats.residual_norm = math.sqrt(residual_sq)
    if dora is not None:
        stats.delta_norm = math.sqrt(change_sq)
    return stats


def unmerge_tensor_(
    weight: torch.Tensor, updates: Sequence[LoraUpdate], norms: torch.Tensor | None = None, measure: bool = True
) -> TensorStats:
    """Remove ``updates`` from a merged ``weight`` in place: ``W ← round(W_merged − Σ ΔW)``.

    For DoRA the merge-time norms are required: ``W ← round(W_merged ⊙ ‖W + ΔW‖ / m − ΔW)``.
    ``stats.error_bound`` bounds the distance to the true base: half an ulp of the merged value plus
    half an ulp of the result (see the docs); ``stats.remerge_gap`` checks that re-merging lands back.

    ``measure=False`` computes the same result (bit for bit: the arithmetic is shared) without
    measuring anything, for callers that report none of it (a checkpoint unmerge without
    verification, the recovery a receipt is made from). Its statistics are NaN.
    """
    stats = TensorStats()
    if not updates:
        return stats
    dtype, cdt, w, factors, dora, on_rows = _prepare(weight, updates)
    if dora is not None and norms is None:
        raise ValueError("unmerging a DoRA update needs the norms ‖W + ΔW‖ recorded at merge time")
    change_sq = 0.0
    residual_sq = 0.0
    if not measure:
        stats.delta_norm = stats.residual_norm = stats.error_bound = stats.remerge_gap = math.nan
    for start, stop in _row_ranges(w.shape[0], w.shape[1]):
        chunk = w[start:stop]
        factor = None
        if dora is not None:
            assert norms is not None
            factor = _dora_factor(dora, norms.to(cdt).to(w.device), on_rows, start, stop)
        exact = _workspace(stop - start, w.shape[1], cdt, w.device)
        exact.copy_(chunk)  # exact: the compute dtype holds every value of the weight's
        if factor is not None:
            exact.div_(factor)
        for left, right in factors:  # W_merged − ΔW in the compute dtype (each product subtracted in the GEMM)
            exact.addmm_(left[start:stop], right, alpha=-1)
        if not measure:
            chunk.copy_(exact)  # the one rounding, straight into the weight
            continue
        merged = _workspace(stop - start, w.shape[1], dtype, w.device, slot=1).copy_(chunk)  # kept, as stored
        if factor is not None:  # DoRA: the change is measured element by element
            change_sq += float(torch.linalg.vector_norm(torch.sub(merged.to(cdt), exact)) ** 2)
        chunk.copy_(exact)  # the one rounding, straight into the weight
        back = _workspace(stop - start, w.shape[1], cdt, w.device, slot=2).copy_(chunk)
        residual_sq += float(torch.linalg.vector_norm(torch.sub(back, exact, out=exact)) ** 2)
        rounded = _workspace(stop - start, w.shape[1], dtype, w.device, slot=3)
        bound, gap = unmerged_rows_checks(chunk, merged, back, exact, rounded, factors, factor, start)
        stats.error_bound, stats.remerge_gap = max(stats.error_bound, bound), max(stats.remerge_gap, gap)
    if measure and dora is None:
        change_sq = _low_rank_norm(factors) ** 2
    if measure:
        stats.residual_norm = math.sqrt(residual_sq)
        stats.delta_norm = math.sqrt(change_sq)
    return stats
