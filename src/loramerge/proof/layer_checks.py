"""The per-layer checks: seeded probe vectors per layer, the layer's output computed exactly from
stored weights, the rounding a faithful merge may add, and the judgement against adapter mode
(loramerge's own reference and PEFT's own layer)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from loramerge.numerics.delta import Kind, LoraUpdate, dora_norms, view2d
from loramerge.numerics.layer_outputs import apply_weight
from loramerge.numerics.quantized import quantized_layers
from loramerge.numerics.tolerance import Tolerance, reference_dtype, relative_errors, ulp, unit_roundoff
from loramerge.preserve import preserved
from loramerge.proof.model_runs import _seed_for
from loramerge.proof.reports import LayerCheck
from loramerge.proof.widened_runs import widened

logger = logging.getLogger(__name__)

PROBES_PER_LAYER = 16


def _input_features(kind: Kind, weight: torch.Tensor) -> int:
    w = view2d(weight)
    return int(w.shape[0]) if kind in ("conv1d", "embedding") else int(w.shape[1])


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """A layer's bias (detached), or ``None``."""
    b = getattr(layer, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


def probe_inputs(name: str, kind: Kind, weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Seeded probe inputs for one layer: token ids for embeddings, vectors in the weight's dtype otherwise."""
    gen = torch.Generator().manual_seed(_seed_for(name, seed))
    if kind == "embedding":
        return torch.randint(0, weight.shape[0], (PROBES_PER_LAYER,), generator=gen).to(weight.device)
    x = torch.randn(PROBES_PER_LAYER, _input_features(kind, weight), generator=gen)
    return x.to(weight.dtype).to(weight.device)


def exact_layer_output(kind: Kind, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A layer's output on probe inputs ``x``, computed in the reference dtype of the weight's dtype."""
    rd = reference_dtype(weight.dtype)
    y = apply_weight(kind, weight, x if kind == "embedding" else x.to(rd), rd)
    return y + bias.to(rd) if bias is not None else y


def storage_rms(kind: Kind, stored: torch.Tensor, x: torch.Tensor, extra: torch.Tensor | None = None) -> float:
    """Expected RMS output error on probes ``x`` caused by rounding every element of ``stored``'s
    exact value to its dtype (independent rounding errors of ±½ulp: variance ulp²/12 each), plus
    ``extra``, a per-element variance in ``stored``'s layout (see :func:`merge_rounding_variance`)."""
    dtype = stored.dtype
    rd = reference_dtype(dtype)

    def ulp_squared(chunk: torch.Tensor) -> torch.Tensor:
        return ulp(chunk, dtype).to(rd).pow(2) / 12

    xx = x if kind == "embedding" else x.to(rd).pow(2)
    variance = apply_weight(kind, stored.detach(), xx, rd, ulp_squared)
    if extra is not None:
        variance = variance + apply_weight(kind, extra, xx, rd)
    return float(variance.double().mean().sqrt())


def merge_rounding_variance(kind: Kind, stored: torch.Tensor, updates: Sequence[LoraUpdate]) -> torch.Tensor | None:
    """Per-element variance of the rounding a faithful merge may add beyond storing ``W + ΔW``.

    loramerge computes ``ΔW`` exactly enough and rounds once; other tools (PEFT among them) compute
    ``ΔW`` in fp32 and, for embeddings, round it to the weight's dtype before adding it. Both are as
    faithful to adapter mode as a correctly rounded merge, so the per-layer check allows, per
    element and update, ``½ulp(ΔW)`` in the stored dtype (variance ulp²/12) and fp32 arithmetic of
    ``ΔW`` (``(r + 2) u₃₂ |s| (|B||A|)``, variance of a uniform error: bound²/3). DoRA's merged
    weight ``m ⊙ (W + ΔW) / ‖W + ΔW‖`` is a sum, a norm, a quotient and a product computed in fp32:
    three fp32 roundings of each element are allowed (bound ``3 u₃₂ |W'|``). ``None`` for fp64 weights.
    """
    if not updates or stored.dtype == torch.float64:
        return None
    u32 = unit_roundoff(torch.float32)
    if any(up.magnitude is not None for up in updates):
        return (3 * u32 * stored.detach().float()).pow(2) / 3
    total = torch.zeros(stored.shape, dtype=torch.float32, device=stored.device)
    for up in updates:
        delta = up.delta(tuple(stored.shape), torch.float32).to(stored.device)
        left, right = up.factors(torch.float32)
        bound = ((up.rank + 2) * u32 * abs(up.scale)) * (left.abs() @ right.abs()).reshape(stored.shape)
        total += ulp(delta, stored.dtype).pow(2) / 12 + bound.to(stored.device).pow(2) / 3
    return total


MAX_PROBE_OUTPUTS = 512


def output_subset(
    name: str, kind: Kind, weight: torch.Tensor, seed: int, max_outputs: int | None
) -> torch.Tensor | None:
    """A seeded sorted sample of at most ``max_outputs`` output features (``None``: all of them)."""
    w = view2d(weight)
    n_out = int(w.shape[0] if kind in ("linear", "conv") else w.shape[1])
    if max_outputs is None or n_out <= max_outputs:
        return None
    gen = torch.Generator().manual_seed(_seed_for(f"outputs:{name}", seed))
    return torch.randperm(n_out, generator=gen)[:max_outputs].sort().values.to(weight.device)


def restrict_weight(kind: Kind, weight: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The part of ``weight`` that produces the output features ``idx`` (a copy; ``idx=None``: all)."""
    if idx is None:
        return weight.detach()
    return weight.detach().index_select(0 if kind in ("linear", "conv") else 1, idx)


def restrict_vector(v: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    """A per-output-feature vector (bias, DoRA magnitude) restricted to ``idx``."""
    if v is None or idx is None:
        return None if v is None else v.detach()
    return v.detach().reshape(-1).index_select(0, idx.to(v.device))


def restrict_update(up: LoraUpdate, idx: torch.Tensor | None) -> LoraUpdate:
    """``up`` restricted to the output features ``idx`` (``lora_B``'s first dimension, for every kind)."""
    if idx is None:
        return up
    b = up.lora_B.detach().index_select(0, idx.to(up.lora_B.device))
    return LoraUpdate(
        up.kind, up.lora_A, b, up.scale, restrict_vector(up.magnitude, idx), restrict_vector(up.bias, idx)
    )


class LayerProbe:
    """Per-layer functional check of one weight on random probe vectors.

    Built from the layer *before* it changes: it records adapter mode's output in the weight's
    dtype and in the reference dtype. :meth:`check` then compares the changed layer's output.
    """

    def __init__(
        self,
        name: str,
        kind: Kind,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        updates: Sequence[LoraUpdate],
        seed: int = 0,
        max_outputs: int | None = None,
    ):
        self.name, self.kind, self.dtype = name, kind, weight.dtype
        self.idx = output_subset(name, kind, weight, seed, max_outputs)
        weight = restrict_weight(kind, weight, self.idx)
        bias = restrict_vector(bias, self.idx)
        updates = [restrict_update(up, self.idx) for up in updates]
        self.updates = updates
        self.ref_dtype = reference_dtype(weight.dtype)
        self.x = probe_inputs(name, kind, weight, seed)
        x_exact = self.x if kind == "embedding" else self.x.to(self.ref_dtype)
        self.x_exact = x_exact
        rd, lp = self.ref_dtype, weight.dtype
        base_ref = apply_weight(kind, weight, x_exact, rd)
        base_lp = apply_weight(kind, weight, self.x)
        if bias is not None:
            base_ref = base_ref + bias.to(rd)
            base_lp = base_lp + bias
        lora_ref = torch.zeros_like(base_ref)
        for up in updates:
            lora_ref = lora_ref + up.lora_output(x_exact, rd)
            if up.bias is not None:
                lora_ref = lora_ref + up.scale * up.bias.detach().to(rd)
        self.reference = base_ref + lora_ref
        self.adapter = (base_lp.float() + lora_ref.to(lp).float()).to(lp)
        dora = [up for up in updates if up.magnitude is not None]
        if dora:
            assert dora[0].magnitude is not None
            factor = dora[0].magnitude.detach().to(rd).reshape(-1) / dora_norms(dora[0], weight).to(rd)
            self.reference = (base_ref - (bias.to(rd) if bias is not None else 0) + lora_ref) * factor + (
                bias.to(rd) if bias is not None else 0
            )
            no_bias = base_lp - (bias if bias is not None else 0)
            self.adapter = (
                (no_bias.float() + lora_ref.to(lp).float()).to(lp) * factor.to(lp) + (bias if bias is not None else 0)
            ).to(lp)

    def outputs(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The output of a layer holding ``weight``/``bias`` on the probes, computed exactly (in the
        reference dtype), so that only the stored values, not the arithmetic, are compared."""
        w, b = restrict_weight(self.kind, weight, self.idx), restrict_vector(bias, self.idx)
        return exact_layer_output(self.kind, w, b, self.x_exact)

    def storage(self, weight: torch.Tensor, merge_rounding: bool = True) -> float:
        """:func:`storage_rms` of ``weight`` on these probes (and output features), with the rounding
        any faithful merge may add (:func:`merge_rounding_variance`) unless ``merge_rounding`` is
        false. That term only widens the limit: a layer within the limit without it is within it."""
        stored = restrict_weight(self.kind, weight, self.idx)
        extra = merge_rounding_variance(self.kind, stored, self.updates) if merge_rounding else None
        return storage_rms(self.kind, stored, self.x, extra)

    def check(
        self,
        value: torch.Tensor,
        tolerance: Tolerance,
        residual: float,
        max_ulp: float,
        extra_reason: str = "",
        storage: float = 0.0,
    ) -> LayerCheck:
        """Check ``value``, the changed layer's exact output on the probes (:meth:`outputs`).

        The layer passes when ``error <= factor * storage_error + floor / 4``: evaluated exactly, the
        stored weight may differ from adapter mode only by about the rounding that storing
        ``W + ΔW`` in its dtype costs anyway. ``storage`` is :func:`storage_rms` of the stored
        weight(s) involved.
        """
        err, _ = relative_errors(value, self.reference)
        a_err, _ = relative_errors(self.adapter, self.reference)
        ref_rms = float(self.reference.double().pow(2).mean().sqrt())
        s_err = storage / ref_rms if ref_rms > 0 else 0.0
        limit = tolerance.factor * s_err + tolerance.floor_for(self.dtype) / 4
        reasons = []
        if not math.isfinite(err) or err > limit:
            reasons.append(
                f"output error {err:.3g} on probe vectors exceeds the limit {limit:.3g} "
                f"(rounding W + ΔW to {self.dtype} explains {s_err:.3g}; adapter mode in {self.dtype}: {a_err:.3g})"
            )
        if extra_reason:
            reasons.append(extra_reason)
        return LayerCheck(
            name=self.name,
            kind=self.kind,
            dtype=str(self.dtype).replace("torch.", ""),
            residual=residual,
            max_ulp=max_ulp,
            probe_error=err,
            adapter_error=a_err,
            storage_error=s_err,
            limit=limit,
            passed=not reasons,
            reason="; ".join(reasons),
        )


def check_stored(
    probe: LayerProbe,
    value: torch.Tensor,
    tolerance: Tolerance,
    residual: float,
    max_ulp: float,
    reason: str,
    weight: torch.Tensor,
) -> LayerCheck:
    """:meth:`LayerProbe.check` with the storage allowance of ``weight``: the term for the rounding a
    faithful merge may add (which only widens the limit) is computed only when the layer fails
    without it, so the verdict is the one the full allowance gives."""
    check = probe.check(value, tolerance, residual, max_ulp, reason, probe.storage(weight, merge_rounding=False))
    if check.passed:
        return check
    return probe.check(value, tolerance, residual, max_ulp, reason, probe.storage(weight))


def peft_layer_output(module: nn.Module, probe: LayerProbe) -> torch.Tensor | None:
    """What PEFT's own LoRA layer (``module``, the wrapper adapter mode runs, with its active
    adapters) computes on ``probe``'s inputs, run in the probe's reference dtype and restricted to
    its output features: an oracle that shares no code with loramerge's merge math.

    A convolution's probes are flattened patches: each is given to the layer as an image of exactly
    one kernel, with the padding of the layer and its LoRA convolutions set to zero for the call, so
    that its one output position is the patch's product. ``None`` where the layer cannot be run this
    way (dilated, grouped or non-zero-padded convolutions, and quantized base layers, whose weights
    cannot be widened).
    """
    if quantized_layers(module):
        return None
    x = probe.x_exact
    unpadded: list[tuple[Any, Any]] = []
    if probe.kind == "conv":
        base = cast(Any, module).get_base_layer()
        if any(d != 1 for d in base.dilation) or base.groups != 1 or base.padding_mode != "zeros":
            return None
        x = x.reshape(x.shape[0], base.in_channels, *base.kernel_size)
        convs = [base, *cast(Any, module).lora_A.values(), *cast(Any, module).lora_B.values()]
        unpadded = [(c, c.padding) for c in convs if isinstance(c, nn.modules.conv._ConvNd)]
    try:
        for conv, _ in unpadded:
            conv.padding = (0,) * len(conv.kernel_size)
        with widened(module, probe.ref_dtype), torch.no_grad(), preserved(module):
            module.eval()
            out = cast(torch.Tensor, module(x)).to(probe.ref_dtype)
    finally:
        for conv, padding in unpadded:
            conv.padding = padding
    if probe.kind == "conv":
        out = out.reshape(out.shape[0], -1)  # one output position: [probes, out channels]
    if probe.idx is not None:
        out = out.index_select(-1, probe.idx.to(out.device))
    return out


def oracle_check(check: LayerCheck, value: torch.Tensor, oracle: torch.Tensor | None) -> LayerCheck:
    """``check`` (from :meth:`LayerProbe.check`) also judged against PEFT's own layer output
    (:func:`peft_layer_output`), under the same limit: a mistake shared by loramerge's merge and its
    own reference (a scale, a layout) cannot pass both."""
    if oracle is None:
        return check
    err, _ = relative_errors(value, oracle)
    if math.isfinite(err) and err <= check.limit:
        return check
    reason = (
        f"output error {err:.3g} against PEFT's own LoRA layer exceeds the limit {check.limit:.3g}: loramerge's "
        "merge and PEFT's adapter mode disagree on this layer"
    )
    return dataclasses.replace(check, passed=False, reason="; ".join(r for r in (check.reason, reason) if r))


def oracle_only_check(
    probe: LayerProbe, value: torch.Tensor, oracle: torch.Tensor, tolerance: Tolerance, storage: float
) -> LayerCheck:
    """The per-layer check of a layer merged by PEFT's own layer (a variant loramerge does not
    model): judged against PEFT's adapter-mode layer alone, allowing ``factor`` times the rounding of
    storing the merged weight plus a quarter of the floor."""
    err, _ = relative_errors(value, oracle)
    ref_rms = float(oracle.double().pow(2).mean().sqrt())
    s_err = storage / ref_rms if ref_rms > 0 else 0.0
    limit = tolerance.factor * s_err + tolerance.floor_for(probe.dtype) / 4
    ok = math.isfinite(err) and err <= limit
    reason = "" if ok else f"output error {err:.3g} against PEFT's own LoRA layer exceeds the limit {limit:.3g}"
    return LayerCheck(
        probe.name,
        probe.kind,
        str(probe.dtype).replace("torch.", ""),
        math.nan,
        math.nan,
        err,
        math.nan,
        s_err,
        limit,
        ok,
        reason,
    )


def weight_space_check(
    kind: Kind, base_w: torch.Tensor, merged_w: torch.Tensor, updates: Sequence[LoraUpdate], tolerance: Tolerance
) -> tuple[float, float, str]:
    """Compare ``merged_w`` with ``base_w + ΔW`` (or the DoRA weight) elementwise, in fp32/fp64."""
    cdt = torch.float64
    base = base_w.detach().to(cdt)
    expected = base.clone()
    slack_terms = torch.zeros_like(base)
    cols = view2d(base).shape[1]
    for up in updates:
        expected += up.delta(base.shape, cdt)
        left, right = up.factors(cdt)
        slack_terms += (abs(up.scale) * (left.abs() @ right.abs())).reshape(base.shape) * (up.rank + 2)
    dora = [up for up in updates if up.magnitude is not None]
    if dora:
        assert dora[0].magnitude is not None
        norms = dora_norms(dora[0], base_w).to(cdt)
        factor = dora[0].magnitude.detach().to(cdt).reshape(-1) / norms
        on_rows = kind in ("linear", "conv")
        shaped = factor.reshape(-1, *([1] * (base.dim() - 1))) if on_rows else factor.reshape(1, -1)
        expected = expected * shaped
        slack_terms = slack_terms * shaped.abs() + expected.abs() * (math.sqrt(cols) + 4)
    residual = merged_w.detach().to(cdt) - expected
    change = float((expected - base).norm())
    rel = float(residual.norm()) / change if change > 0 else float(residual.norm())
    # Whoever merged computed ΔW in at least fp32: allow fp32 arithmetic error on top of the rounding,
    # and ΔW rounded to the merged dtype before it was added (PEFT does that for embeddings): ½ulp(ΔW).
    slack = 2 * unit_roundoff(torch.float32) * slack_terms
    if not dora:
        slack = slack + 0.5 * ulp(expected - base, merged_w.dtype).to(cdt)
    spacing = ulp(expected, merged_w.dtype).to(cdt)
    beyond = (residual.abs() - slack).clamp_min(0) / spacing
    max_ulp = float(beyond.max()) if beyond.numel() else 0.0
    allowed = tolerance.ulp * spacing + slack
    bad = residual.abs() > allowed
    reason = ""
    if not bool(torch.isfinite(residual).all()):
        reason = "the merged weight holds non-finite values"
    elif bool(bad.any()):
        where = int(bad.sum())
        reason = (
            f"W_merged - W_base differs from the adapter's update in {where} of {bad.numel()} elements, by up to "
            f"{max_ulp:.3g} ulp (allowed {tolerance.ulp:g}); wrong scale, transposed update, corrupted tensor or another base?"
        )
    return rel, max_ulp, reason


def loses_precision(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether converting ``value`` to ``dtype`` rounds any element."""
    if not value.is_floating_point() or value.dtype == dtype:
        return False
    return not torch.equal(value.to(dtype).to(value.dtype), value)
