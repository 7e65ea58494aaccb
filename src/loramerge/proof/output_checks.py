"""The whole-model check: adapter mode's outputs in the model's dtype and widened (the reference),
the storage-rounding baseline, and the tolerance rule applied to a merged model's outputs."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loramerge.errors import LoraMergeError
from loramerge.numerics.requantize import exact_forward
from loramerge.numerics.tolerance import Tolerance, reference_dtype, relative_errors, ulp
from loramerge.proof.model_runs import Probes, _seed_for, model_dtype, recorded_routes, run_model
from loramerge.proof.reports import OutputCheck
from loramerge.proof.widened_runs import Perturb, run_widened

logger = logging.getLogger(__name__)


@dataclass
class ModelReference:
    """Adapter-mode outputs on the probes: in the model's dtype and in the reference dtype.

    ``narrow`` names the modules the reference had to run in the model's own dtype (no kernel for
    the reference dtype); ``note`` says so for a report.
    """

    adapter: torch.Tensor
    reference: torch.Tensor
    dtype: torch.dtype
    reference_dtype: torch.dtype
    narrow: tuple[str, ...] = ()
    routes: tuple[torch.Tensor, ...] = ()  # the experts MoE routers chose in the reference run

    @property
    def note(self) -> str:
        """A report note about modules that could not run in the reference dtype ('' when none)."""
        if not self.narrow:
            return ""
        shown = ", ".join(self.narrow[:6]) + (f" and {len(self.narrow) - 6} more" if len(self.narrow) > 6 else "")
        return (
            f"reference: {len(self.narrow)} module(s) ran in {str(self.dtype).replace('torch.', '')} because torch has "
            f"no {str(self.reference_dtype).replace('torch.', '')} kernel for them: {shown}"
        )


def reference_outputs(model: nn.Module, probes: Probes) -> ModelReference:
    """Run ``model`` (in adapter mode) on ``probes`` in its own dtype and, widened, in the reference dtype.

    bitsandbytes layers compute with their dequantized weight, exactly, in the widened run
    (:func:`loramerge.numerics.quantized.exact_forward`).
    """
    dtype = model_dtype(model)
    ref_dtype = reference_dtype(dtype)
    adapter_out = run_model(model, probes)
    narrow: set[str] = set()
    routes: list[torch.Tensor] = []
    with exact_forward(model):
        try:
            with recorded_routes(model) as routes:
                ref = run_widened(model, probes, ref_dtype, fallbacks=narrow)
        except RuntimeError as e:
            if ref_dtype != torch.float64:
                raise
            # Some architectures hard-code fp32 somewhere; fall back to an fp32 reference (then the floor decides).
            logger.info("fp64 reference failed (%s); using fp32", e)
            ref_dtype = torch.float32
            routes = []
            ref = run_model(model, probes, routes)
    return ModelReference(adapter_out, ref.to(ref_dtype), dtype, ref_dtype, tuple(sorted(narrow)), tuple(routes))


def same_route_positions(
    routes: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], probes: Probes, output_shape: torch.Size
) -> torch.Tensor | None:
    """A ``[batch, seq]`` mask of the probe positions where every router chose the same experts as
    in the reference run, and no earlier position of the sequence was routed otherwise (later
    positions attend to it). ``None`` when the routes cannot be matched to positions, nothing was
    rerouted, or more than half of the positions were (then everything is judged)."""
    ids = probes.get("input_ids")
    if ids is None or ids.dim() != 2 or len(routes) != len(reference) or not routes:
        return None
    batch, seq = ids.shape
    if tuple(output_shape[:2]) != (batch, seq):
        return None
    rerouted = torch.zeros(batch * seq, dtype=torch.bool)
    for got, want in zip(routes, reference, strict=True):
        if got.shape != want.shape or got.shape[0] != batch * seq:
            return None
        rerouted |= (got != want).any(dim=-1)
    if not bool(rerouted.any()):
        return None
    keep = ~(rerouted.view(batch, seq).long().cummax(dim=1).values.bool())
    return keep if int((~keep).sum()) * 2 <= batch * seq else None


def storage_baseline(
    model: nn.Module, probes: Probes, weights: Sequence[torch.Tensor], seed: int = 0
) -> tuple[float, float]:
    """How much the model's outputs move when ``weights`` are perturbed by random rounding-sized noise.

    Storing ``W + ΔW`` in a 16-bit dtype rounds every element by up to ½ulp; adapter mode avoids
    part of that (its LoRA weights usually stay fp32). This measures the unavoidable effect
    independently of whether the stored values are right: the model is run widened once as is and
    once with uniform ±½ulp noise added to (widened copies of) ``weights``. The weights themselves
    are never changed.

    Returns:
        ``(relative RMS change, relative max change)`` of the main output.
    """
    dtype = weights[0].dtype if weights else model_dtype(model)
    ref_dtype = reference_dtype(dtype)
    ids = {id(w): i for i, w in enumerate(weights)}

    def noise(i: int) -> Perturb:
        def add(wide: torch.Tensor, stored: torch.Tensor) -> None:
            gen = torch.Generator().manual_seed(_seed_for(f"storage-noise-{i}", seed))
            n = torch.rand(wide.shape, generator=gen, dtype=wide.dtype).sub_(0.5).to(wide.device)
            wide.add_(n.mul_(ulp(stored, stored.dtype).to(wide.dtype)))

        return add

    clean = run_widened(model, probes, ref_dtype)
    noisy = run_widened(model, probes, ref_dtype, {k: noise(i) for k, i in ids.items()})
    return relative_errors(noisy, clean)


def output_check(
    merged: torch.Tensor,
    ref: ModelReference,
    tolerance: Tolerance,
    probes: Probes,
    storage: Callable[[], tuple[float, float]] | None = None,
    routes: Sequence[torch.Tensor] = (),
) -> OutputCheck:
    """Apply the tolerance rule to whole-model outputs.

    The rule allows ``factor * adapter error + floor``; when the merged error is above that and
    ``storage`` is given, the storage-rounding baseline (:func:`storage_baseline`, a callable
    because it costs two wide forward passes) is measured and the limit becomes
    ``factor * hypot(adapter error, storage error) + floor``. The baseline can only widen the
    limit, so it is skipped (reported as NaN) when the merge passes without it.

    ``routes`` (what the merged model's MoE routers chose, see :func:`recorded_routes`): positions
    routed otherwise than in the reference run are left out (:func:`same_route_positions`).
    """
    if merged.shape != ref.reference.shape:
        raise LoraMergeError(
            f"merged output shape {tuple(merged.shape)} differs from adapter mode's {tuple(ref.reference.shape)}"
        )
    keep = same_route_positions(routes, ref.routes, probes, merged.shape)
    rerouted = 0
    if keep is not None:
        rerouted = int((~keep).sum())
        merged = merged[keep]
        ref = dataclasses.replace(ref, adapter=ref.adapter[keep], reference=ref.reference[keep])
    m_rms, m_max = relative_errors(merged, ref.reference)
    a_rms, a_max = relative_errors(ref.adapter, ref.reference)
    s_rms, s_max = math.nan, math.nan
    limit = tolerance.limit(a_rms, ref.dtype)
    if not m_rms <= limit and storage is not None and math.isfinite(m_rms):
        s_rms, s_max = storage()
        limit = tolerance.limit(math.hypot(a_rms, s_rms), ref.dtype)
    shape = next(iter(probes.values())).shape
    ok = math.isfinite(m_rms) and math.isfinite(m_max) and m_rms <= limit
    return OutputCheck(
        dtype=str(ref.dtype).replace("torch.", ""),
        reference_dtype=str(ref.reference_dtype).replace("torch.", ""),
        probe_shape=tuple(int(s) for s in shape),
        merged_error=m_rms,
        adapter_error=a_rms,
        storage_error=s_rms,
        limit=limit,
        merged_max_error=m_max,
        adapter_max_error=a_max,
        storage_max_error=s_max,
        max_abs_diff=float(torch.linalg.vector_norm(merged.float() - ref.adapter.float(), ord=math.inf)),
        output_scale=float(ref.reference.abs().max()),
        passed=ok,
        rerouted_positions=rerouted,
    )
