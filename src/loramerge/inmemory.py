"""In-memory merge and unmerge on ``nn.Module``\\ s, each verified by default.

``merge`` folds the LoRA updates of a ``PeftModel`` into its base weights in place and returns the
plain model; ``unmerge`` removes a *saved* adapter's updates from a merged model, in any process.
Both only change weights after every check that can be made beforehand has passed (shapes,
finiteness, overflow, recoverability), and both verify the result against adapter mode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from peft import PeftModel
from torch import nn

from loramerge.adapter import Adapter
from loramerge.delta import LoraUpdate, check_updates, merge_tensor_, unmerge_tensor_
from loramerge.errors import (
    AdapterMismatchError,
    NonFiniteMergeError,
    UnmergeImpossibleError,
    VerificationError,
)
from loramerge.peft_glue import LayerPlan, adapter_mode, attach, check_compatible, collect_plans, untie_shared, unwrap
from loramerge.reports import LayerCheck, MergeResult, UnmergeResult, VerificationReport
from loramerge.tolerance import Tolerance, ulp
from loramerge.verification import (
    MAX_PROBE_OUTPUTS,
    CheckOutputs,
    LayerProbe,
    ModelReference,
    Probes,
    bias_of,
    exact_layer_output,
    output_check,
    output_subset,
    probe_batch,
    probe_inputs,
    reference_outputs,
    restrict_vector,
    restrict_weight,
    run_model,
    storage_baseline,
    storage_rms,
)

__all__ = ["merge", "unmerge"]

logger = logging.getLogger(__name__)


def _merged_bias(layer: nn.Module, updates: Sequence[LoraUpdate]) -> torch.Tensor | None:
    """``round(b + Σ scale * lora_B.bias)`` computed in fp32, or ``None`` when no update has a bias."""
    with_bias = [up for up in updates if up.bias is not None]
    if not with_bias:
        return None
    bias = cast(torch.Tensor, layer.bias)
    total = bias.detach().to(torch.float32 if bias.dtype != torch.float64 else torch.float64)
    for up in with_bias:
        assert up.bias is not None
        total = total + up.scale * up.bias.detach().to(total.dtype).to(total.device)
    return total


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        problems.sort()
        raise NonFiniteMergeError(
            f"{what} would produce non-finite weights or overflow; nothing was changed. {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
            + "\nCheck the adapter for NaN/Inf (a diverged training run), or merge into a wider dtype "
            "(e.g. dtype=torch.bfloat16 or float32 instead of float16)."
        )


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
) -> MergeResult:
    """Merge LoRA adapters into the base weights, in place, and verify the result.

    Each weight becomes ``round(W + ΔW₁ + ΔW₂ + ...)``: the updates are computed and summed in
    fp32 and rounded once to the weight's dtype (DoRA: ``round(m ⊙ (W + ΔW) / ‖W + ΔW‖)``). Large
    weights are processed in row chunks, so no second copy of the model is made. Non-finite results
    and overflow of the dtype are detected for every layer before any weight is changed.

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

    Returns:
        The plain merged model (the same object, PEFT wrappers removed) and the report.

    Raises:
        NonFiniteMergeError: Some merged weight would be non-finite or overflow (nothing changed).
        AdapterMismatchError: ``adapters`` do not fit ``model``.
        UnsupportedAdapterError: An adapter uses a feature that cannot be merged exactly.
        VerificationError: The merged model is out of tolerance. The model has been changed;
            ``error.result`` holds it with the report.

    Example:
        >>> result = merge(model, load_adapter(adapter_dir))  # doctest: +SKIP
        >>> result.report.passed  # doctest: +SKIP
        True
    """
    tol = tolerance or Tolerance()
    if adapters is not None:
        for i, adapter in enumerate([adapters] if isinstance(adapters, Adapter) else list(adapters)):
            taken = set(model.peft_config) if isinstance(model, PeftModel) else set()
            name = "default" if "default" not in taken else f"adapter_{i}"
            while name in taken:
                name += "_"
            model = attach(model, adapter, name=name)
    if not isinstance(model, PeftModel):
        raise AdapterMismatchError(
            f"merge() needs a PeftModel or adapters to attach; got a plain {type(model).__name__} and no adapters."
        )
    peft_model = model
    tuner = cast(Any, peft_model.base_model)
    names = list(adapter_names) if adapter_names is not None else list(peft_model.active_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise AdapterMismatchError(f"no adapter named {unknown} is attached; attached: {list(peft_model.peft_config)}")
    plans, saved = collect_plans(peft_model, names)
    problems = [f"{p.name}: {msg}" for p in plans for msg in check_updates([u for _, u in p.updates], p.weight)]
    _raise_problems(problems, "merging")

    inner = cast(nn.Module, peft_model.base_model.model)
    notes: list[str] = []
    layer_probes: list[LayerProbe] = []
    model_ref: ModelReference | None = None
    batch: dict[str, torch.Tensor] | None = None
    if verify:
        previous = list(peft_model.active_adapters)
        tuner.set_adapter(names)
        batch = probe_batch(inner, check_outputs, probes, seed, notes)
        if batch is not None:
            model_ref = reference_outputs(peft_model, batch)
        tuner.set_adapter(previous)
        for plan in plans:
            ups = [u for _, u in plan.updates]
            bias = bias_of(plan.layer)
            layer_probes.append(LayerProbe(plan.name, plan.kind, plan.weight, bias, ups, seed, MAX_PROBE_OUTPUTS))

    untied = untie_shared(inner, plans)
    if untied:
        notes.append(f"untied {untied} (they shared a merged weight; adapter mode does not change them)")
    stats = {}
    dora_norms: dict[str, torch.Tensor] = {}
    for plan in plans:
        ups = [u for _, u in plan.updates]
        new_bias = _merged_bias(plan.layer, ups)
        with torch.no_grad():
            stats[plan.name] = merge_tensor_(plan.weight, ups)
            if new_bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_(new_bias.to(bias.dtype))
        if "dora_norms" in stats[plan.name].extras:
            dora_norms[plan.name] = stats[plan.name].extras["dora_norms"].detach().cpu()
    plain = unwrap(peft_model, saved)
    logger.info("merged %s into %d weights", names, len(plans))

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        for plan, probe in zip(plans, layer_probes, strict=True):
            st = stats[plan.name]
            bias = bias_of(plan.layer)
            merged_w = plan.weight.detach()
            out = probe.outputs(merged_w, bias)
            layers.append(probe.check(out, tol, st.relative_residual, st.max_ulp, "", probe.storage(merged_w)))
        if model_ref is not None and batch is not None:
            merged_out = run_model(plain, batch)
            weights = [p.weight for p in plans]
            outputs = output_check(
                merged_out, model_ref, tol, batch, lambda: storage_baseline(plain, batch, weights, seed)
            )
    else:
        notes.append("verification off (verify=False)")
        for plan in plans:
            st = stats[plan.name]
            layers.append(
                LayerCheck(
                    plan.name,
                    plan.kind,
                    str(plan.weight.dtype).replace("torch.", ""),
                    st.relative_residual,
                    st.max_ulp,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    True,
                    "",
                )
            )
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("merge", passed, tol, tuple(layers), outputs, notes=tuple(notes))
    result = MergeResult(plain, report, tuple(names), dora_norms, tuple(untied), verified=verify)
    if not passed:
        raise VerificationError(
            "the merged model is out of tolerance (the model HAS been changed in place; error.result holds it):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result


def unmerge(
    model: nn.Module,
    adapter: Adapter,
    *,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    probes: Probes | None = None,
    check_outputs: CheckOutputs = "auto",
    dora_norms: Mapping[str, torch.Tensor] | None = None,
    originals: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> UnmergeResult:
    """Remove a saved adapter's updates from a merged model, in place, and verify the result.

    Works in any process (PEFT can only unmerge in the session that merged): each weight becomes
    ``round(W_merged - ΔW)``, computed in fp32. For a weight that loramerge merged, the recovered
    value is within ``0.5 ulp(W_merged) + 0.5 ulp(W_recovered)`` of the original (about one
    rounding step; reported as ``max_error_bound_ulp``).

    Verification: the recovered base *with the adapter attached* must reproduce the merged model
    within the tolerance rule, per layer and (when affordable) for the whole model; and re-merging
    must land on the merged weights.

    Args:
        model: The plain merged model.
        adapter: The adapter that was merged (from :func:`~loramerge.load_adapter`).
        verify: Verify the result (default).
        tolerance: Settings of the tolerance rule.
        probes: Inputs for the whole-model check.
        check_outputs: As in :func:`~loramerge.merge`.
        dora_norms: For DoRA modules, the norms ``‖W + ΔW‖`` recorded at merge time
            (:attr:`MergeResult.dora_norms`): without them a DoRA merge cannot be undone.
        originals: Original values of tensors the adapter *replaced* (``modules_to_save``
            modules, trained biases), by parameter name: the adapter does not contain them.
        seed: Seed of the random probes.

    Raises:
        UnmergeImpossibleError: Exact recovery is impossible without ``dora_norms`` or
            ``originals``; the message lists what is missing. Nothing was changed.
        AdapterMismatchError: The adapter does not fit the model.
        VerificationError: The result is out of tolerance (the model has been changed).

    Example:
        >>> merged = load_base(merged_dir)  # doctest: +SKIP
        >>> result = unmerge(merged, load_adapter(adapter_dir))  # doctest: +SKIP
    """
    tol = tolerance or Tolerance()
    if isinstance(model, PeftModel):
        raise AdapterMismatchError(
            "unmerge() takes the plain merged model, not a PeftModel; for an adapter still attached in this session "
            "use PEFT's unmerge_adapter(), or merge() and then unmerge()."
        )
    kinds = check_compatible(model, adapter)
    dora_norms = dict(dora_norms or {})
    originals = dict(originals or {})
    missing_norms = sorted(n for n, m in adapter.modules.items() if m.use_dora and n not in dora_norms)
    missing_originals = sorted(
        n for n, k in adapter.replaced_kinds.items() if k in ("modules_to_save", "trained_bias") and n not in originals
    )
    if missing_norms or missing_originals:
        lines = []
        if missing_norms:
            lines.append(
                f"DoRA modules {missing_norms}: the merged weight is m * (W + ΔW) / ‖W + ΔW‖ and the norms ‖W + ΔW‖ cannot "
                "be recovered from the merged weight and the adapter. Pass dora_norms= (MergeResult.dora_norms from the merge)."
            )
        if missing_originals:
            lines.append(
                f"tensors {missing_originals} were replaced entirely by the adapter (modules_to_save / trained biases), so "
                "their original values are not in the merged model nor in the adapter. Pass originals={name: tensor}, "
                "e.g. read from the base checkpoint with safetensors."
            )
        raise UnmergeImpossibleError("cannot unmerge exactly; nothing was changed:\n  - " + "\n  - ".join(lines))
    bad_shapes = sorted(
        n for n, t in originals.items() if n in adapter.replaced and tuple(t.shape) != tuple(adapter.replaced[n].shape)
    )
    if bad_shapes:
        raise AdapterMismatchError(f"originals= has wrong shapes for {bad_shapes}")

    params = dict(model.named_parameters(remove_duplicate=False))
    plans = []
    for name, mod in adapter.modules.items():
        kind = kinds[name]
        up = LoraUpdate(kind, mod.update.lora_A, mod.update.lora_B, mod.scale, mod.update.magnitude, mod.update.bias)
        layer = model.get_submodule(name)
        plans.append(LayerPlan(name, kind, layer, [("adapter", up)]))
    problems = [f"{p.name}: {msg}" for p in plans for msg in check_updates([u for _, u in p.updates], p.weight)]
    _raise_problems(problems, "unmerging")

    notes: list[str] = []
    merged_model_out: torch.Tensor | None = None
    merged_storage = (0.0, 0.0)
    batch: dict[str, torch.Tensor] | None = None
    target_out: dict[str, torch.Tensor] = {}
    storage: dict[str, float] = {}
    if verify:
        batch = probe_batch(model, check_outputs, probes, seed, notes)
        if batch is not None:
            merged_model_out = run_model(model, batch)
            # measured now, while the merged weights exist; used only if the rule needs it
            merged_storage = storage_baseline(model, batch, [p.weight for p in plans], seed)
        for plan in plans:
            x = probe_inputs(plan.name, plan.kind, plan.weight, seed)
            idx = output_subset(plan.name, plan.kind, plan.weight, seed, MAX_PROBE_OUTPUTS)
            w_sub = restrict_weight(plan.kind, plan.weight, idx)
            target_out[plan.name] = exact_layer_output(plan.kind, w_sub, restrict_vector(bias_of(plan.layer), idx), x)
            storage[plan.name] = storage_rms(plan.kind, w_sub, x)

    stats = {}
    exact: list[str] = []
    for plan in plans:
        up = plan.updates[0][1]
        with torch.no_grad():
            stats[plan.name] = unmerge_tensor_(plan.weight, [up], dora_norms.get(plan.name))
            if up.bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_((bias.detach().float() - up.scale * up.bias.detach().float().to(bias.device)).to(bias.dtype))
        saved_base = adapter.replaced.get(f"{plan.name}.weight")
        if saved_base is not None:
            candidate = saved_base.to(plan.weight.dtype).to(plan.weight.device)
            close = (candidate.float() - plan.weight.detach().float()).abs() <= ulp(candidate.float(), candidate.dtype)
            if bool(close.all()):
                with torch.no_grad():
                    plan.weight.copy_(candidate)
                exact.append(f"{plan.name}.weight")
            else:
                notes.append(
                    f"{plan.name}.weight: the adapter's saved base copy differs from the recovered weight; kept the recovered one"
                )
    bound = max((st.error_bound for n, st in stats.items() if f"{n}.weight" not in exact), default=0.0)
    for pname, value in originals.items():
        target = params[pname]
        with torch.no_grad():
            target.copy_(value.to(target.dtype).to(target.device))
        exact.append(pname)

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        for plan in plans:
            up = plan.updates[0][1]
            st = stats[plan.name]
            probe_bias = bias_of(plan.layer)
            trained_bias = adapter.replaced.get(f"{plan.name}.bias")
            if trained_bias is not None and probe_bias is not None:  # adapter mode runs with the adapter's bias
                probe_bias = trained_bias.to(probe_bias.dtype).to(probe_bias.device)
            probe = LayerProbe(plan.name, plan.kind, plan.weight.detach(), probe_bias, [up], seed, MAX_PROBE_OUTPUTS)
            reason = ""
            if st.remerge_gap > 1.0 + 1e-6:
                reason = (
                    f"re-merging the recovered weight misses the merged weight by {st.remerge_gap:.3g}x what rounding "
                    "allows: the subtraction lost precision"
                )
            both = math.hypot(storage[plan.name], probe.storage(plan.weight))
            layers.append(probe.check(target_out[plan.name], tol, st.relative_residual, st.max_ulp, reason, both))
        if merged_model_out is not None and batch is not None:
            with adapter_mode(model, [adapter]) as peft_model:
                ref = reference_outputs(peft_model, batch)
            outputs = output_check(merged_model_out, ref, tol, batch, lambda: merged_storage)
    else:
        notes.append("verification off (verify=False)")
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("unmerge", passed, tol, tuple(layers), outputs, notes=tuple(notes))
    result = UnmergeResult(model, report, tuple(sorted(exact)), bound, verified=verify)
    if not passed:
        raise VerificationError(
            "the unmerged model is out of tolerance (the model HAS been changed in place):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result
