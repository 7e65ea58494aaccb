"""Numerical verification: probes, wide-dtype references, the per-layer and whole-model checks.

Two kinds of evidence are gathered (see :mod:`loramerge.numerics.tolerance` for the rule):

* **per layer**, on random probe vectors: the merged layer's output, and adapter mode's output in
  the model's dtype, both against the layer's adapter-mode output computed in a wider dtype. This
  needs no copy of the model, so it runs for any model size.
* **whole model**, on probe inputs (seeded random token ids / pixels, or the caller's): the merged
  model's outputs, and adapter mode's, against adapter mode run in a wider dtype. The model is
  widened in place and narrowed back afterwards, which is exact (every bf16/fp16 value is an fp32
  value, every fp32 value an fp64 value); it costs the memory of the widened model, so ``"auto"``
  runs it only when that fits comfortably.

The parts live in :mod:`loramerge.proof.model_runs` (probes, runs, widening),
:mod:`loramerge.proof.layer_checks` (per layer) and :mod:`loramerge.proof.output_checks` (whole model); this
module holds :func:`verify`, which compares a merged model with its base and adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from loramerge.formats.adapter import ATTENTION, Adapter
from loramerge.numerics.delta import Kind, LoraUpdate
from loramerge.numerics.quantized import check_supported, checked_dequantize, keep_layout, quantized_layers
from loramerge.numerics.tolerance import Tolerance
from loramerge.preserve import preserved
from loramerge.proof.attention_checks import AttentionProbe
from loramerge.proof.layer_checks import (
    LayerProbe,
    loses_precision,
    oracle_check,
    oracle_only_check,
    peft_layer_output,
    weight_space_check,
)
from loramerge.proof.model_runs import CheckOutputs, Probes, make_probes, model_dtype, probe_batch, run_model
from loramerge.proof.output_checks import output_check, reference_outputs, storage_baseline
from loramerge.proof.reports import LayerCheck, OutputCheck, VerificationReport

__all__ = ["make_probes", "verify"]

logger = logging.getLogger(__name__)


def _dequantized_params(base: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A quantized base's parameters, bitsandbytes weights dequantized exactly (as fp32)."""
    out: dict[str, torch.Tensor] = {}
    qlayers = quantized_layers(base)
    for pname, p in base.named_parameters(remove_duplicate=False):
        module_name = pname.rpartition(".")[0]
        value = p.detach()
        if pname.endswith(".weight") and module_name in qlayers:
            value = checked_dequantize(qlayers[module_name], module_name, seed=seed)
        out[pname] = value
    return out


def verify(
    base: nn.Module,
    adapter: Adapter,
    merged: nn.Module,
    *,
    probes: Probes | None = None,
    tolerance: Tolerance | None = None,
    check_outputs: CheckOutputs = "auto",
    seed: int = 0,
) -> VerificationReport:
    """Check that ``merged`` is ``base`` with ``adapter`` merged in, within tolerance.

    Three checks: per adapted layer, ``W_merged - W_base`` against ΔW elementwise (in ulps of the
    merged dtype) and the layer's output on random probe vectors against the wide-dtype reference;
    every other tensor bit-identical to the base (or to the adapter's copy where the adapter
    replaces it); and the whole model's outputs on probe inputs against adapter mode (tolerance
    rule, see :class:`~loramerge.Tolerance`). ``base`` is used in adapter mode temporarily and
    restored exactly.

    Args:
        base: The base model (plain, not a ``PeftModel``).
        adapter: The adapter that was merged.
        merged: The merged model.
        probes: Inputs for the whole-model check (keyword arguments of ``model(...)``); seeded
            random inputs when omitted.
        tolerance: The rule's settings; :class:`~loramerge.Tolerance` defaults when omitted.
        check_outputs: Run the whole-model check: ``True``, ``False`` or ``"auto"`` (when the
            wide-dtype reference fits in a quarter of RAM and probes can be built).
        seed: Seed of the random probes.

    Returns:
        The report; ``report.passed`` says whether everything is within tolerance (this function
        does not raise on a failed check).

    Example:
        >>> report = verify(base, load_adapter(adapter_dir), merged)  # doctest: +SKIP
        >>> report.passed  # doctest: +SKIP
        True
    """
    with keep_layout(base), preserved(base, merged):
        return _verify(base, adapter, merged, probes, tolerance or Tolerance(), check_outputs, seed)


def _verify(
    base: nn.Module,
    adapter: Adapter,
    merged: nn.Module,
    probes: Probes | None,
    tol: Tolerance,
    check_outputs: CheckOutputs,
    seed: int,
) -> VerificationReport:
    from loramerge.plan.peft_glue import check_compatible  # peft: imported on first use

    kinds = check_compatible(base, adapter)
    check_compatible(merged, adapter)
    check_supported(base)
    quantized = bool(quantized_layers(base))
    if quantized:
        # attaching the adapter below takes a state dict, which makes bitsandbytes convert CPU-layout
        # weights back (changing them slightly): let that happen before anything is measured
        base.state_dict()
    base_params: dict[str, torch.Tensor] = (
        _dequantized_params(base, seed) if quantized else dict(base.named_parameters(remove_duplicate=False))
    )
    layers, touched = _layer_checks(base, adapter, merged, base_params, kinds, tol, seed, quantized)
    checked, changed = _unchanged(base, merged, adapter, base_params, touched, quantized)
    notes: list[str] = []
    outputs = _outputs(base, merged, adapter, base_params, quantized, probes, check_outputs, tol, seed, notes)
    passed = all(c.passed for c in layers) and not changed and (outputs is None or outputs.passed)
    return VerificationReport(
        operation="verify",
        passed=passed,
        tolerance=tol,
        layers=tuple(layers),
        outputs=outputs,
        unchanged_checked=checked,
        unexpected_changes=tuple(sorted(changed)),
        notes=tuple(notes),
    )


def _layer_checks(
    base: nn.Module,
    adapter: Adapter,
    merged: nn.Module,
    base_params: dict[str, torch.Tensor],
    kinds: Mapping[str, Kind],
    tol: Tolerance,
    seed: int,
    quantized: bool,
) -> tuple[list[LayerCheck], set[str]]:
    """Each adapted layer (and expert parameter) checked, and the names of the tensors they cover."""
    merged_params = dict(merged.named_parameters(remove_duplicate=False))
    from loramerge.plan.peft_glue import adapter_mode

    layers: list[LayerCheck] = []
    judged: list[tuple[LayerProbe, torch.Tensor]] = []
    touched: set[str] = set()
    for name, mod in adapter.modules.items():
        kind = kinds[name]
        update = LoraUpdate(
            kind, mod.update.lora_A, mod.update.lora_B, mod.scale, mod.update.magnitude, mod.update.bias
        )
        saved = adapter.replaced.get(f"{name}.weight")
        base_w = saved.to(base_params[f"{name}.weight"].dtype) if saved is not None else base_params[f"{name}.weight"]
        merged_w = merged_params[f"{name}.weight"]
        base_b: torch.Tensor | None = base_params.get(f"{name}.bias")
        if f"{name}.bias" in adapter.replaced:
            base_b = adapter.replaced[f"{name}.bias"].to(merged_w.dtype)
        merged_b = merged_params.get(f"{name}.bias")
        touched.update({f"{name}.weight", f"{name}.bias"})
        rel, max_ulp, reason = weight_space_check(kind, base_w, merged_w, [update], tol)
        probe = LayerProbe(name, kind, base_w, base_b.detach() if base_b is not None else None, [update], seed)
        out = probe.outputs(merged_w.detach(), merged_b.detach() if merged_b is not None else None)
        layers.append(probe.check(out, tol, rel, max_ulp, reason, probe.storage(merged_w)))
        judged.append((probe, out))
    variants = _variant_probes(base, adapter, merged_params, base_params, seed, touched)
    attentions = [n for n, v in adapter.variant_modules.items() if v == ATTENTION]
    if not quantized and (judged or variants or attentions):  # PEFT's own layers, attached as adapter mode runs them
        with adapter_mode(base, [adapter]) as peft_model:
            inner = cast(nn.Module, cast(Any, peft_model).base_model.model)
            oracles = [peft_layer_output(inner.get_submodule(p.name), p) for p, _ in judged]
            variant_oracles = [peft_layer_output(inner.get_submodule(p.name), p) for p, _, _ in variants]
            attention_probes = [AttentionProbe.of(n, inner.get_submodule(n), seed) for n in attentions]
        layers = [oracle_check(c, out, o) for c, (_, out), o in zip(layers, judged, oracles, strict=True)]
        for (probe, out, storage), oracle in zip(variants, variant_oracles, strict=True):
            layers.append(_variant_check(probe, out, oracle, tol, storage))
        for attention in attention_probes:  # the attention, probed whole (its weights: see weight_names)
            layers.append(attention.check(merged.get_submodule(attention.name), tol))
            touched.update(adapter.weight_names(attention.name))
    if adapter.parameter_factors:  # target_parameters: judged by PEFT's own wrapper on the base
        from loramerge.proof.param_checks import attached_checks

        experts = attached_checks(base, adapter, merged_params, tol, seed)
        layers += experts
        touched.update(c.name for c in experts)
    return layers, touched


def _variant_probes(
    base: nn.Module,
    adapter: Adapter,
    merged_params: Mapping[str, torch.Tensor],
    base_params: Mapping[str, torch.Tensor],
    seed: int,
    touched: set[str],
) -> list[tuple[LayerProbe, torch.Tensor, float]]:
    """Probes of the modules only PEFT's own layer merges, with the merged layer's outputs on them:
    such a layer is judged against PEFT's layer in adapter mode alone (no own math models it)."""
    from loramerge.plan.peft_glue import layer_kind

    found = []
    for name, variant in adapter.variant_modules.items():
        if variant == ATTENTION:
            continue  # probed whole, by loramerge.proof.attention_checks
        kind = layer_kind(base.get_submodule(name))
        assert kind is not None  # check_compatible refused the others
        bias = base_params.get(f"{name}.bias")
        merged_w, merged_b = merged_params[f"{name}.weight"].detach(), merged_params.get(f"{name}.bias")
        probe = LayerProbe(name, kind, base_params[f"{name}.weight"].detach(), _detached(bias), [], seed)
        found.append((probe, probe.outputs(merged_w, _detached(merged_b)), probe.storage(merged_w)))
        touched.add(f"{name}.weight")
    return found


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _variant_check(
    probe: LayerProbe, out: torch.Tensor, oracle: torch.Tensor | None, tol: Tolerance, storage: float
) -> LayerCheck:
    if oracle is not None:
        return oracle_only_check(probe, out, oracle, tol, storage)
    reason = "merged by PEFT's own layer, which cannot be run on probes here to judge it"
    dtype = str(probe.dtype).replace("torch.", "")
    return LayerCheck(
        probe.name, probe.kind, dtype, math.nan, math.nan, math.inf, math.nan, math.nan, 0.0, False, reason
    )


def _unchanged(
    base: nn.Module,
    merged: nn.Module,
    adapter: Adapter,
    base_params: dict[str, torch.Tensor],
    touched: set[str],
    quantized: bool,
) -> tuple[int, list[str]]:
    """How many other tensors were compared, and those that do not hold what adapter mode uses."""
    changed: list[str] = []
    checked = 0
    merged_state = merged.state_dict()
    # a dequantizing merge converts every tensor of a quantized base to the merged dtype
    base_state = base.state_dict() if not quantized else base_params
    token_rows = dict(adapter.token_rows)
    for pname, entry in adapter.token_rows.items():  # a tied output head looks the same rows up
        owner = base_params.get(pname)
        token_rows.update({n: entry for n, p in base_params.items() if owner is not None and p is owner})
    for pname, tensor in base_state.items():
        if pname in touched:
            continue
        other = merged_state.get(pname)
        expected = adapter.replaced[pname].to(tensor.dtype) if pname in adapter.replaced else tensor
        if pname in token_rows:  # trainable tokens: PEFT's rows replace the base's
            ids, new_rows = token_rows[pname]
            expected = tensor.index_copy(0, ids.to(tensor.device), new_rows.to(tensor))
        if quantized and other is not None and expected.is_floating_point():
            expected = expected.to(other.dtype)
        checked += 1
        if other is None or other.shape != expected.shape or not torch.equal(other.to(expected.device), expected):
            changed.append(pname)
    return checked, changed


def _outputs(
    base: nn.Module,
    merged: nn.Module,
    adapter: Adapter,
    base_params: dict[str, torch.Tensor],
    quantized: bool,
    probes: Probes | None,
    check_outputs: CheckOutputs,
    tol: Tolerance,
    seed: int,
    notes: list[str],
) -> OutputCheck | None:
    """The whole-model check: the merged model against PEFT's adapter mode on the base."""
    from loramerge.plan.peft_glue import adapter_mode

    merged_params = dict(merged.named_parameters(remove_duplicate=False))
    outputs = None
    batch = probe_batch(base, check_outputs, probes, seed, notes)
    if batch is not None:
        routes: list[torch.Tensor] = []
        merged_out = run_model(merged, batch, routes)
        adapted = [merged_params[f"{name}.weight"] for name in adapter.modules]
        with adapter_mode(base, [adapter]) as peft_model:
            ref = reference_outputs(peft_model, batch)
        if ref.note:
            notes.append(ref.note)
        if quantized:  # judged in the merged dtype; tensors rounded by the conversion count as storage
            ref = dataclasses.replace(ref, dtype=model_dtype(merged))
            adapted += [
                merged_params[n]
                for n, v in base_params.items()
                if n in merged_params and loses_precision(v, merged_params[n].dtype)
            ]
        outputs = output_check(
            merged_out, ref, tol, batch, lambda: storage_baseline(merged, batch, adapted, seed), routes
        )
    return outputs
