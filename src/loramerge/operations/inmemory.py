"""In-memory merge on ``nn.Module``\\ s, verified by default.

``merge`` folds the LoRA updates of a ``PeftModel`` into its base weights in place and returns the
plain model; :mod:`loramerge.operations.inmemory_unmerge` removes a *saved* adapter's updates again. Both
only change weights after every check that can be made beforehand has passed (shapes,
finiteness, overflow, recoverability), and both verify the result against adapter mode.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from peft import PeftModel
from torch import nn

from loramerge.engine.inmemory_common import (
    QuantizedMode,
    _quant_plan,
    _unverified,
    _verification_crashed,
)
from loramerge.engine.inmemory_merge import MergeRun
from loramerge.errors import (
    AdapterMismatchError,
    VerificationError,
)
from loramerge.formats.adapter import Adapter
from loramerge.formats.lineage_records import (
    adapter_fingerprint,
    lineage,
    new_round,
    set_model_lineage,
)
from loramerge.numerics.delta import LoraUpdate
from loramerge.numerics.quantized import keep_layout
from loramerge.numerics.tolerance import Tolerance
from loramerge.plan.attention import attention_kept
from loramerge.plan.param_targets import ParamPlan
from loramerge.plan.peft_glue import attach, unwrap
from loramerge.plan.peft_plans import LayerPlan
from loramerge.preserve import ModuleFlags, preserved
from loramerge.proof.model_runs import CheckOutputs, Probes
from loramerge.proof.reports import LayerCheck, VerificationReport
from loramerge.proof.results import MergeResult

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
    # an attention's weights keep their parameter objects through PEFT's wrapping (values: the merge's)
    with preserved(inner) as flags, attention_kept(inner, values=False):
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
    names = list(adapter_names) if adapter_names is not None else list(peft_model.active_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise AdapterMismatchError(f"no adapter named {unknown} is attached; attached: {list(peft_model.peft_config)}")
    qplan = _quant_plan(cast(nn.Module, peft_model.base_model.model), dtype, quantized)
    run = MergeRun.plan(peft_model, flags, names, verify, tol, seed, qplan)
    if want_receipt:
        run.keep_receipt(adapter_fingerprint(_updates_by_name(run.plans, run.params)))
    tuner = cast(Any, peft_model.base_model)
    previous = list(peft_model.active_adapters)
    if verify:  # the references are PEFT's layers and model with exactly these adapters active
        tuner.set_adapter(names)
    run.prepare()
    if verify:
        run.reference(check_outputs, probes)
        tuner.set_adapter(previous)
    run.apply()
    plain = run.finish()

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        try:
            outputs = run.judge(plain, layers)
        except Exception as e:  # verification must not crash after the weights changed
            raise _verification_crashed(
                e, plain, names, tol, layers, run.notes, run.dora_norms, run.untied, run.base_format
            ) from e
    else:
        run.notes.append("verification off (verify=False)")
        layers += _unverified([*run.plans, *run.attention_plans], run.stats, run.lost, run.params)
    layers += run.token_checks
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("merge", passed, tol, tuple(layers), outputs, notes=tuple(run.notes))
    rounds = _rounds(peft_model, names, sources, [*run.plans, *run.attention_plans], run.params, report, verify)
    set_model_lineage(plain, [*lineage(plain), *rounds])
    result = MergeResult(
        plain,
        report,
        tuple(names),
        run.dora_norms,
        tuple(run.untied),
        verified=verify,
        base_format=run.base_format,
        receipt=run.receipt,
    )
    if not passed:
        raise VerificationError(
            "the merged model is out of tolerance (the model HAS been changed in place; error.result holds it):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result
