"""Typed, frozen results of every operation: what was done and how well it was verified."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from loramerge.numerics.tolerance import Tolerance

__all__ = ["LayerCheck", "OutputCheck", "VerificationReport"]

Operation = Literal["merge", "unmerge", "verify"]


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class LayerCheck:
    """Verification of one adapted weight.

    Attributes:
        name: Module path, e.g. ``"model.layers.0.self_attn.q_proj"``.
        kind: Layer kind (``linear``, ``conv1d``, ``embedding``, ``conv``).
        dtype: The weight's dtype.
        residual: ‖W_merged − (W_base + ΔW)‖ / ‖ΔW‖ computed in fp32: how much of the update was
            lost to rounding (0 for an exact fp32 merge; bf16 can lose a visible fraction of a tiny
            update). For an unmerge: the same for the subtraction.
        max_ulp: Measured by :func:`~loramerge.verify` only: the largest elementwise difference
            between ``W_merged`` and ``W_base + ΔW``, in units in the last place of the merged
            dtype, beyond the fp32 arithmetic error any merger's computation of ΔW may have (0.5
            for a correctly rounded merge). NaN in merge/unmerge reports, whose rounding is to
            nearest by construction.
        probe_error: Relative RMS error of the layer's output on random probe vectors, computed
            exactly (in the wide dtype) from the stored weight, against adapter mode's layer output
            computed exactly.
        adapter_error: Adapter mode's own error when run in the model's dtype (for context).
        storage_error: The relative RMS output error expected from storing the weight in its
            dtype at all (each element rounded to the nearest representable value): an error no
            merge can avoid.
        limit: The largest ``probe_error`` allowed: ``factor * storage_error + floor / 4`` (the
            layer is evaluated exactly, so only its stored values are judged).
        passed: Whether this layer is within tolerance.
        reason: Why it failed (empty when it passed).
    """

    name: str
    kind: str
    dtype: str
    residual: float
    max_ulp: float
    probe_error: float
    adapter_error: float
    storage_error: float
    limit: float
    passed: bool
    reason: str = ""

    @property
    def margin(self) -> float:
        """``probe_error / limit``: below 1 passes; the higher, the worse."""
        return self.probe_error / self.limit if self.limit > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "residual": _num(self.residual),
            "max_ulp": _num(self.max_ulp),
            "probe_error": _num(self.probe_error),
            "adapter_error": _num(self.adapter_error),
            "storage_error": _num(self.storage_error),
            "limit": _num(self.limit),
            "passed": self.passed,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class OutputCheck:
    """Whole-model functional check on probe inputs.

    Errors are relative to the reference output (adapter mode run in ``reference_dtype``): RMS
    error over RMS of the reference, and largest error over largest reference value.

    Attributes:
        dtype: The model's compute dtype.
        reference_dtype: The dtype of the reference run.
        probe_shape: Shape of the probe batch.
        merged_error: Relative RMS error of the merged (or recovered) model.
        adapter_error: Relative RMS error of adapter mode in ``dtype``.
        storage_error: Relative RMS change of the merged model's outputs under random
            rounding-sized (±½ulp) perturbations of its adapted weights: the error that storing
            ``W + ΔW`` in ``dtype`` costs any merge (adapter mode keeps ΔW in its LoRA weights).
            Measured only when the merge would fail without it (NaN otherwise).
        limit: The limit on ``merged_error``: ``factor * hypot(adapter_error, storage_error) + floor``.
        merged_max_error: Relative max error of the merged model.
        adapter_max_error: Relative max error of adapter mode.
        storage_max_error: Relative max change under the rounding-sized perturbation.
        max_abs_diff: Largest absolute difference between merged and adapter-mode outputs.
        output_scale: Largest absolute value of the reference output.
        passed: ``merged_error <= limit`` (and everything finite). The max errors are reported,
            not judged: the largest single-output deviation is dominated by where the network
            happens to amplify rounding and changes from one random draw to the next.
        rerouted_positions: Mixture-of-experts models: probe positions left out of the
            comparison because a router there chose other experts than in the reference run (a
            rounding-sized difference at a near-tie flips a discrete choice), with every later
            position of the same sequence. At most half of the positions are left out;
            beyond that everything is judged.
    """

    dtype: str
    reference_dtype: str
    probe_shape: tuple[int, ...]
    merged_error: float
    adapter_error: float
    storage_error: float
    limit: float
    merged_max_error: float
    adapter_max_error: float
    storage_max_error: float
    max_abs_diff: float
    output_scale: float
    passed: bool
    rerouted_positions: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            k: (list(v) if isinstance(v, tuple) else _num(v) if isinstance(v, float) else v)
            for k, v in self.__dict__.items()
        }


@dataclass(frozen=True)
class VerificationReport:
    """The verdict of a verification and the numbers behind it.

    Attributes:
        operation: ``"merge"``, ``"unmerge"`` or ``"verify"``.
        passed: Every check within tolerance.
        tolerance: The tolerance used.
        layers: One :class:`LayerCheck` per adapted weight.
        outputs: The whole-model check, or ``None`` when it was not run (see ``notes``).
        unchanged_checked: Number of tensors that must be unchanged and were compared bit for bit.
        unexpected_changes: Names of tensors that should be unchanged but differ.
        notes: Remarks (checks skipped and why, weights untied, ...).
    """

    operation: Operation
    passed: bool
    tolerance: Tolerance
    layers: tuple[LayerCheck, ...]
    outputs: OutputCheck | None
    unchanged_checked: int = 0
    unexpected_changes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def failures(self) -> tuple[str, ...]:
        """One line per failed check, naming the layer or tensor."""
        lines = [f"layer {c.name}: {c.reason}" for c in self.layers if not c.passed]
        if self.outputs is not None and not self.outputs.passed:
            o = self.outputs
            lines.append(
                f"model outputs: relative error {o.merged_error:.3g} exceeds the limit {o.limit:.3g} (adapter mode "
                f"{o.adapter_error:.3g}, storage rounding {o.storage_error:.3g}) against the {o.reference_dtype} reference"
            )
        lines += [f"tensor {n}: changed but should be identical to the base" for n in self.unexpected_changes]
        return tuple(lines)

    def worst(self, n: int = 5) -> tuple[LayerCheck, ...]:
        """The ``n`` layers closest to (or furthest past) their limit."""
        return tuple(sorted(self.layers, key=lambda c: -c.margin)[:n])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the whole report."""
        return {
            "operation": self.operation,
            "passed": self.passed,
            "tolerance": self.tolerance.to_dict(),
            "outputs": self.outputs.to_dict() if self.outputs is not None else None,
            "layers": [c.to_dict() for c in self.layers],
            "unchanged_checked": self.unchanged_checked,
            "unexpected_changes": list(self.unexpected_changes),
            "notes": list(self.notes),
            "failures": list(self.failures),
        }

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        t = self.tolerance
        floor = "per-dtype" if t.floor is None else f"{t.floor:g}"
        lines = [f"loramerge {self.operation} verification: {verdict}  (tolerance: factor {t.factor:g}, floor {floor})"]
        if self.outputs is not None:
            o = self.outputs
            lines.append(
                f"  model outputs ({o.dtype}, reference {o.reference_dtype}, probes {list(o.probe_shape)}): "
                f"rel. error {o.merged_error:.3g} (adapter mode {o.adapter_error:.3g}, storage rounding "
                f"{_fmt(o.storage_error)}, limit {o.limit:.3g}); max {o.merged_max_error:.3g} "
                f"(adapter mode {o.adapter_max_error:.3g}); "
                f"largest |merged - adapter| {o.max_abs_diff:.3g} on scale {o.output_scale:.3g}"
            )
            if o.rerouted_positions:
                lines.append(
                    f"  {o.rerouted_positions} probe position(s) left out: a mixture-of-experts router chose other "
                    "experts there than in the reference run (a near-tie flipped by rounding)"
                )
        if self.layers:
            bad = sum(not c.passed for c in self.layers)
            lines.append(f"  layers: {len(self.layers) - bad}/{len(self.layers)} within tolerance; worst:")
            lines.append(
                f"    {'layer':<56} {'dtype':<9} {'residual':>9} {'max ulp':>8} {'error':>9} {'adapter':>9} {'limit':>9}  ok"
            )
            for c in self.worst(8):
                lines.append(
                    f"    {c.name[-56:]:<56} {c.dtype:<9} {c.residual:>9.3g} {_fmt(c.max_ulp):>8} {c.probe_error:>9.3g} "
                    f"{c.adapter_error:>9.3g} {c.limit:>9.3g}  {'yes' if c.passed else 'NO'}"
                )
        if self.unchanged_checked:
            lines.append(
                f"  unchanged tensors: {self.unchanged_checked - len(self.unexpected_changes)}/{self.unchanged_checked} identical"
            )
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  FAIL: {f}" for f in self.failures]
        return "\n".join(lines)
