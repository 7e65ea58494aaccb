"""In-memory merge on ``nn.Module``\\ s, verified by default.

``merge`` folds the LoRA updates of a ``PeftModel`` into its base weights in place and returns the
plain model; :mod:`loramerge.operations.inmemory_unmerge` removes a *saved* adapter's updates again. Both
only change weights after every check that can be made beforehand has passed (shapes,
finiteness, overflow, recoverability), and both verify the result against adapter mode.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from peft import PeftModel
from torch import nn

from loramerge.engine.inmemory_common import (
    FileMappings,
    QuantizedMode,
    _merge_quantized,
    _merged_bias,
    _merged_check,
    _quant_plan,
    _raise_problems,
    _receipt_originals,
    _record_receipt,
    _replace_module,
    _requantized_check,
    _requantized_output_check,
    _token_check,
    _unverified,
    _verification_crashed,
)
from loramerge.errors import (
    AdapterMismatchError,
    InvalidArgumentError,
    LoraMergeError,
    UnsupportedAdapterError,
    VerificationError,
)
from loramerge.formats.adapter import Adapter
from loramerge.formats.lineage_records import (
    adapter_fingerprint,
    lineage,
    new_round,
    set_model_lineage,
)
from loramerge.formats.receipts import Receipt
from loramerge.numerics.delta import LoraUpdate, TensorStats, check_updates, merge_tensor_
from loramerge.numerics.quantized import (
    checked_dequantize,
    compute_dtype,
    dequantized_linear,
    forget_quantization,
    keep_layout,
    quantized_layers,
)
from loramerge.numerics.tolerance import Tolerance, relative_errors
from loramerge.plan.param_targets import ParamPlan, merge_param_, param_plans, param_problems
from loramerge.plan.peft_glue import attach, unwrap
from loramerge.plan.peft_plans import LayerPlan, collect_plans, peft_merged, untie_shared
from loramerge.preserve import ModuleFlags, preserved
from loramerge.proof.layer_checks import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
    bias_of,
    loses_precision,
    peft_layer_output,
)
from loramerge.proof.model_runs import CheckOutputs, Probes, probe_batch, run_model
from loramerge.proof.output_checks import ModelReference, output_check, reference_outputs, storage_baseline
from loramerge.proof.param_checks import ParamOracle, check_param
from loramerge.proof.reports import LayerCheck, MergeResult, VerificationReport

__all__ = ["merge"]

logger = logging.getLogger(__name__)


def merge(
    model: nn.Module,
    adapters: Adapter | Sequence[Adapter] | None = None,
    *,
    adapter_names: Sequence[str] | None = None,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    probes: Probes | None = None,
    check_outputs: CheckOutputs = "auto",
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    quantized: QuantizedMode = "dequantize",
    receipt: bool = False,
) -> MergeResult:
    """Merge LoRA adapters into the base weights, in place, and verify the result.

    Each weight becomes ``round(W + ΔW₁ + ΔW₂ + ...)``: the updates are computed and summed in
    fp32 and rounded once to the weight's dtype (DoRA: ``round(m ⊙ (W + ΔW) / ‖W + ΔW‖)``). Large
    weights are processed in row chunks, so no second copy of the model is made. Non-finite results
    and overflow of the dtype are detected for every layer before any weight is changed.

    A bitsandbytes 4-bit (nf4/fp4, with or without double quantization) or 8-bit base (QLoRA) is
    dequantized exactly (each layer's dequantized weight is checked against the layer's own
    forward) and the result is a plain ``dtype`` model (default bfloat16) whose outputs match the
    QLoRA model's adapter mode under the tolerance rule. ``quantized="requantize"`` instead puts
    each merged weight back into its layer's bitsandbytes format and reports what that cost; see
    :doc:`/qlora`.

    Args:
        model: A ``PeftModel`` (from :func:`~loramerge.attach`, PEFT's ``get_peft_model`` or
            ``PeftModel.from_pretrained``), or a plain model together with ``adapters``.
        adapters: Adapters to attach first (in order) when ``model`` is a plain model.
        adapter_names: Which attached adapters to merge, in order; default: the active ones.
        verify: Verify the merge (default). Costs a few forward passes; see ``check_outputs``.
        tolerance: Settings of the tolerance rule; defaults when omitted.
        probes: Inputs for the whole-model check (``model(**probes)``); seeded random otherwise.
        check_outputs: ``"auto"`` (default) runs the whole-model check when the wide-dtype copy of
            the largest module fits in a quarter of RAM (the reference widens one module at a time);
            per-layer checks always run when ``verify``.
        seed: Seed of the random probes.
        dtype: Quantized bases only: the dtype of the dequantized merged model (default bfloat16).
        quantized: Quantized bases only: ``"dequantize"`` (default) or ``"requantize"``.
        receipt: Also return (``result.receipt``) what :func:`~loramerge.unmerge` needs to restore
            the base bit for bit (one adapter at a time; costs one extra unmerge per tensor).

    The merge is recorded in the model's lineage (``model.config.loramerge_lineage``, written to
    ``config.json`` by ``save_pretrained``; read it with :func:`~loramerge.lineage`).

    Returns:
        The plain merged model (the same object, PEFT wrappers removed) and the report.

    Raises:
        NonFiniteMergeError: Some merged weight would be non-finite or overflow (nothing changed).
        AdapterMismatchError: ``adapters`` do not fit ``model``.
        UnsupportedAdapterError: An adapter uses a feature that cannot be merged exactly.
        UnsupportedQuantizationError: The base is quantized with a method other than bitsandbytes.
        VerificationError: The merged model is out of tolerance. The model has been changed;
            ``error.result`` holds it with the report.

    Example:
        >>> result = merge(model, load_adapter(adapter_dir))  # doctest: +SKIP
        >>> result.report.passed  # doctest: +SKIP
        True
    """
    was_plain = not isinstance(model, PeftModel)
    inner = cast(nn.Module, model.base_model.model) if isinstance(model, PeftModel) else model
    with preserved(inner) as flags:
        peft_model, attached = _attach_all(model, adapters)
        sources = {n: str(a.path) for n, a in attached.items() if a.path is not None}
        try:
            with keep_layout(peft_model):
                return _merge(
                    peft_model,
                    flags,
                    adapter_names,
                    verify,
                    tolerance or Tolerance(),
                    probes,
                    check_outputs,
                    seed,
                    dtype,
                    quantized,
                    receipt,
                    sources,
                )
        except Exception as e:
            if attached and was_plain and not isinstance(e, VerificationError):
                unwrap(peft_model)  # refused before any change: take off the adapters attached here, too
            raise


def _updates_by_name(
    plans: Sequence[LayerPlan], params: Sequence[ParamPlan], adapter: str | None = None
) -> dict[str, list[LoraUpdate]]:
    """Every adapted weight's and parameter's updates (of one ``adapter``, or all), by name."""
    found = {p.name: [u for a, u in p.updates if adapter in (None, a)] for p in plans}
    found.update({pp.path: [u for a, u in pp.fingerprinted() if adapter in (None, a)] for pp in params})
    return {name: ups for name, ups in found.items() if ups}


def _merge_params(params: Sequence[ParamPlan], mapped: FileMappings) -> None:
    """Merge every targeted parameter (``target_parameters``) in place."""
    for pp in params:
        if mapped.holds(pp.param):
            mapped.own_copy(pp.param)
        logger.debug("merged %s (|dW| %.3g)", pp.name, merge_param_(pp))


def _rounds(
    peft_model: PeftModel,
    names: Sequence[str],
    sources: Mapping[str, str],
    plans: Sequence[LayerPlan],
    params: Sequence[ParamPlan],
    report: VerificationReport,
    verify: bool,
) -> list[dict[str, Any]]:
    """The lineage entries of a merge: one round per adapter, in merge order (they can be unmerged
    one at a time, in reverse)."""
    dtype = next((p.weight.dtype for p in plans), next((pp.param.dtype for pp in params), ""))
    return [
        new_round(
            source=sources.get(n, f"attached adapter {n!r}"),
            fingerprint=adapter_fingerprint(_updates_by_name(plans, params, n)),
            config=peft_model.peft_config[n].to_dict(),
            scales={
                **{p.name: u.scale for p in plans for a, u in p.updates if a == n},
                **{pp.name: u.scale for pp in params for a, u in pp.updates() if a == n},
            },
            dtype=str(dtype).replace("torch.", ""),
            report=report if verify else None,
        )
        for n in names
    ]


def _attach_all(model: nn.Module, adapters: Adapter | Sequence[Adapter] | None) -> tuple[PeftModel, dict[str, Adapter]]:
    """``model`` with ``adapters`` attached in order (a ``PeftModel``), and the adapters by their names there."""
    attached: dict[str, Adapter] = {}
    if adapters is not None:
        for i, adapter in enumerate([adapters] if isinstance(adapters, Adapter) else list(adapters)):
            taken = set(model.peft_config) if isinstance(model, PeftModel) else set()
            name = "default" if "default" not in taken else f"adapter_{i}"
            while name in taken:
                name += "_"
            model = attach(model, adapter, name=name)
            attached[name] = adapter
    if not isinstance(model, PeftModel):
        raise AdapterMismatchError(
            f"merge() needs a PeftModel or adapters to attach; got a plain {type(model).__name__} and no adapters."
        )
    return model, attached


def _merge(
    peft_model: PeftModel,
    flags: ModuleFlags,
    adapter_names: Sequence[str] | None,
    verify: bool,
    tol: Tolerance,
    probes: Probes | None,
    check_outputs: CheckOutputs,
    seed: int,
    dtype: str | torch.dtype | None,
    quantized: QuantizedMode,
    want_receipt: bool,
    sources: Mapping[str, str],
) -> MergeResult:
    tuner = cast(Any, peft_model.base_model)
    names = list(adapter_names) if adapter_names is not None else list(peft_model.active_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise AdapterMismatchError(f"no adapter named {unknown} is attached; attached: {list(peft_model.peft_config)}")
    inner = cast(nn.Module, peft_model.base_model.model)
    qplan = _quant_plan(inner, dtype, quantized)
    plans, saved, tokens = collect_plans(peft_model, names)
    params = param_plans(inner, names)
    dora_quantized = sorted(p.name for p in plans if p.quantized and any(u.magnitude is not None for _, u in p.updates))
    if dora_quantized:
        raise UnsupportedAdapterError(
            f"DoRA on quantized layers is not supported yet: {dora_quantized}. Merge into the 16-bit base "
            "(loramerge.merge_checkpoint with qlora_base='original' or 'simulated')."
        )

    fingerprint = adapter_fingerprint(_updates_by_name(plans, params))
    receipt: Receipt | None = None
    if want_receipt:
        if tokens:
            raise InvalidArgumentError(
                f"receipt=True cannot record trainable tokens yet ({[t.name for t in tokens]}); merge without a receipt"
            )
        if len(names) != 1 or any(p.quantized or p.via_peft for p in plans) or params:
            raise InvalidArgumentError(
                "receipt=True needs exactly one adapter merged into a non-quantized base, without LoRA variants that "
                "PEFT's own layer merges and without target_parameters (merge adapters one at a time)"
            )
        receipt = Receipt(fingerprint)
        for module_name in saved:
            wrapper = cast(Any, inner.get_submodule(module_name))
            for pname, p in wrapper.original_module.named_parameters():
                receipt.originals[f"{module_name}.{pname}"] = p.detach().cpu().clone()
    notes: list[str] = []
    layer_probes: list[LayerProbe] = []
    oracles: dict[str, torch.Tensor | None] = {}
    peft_results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    base_errors: dict[str, float] = {}
    problems: list[str] = []
    if verify:
        previous = list(peft_model.active_adapters)
        tuner.set_adapter(names)
    for plan in plans:
        ups = [u for _, u in plan.updates]
        weight = plan.weight
        if plan.via_peft:  # merged by PEFT's own layer, now, on a widened copy: refused before any change
            module = inner.get_submodule(plan.name)
            peft_results[plan.name] = peft_merged(module, [a for a, _ in plan.updates], weight.dtype, plan.name)
            if not all(bool(torch.isfinite(t).all()) for t in peft_results[plan.name] if t is not None):
                problems.append(f"{plan.name}: PEFT's merge of this layer is not finite")
        elif plan.quantized:
            assert qplan is not None
            exact = checked_dequantize(plan.layer, plan.name, seed=seed)
            weight = exact.to(compute_dtype(plan.layer))  # exact: the layer computes in that dtype
            problems += [f"{plan.name}: {m}" for m in check_updates(ups, exact.to(qplan.store_dtype(plan.layer)))]
        else:
            problems += [f"{plan.name}: {m}" for m in check_updates(ups, weight)]
        if verify and not problems:
            own = [] if plan.via_peft else ups  # loramerge's own math does not model a variant
            probe = LayerProbe(plan.name, plan.kind, weight, bias_of(plan.layer), own, seed, MAX_PROBE_OUTPUTS)
            layer_probes.append(probe)
            if not plan.quantized:  # PEFT's own layer, as adapter mode runs it: the independent reference
                oracles[plan.name] = peft_layer_output(inner.get_submodule(plan.name), probe)
            if plan.via_peft and oracles[plan.name] is None:
                problems.append(f"{plan.name}: PEFT's layer cannot be run on probes to prove its merge")
            if plan.quantized and qplan is not None and qplan.mode == "requantize":
                base_errors[plan.name] = relative_errors(probe.outputs(weight, bias_of(plan.layer)), probe.reference)[0]
    problems += [m for pp in params for m in param_problems(pp)]
    param_oracles = {pp.name: ParamOracle.of(pp, seed) for pp in params} if verify and not problems else {}
    _raise_problems(problems, "merging")
    if qplan is not None and qplan.mode == "dequantize":  # every layer the merge dequantizes, proven before any change
        planned = {id(p.layer) for p in plans}
        for qname, qlayer in quantized_layers(inner).items():
            if id(qlayer) not in planned:
                checked_dequantize(qlayer, qname, seed=seed)

    model_ref: ModelReference | None = None
    batch: dict[str, torch.Tensor] | None = None
    base_out: torch.Tensor | None = None
    if verify:
        batch = probe_batch(inner, check_outputs, probes, seed, notes)
        if batch is not None:
            try:
                model_ref = reference_outputs(peft_model, batch)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise LoraMergeError(
                    f"the probe inputs could not run the model in adapter mode ({type(e).__name__}: {e}); nothing "
                    "was changed. Pass probes= that the model accepts, or check_outputs=False to rely on the "
                    "per-layer checks."
                ) from e
            if model_ref.note:
                notes.append(model_ref.note)
            if qplan is not None and qplan.mode == "requantize":
                with peft_model.disable_adapter():
                    base_out = run_model(peft_model, batch)
            elif qplan is not None:
                model_ref = dataclasses.replace(model_ref, dtype=qplan.target)
        tuner.set_adapter(previous)

    untied = untie_shared(inner, plans)
    mapped = FileMappings()
    if untied:
        notes.append(f"untied {untied} (they shared a merged weight; adapter mode does not change them)")
    stats = {}
    lost: dict[str, float] = {}
    dora_norms: dict[str, torch.Tensor] = {}
    for i, plan in enumerate(plans):
        ups = [u for _, u in plan.updates]
        if plan.quantized:
            assert qplan is not None
            new_layer, stats[plan.name], lost[plan.name] = _merge_quantized(plan, qplan, seed)
            flags.carry(plan.layer, new_layer)
            cast(Any, inner.get_submodule(plan.name)).base_layer = new_layer
            plans[i] = dataclasses.replace(plan, layer=new_layer, quantized=qplan.mode == "requantize")
            continue
        if plan.via_peft:
            new_weight, peft_bias = peft_results.pop(plan.name)
            with torch.no_grad():
                before = plan.weight.detach().float()
                plan.weight.copy_(new_weight)
                if peft_bias is not None:
                    cast(torch.Tensor, plan.layer.bias).copy_(peft_bias)
            stats[plan.name] = TensorStats(delta_norm=float((new_weight.float() - before).norm()))
            continue
        new_bias = _merged_bias(plan.layer, ups)
        originals = _receipt_originals(plan, new_bias) if receipt is not None else {}
        with torch.no_grad():
            if mapped.holds(plan.weight):  # copy-on-write pages of the loaded file: write into own memory
                mapped.own_copy(cast(torch.Tensor, plan.layer.weight))
            stats[plan.name] = merge_tensor_(plan.weight, ups)
            if new_bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_(new_bias.to(bias.dtype))
        if "dora_norms" in stats[plan.name].extras:
            dora_norms[plan.name] = stats[plan.name].extras["dora_norms"].detach().cpu()
        if receipt is not None:
            _record_receipt(receipt, plan, originals, dora_norms.get(plan.name))
    _merge_params(params, mapped)
    layers_extra: list[LayerCheck] = []
    for token_plan in tokens:  # PEFT's rows replace the base's, as its own merge writes them
        ids, rows = token_plan.rows()
        with torch.no_grad():  # the reference: the whole weight as PEFT's own layer computes it
            expected = token_plan.layer.get_merged_weights([token_plan.adapter]).detach().clone()
            token_plan.weight.index_copy_(0, ids, rows)
        rows_exact = bool(torch.equal(token_plan.weight, expected))
        layers_extra.append(_token_check(token_plan.name, token_plan.weight, rows_exact))
    plain = unwrap(peft_model, saved)
    narrowed: list[torch.Tensor] = []
    base_format = ""
    if qplan is not None and qplan.mode == "dequantize":
        for name, layer in quantized_layers(plain).items():  # the layers no adapter touched
            exact = checked_dequantize(layer, name, seed=seed)
            new_layer = dequantized_linear(layer, exact.to(qplan.target))
            flags.carry(layer, new_layer)
            _replace_module(plain, name, new_layer)
            if loses_precision(exact, qplan.target):
                narrowed.append(new_layer.weight)
        for p in plain.parameters():
            if p.is_floating_point() and p.dtype != qplan.target:
                if loses_precision(p.data, qplan.target):
                    narrowed.append(p)
                p.data = p.data.to(qplan.target)
        forget_quantization(plain, qplan.target)
        base_format = (
            f"{qplan.describe} ({qplan.layers} layers) -> dequantized to {str(qplan.target).replace('torch.', '')}"
        )
    elif qplan is not None:
        base_format = f"{qplan.describe} ({qplan.layers} layers) -> re-quantized"
        notes.append(
            "re-quantized: rounding to the 4/8-bit grid again cannot meet the tolerance rule; each layer and the model "
            "pass when closer to adapter mode than the base without the adapter (that error is the 'limit'); "
            "'residual' is the fraction of ΔW that re-quantization lost, ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖"
        )
    if qplan is not None:
        notes.append(f"quantized base: {base_format}")
    logger.info("merged %s into %d weights", names, len(plans))

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        try:
            for plan, probe in zip(plans, layer_probes, strict=True):
                if plan.quantized:  # re-quantized: judged against the base without the adapter
                    layers.append(_requantized_check(plan, probe, lost[plan.name], base_errors[plan.name]))
                else:
                    layers.append(_merged_check(plan, probe, oracles.get(plan.name), tol, stats[plan.name]))
            layers += [check_param(pp, param_oracles[pp.name], tol) for pp in params]
            if model_ref is not None and batch is not None:
                routes: list[torch.Tensor] = []
                with keep_layout(plain):  # re-quantized layers too
                    merged_out = run_model(plain, batch, routes)
                if base_out is not None:
                    outputs = _requantized_output_check(merged_out, model_ref, base_out)
                else:
                    weights = [p.weight for p in plans] + [pp.param for pp in params] + narrowed
                    outputs = output_check(
                        merged_out, model_ref, tol, batch, lambda: storage_baseline(plain, batch, weights, seed), routes
                    )
        except Exception as e:  # verification must not crash after the weights changed
            raise _verification_crashed(e, plain, names, tol, layers, notes, dora_norms, untied, base_format) from e
    else:
        notes.append("verification off (verify=False)")
        layers += _unverified(plans, stats, lost, params)
    layers += layers_extra
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("merge", passed, tol, tuple(layers), outputs, notes=tuple(notes))
    set_model_lineage(plain, [*lineage(plain), *_rounds(peft_model, names, sources, plans, params, report, verify)])
    result = MergeResult(
        plain,
        report,
        tuple(names),
        dora_norms,
        tuple(untied),
        verified=verify,
        base_format=base_format,
        receipt=receipt,
    )
    if not passed:
        raise VerificationError(
            "the merged model is out of tolerance (the model HAS been changed in place; error.result holds it):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result
