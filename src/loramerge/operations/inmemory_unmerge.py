"""In-memory unmerge: remove a saved adapter's updates from a merged model, in place, verified."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
from peft import PeftModel
from torch import nn

from loramerge.engine.inmemory_common import FileMappings, _raise_problems
from loramerge.errors import (
    AdapterMismatchError,
    InvalidArgumentError,
    UnmergeImpossibleError,
    VerificationError,
)
from loramerge.formats.adapter import Adapter
from loramerge.formats.lineage_records import (
    check_last,
    drop_round,
    fingerprint_of,
    lineage,
    set_model_lineage,
)
from loramerge.formats.receipts import Receipt, ReceiptError, as_receipt
from loramerge.formats.receipts import apply as apply_receipt
from loramerge.numerics.delta import LoraUpdate, check_updates, unmerge_tensor_
from loramerge.numerics.tolerance import Tolerance, ulp
from loramerge.plan.param_targets import planned_unmerges, unmerge_param_
from loramerge.plan.peft_glue import adapter_mode, check_compatible
from loramerge.plan.peft_plans import LayerPlan
from loramerge.preserve import preserved
from loramerge.proof.layer_checks import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
    bias_of,
    exact_layer_output,
    output_subset,
    probe_inputs,
    restrict_vector,
    restrict_weight,
    storage_rms,
)
from loramerge.proof.model_runs import CheckOutputs, Probes, probe_batch, run_model
from loramerge.proof.output_checks import output_check, reference_outputs, storage_baseline
from loramerge.proof.param_checks import ProbedValues, unmerged_checks
from loramerge.proof.reports import LayerCheck, UnmergeResult, VerificationReport

__all__ = ["unmerge"]

logger = logging.getLogger(__name__)


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
    receipt: Receipt | str | Path | None = None,
    force: bool = False,
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
        receipt: The receipt of the merge (:attr:`MergeResult.receipt` or a path to a saved one):
            every adapted tensor then comes back byte-identical to the base (checked by SHA-256),
            and DoRA norms and replaced originals come from it.
        force: Unmerge even when the model's lineage says this adapter is not the last one merged.

    Raises:
        LineageError: The lineage says another adapter was merged after this one (nothing changed).
        ReceiptError: The receipt belongs to another merge, or is corrupt.
        UnmergeImpossibleError: Exact recovery is impossible without ``dora_norms`` or
            ``originals``; the message lists what is missing. Nothing was changed.
        AdapterMismatchError: The adapter does not fit the model.
        VerificationError: The result is out of tolerance (the model has been changed).

    Example:
        >>> merged = load_base(merged_dir)  # doctest: +SKIP
        >>> result = unmerge(merged, load_adapter(adapter_dir))  # doctest: +SKIP
    """
    with preserved(model):
        return _unmerge(
            model,
            adapter,
            verify,
            tolerance or Tolerance(),
            probes,
            check_outputs,
            dora_norms,
            originals,
            seed,
            receipt,
            force,
        )


def _unmerge(
    model: nn.Module,
    adapter: Adapter,
    verify: bool,
    tol: Tolerance,
    probes: Probes | None,
    check_outputs: CheckOutputs,
    dora_norms: Mapping[str, torch.Tensor] | None,
    originals: Mapping[str, torch.Tensor] | None,
    seed: int,
    receipt: Receipt | str | Path | None,
    force: bool,
) -> UnmergeResult:
    if isinstance(model, PeftModel):
        raise AdapterMismatchError(
            "unmerge() takes the plain merged model, not a PeftModel; for an adapter still attached in this session "
            "use PEFT's unmerge_adapter(), or merge() and then unmerge()."
        )
    kinds = check_compatible(model, adapter)
    fingerprint = fingerprint_of(adapter)
    rounds = lineage(model)
    lineage_notes = check_last(rounds, fingerprint, force)
    rc = as_receipt(receipt) if receipt is not None else None
    if rc is not None:
        rc.check_adapter(fingerprint)
    dora_norms = {**(rc.dora_norms if rc is not None else {}), **dict(dora_norms or {})}
    originals = {**(rc.originals if rc is not None else {}), **dict(originals or {})}
    missing_norms = sorted(n for n, m in adapter.modules.items() if m.use_dora and n not in dora_norms)
    missing_originals = sorted(
        [
            n
            for n, k in adapter.replaced_kinds.items()
            if k in ("modules_to_save", "trained_bias") and n not in originals
        ]
        + [n for n in adapter.token_rows if n not in originals]  # trainable tokens: the replaced rows
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
                f"tensors {missing_originals} were replaced by the adapter (modules_to_save, trained biases, trainable-token "
                "rows), so their original values are not in the merged model nor in the adapter. Pass "
                "originals={name: tensor}, "
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
    experts = planned_unmerges(model, adapter) if adapter.parameter_factors else []
    experts_merged = {x.name: ProbedValues.of(x.name, x.param, seed) for x in experts} if verify else {}
    if experts and rc is not None:
        raise InvalidArgumentError("receipts do not cover target_parameters; unmerge without receipt=")
    problems += [
        f"{x.name}: {m}" for x in experts for e, ups in enumerate(x.updates) for m in check_updates(ups, x.param[e])
    ]
    _raise_problems(problems, "unmerging")

    notes: list[str] = []
    merged_model_out: torch.Tensor | None = None
    merged_storage = (0.0, 0.0)
    merged_routes: list[torch.Tensor] = []
    batch: dict[str, torch.Tensor] | None = None
    target_out: dict[str, torch.Tensor] = {}
    storage: dict[str, float] = {}
    if verify:
        batch = probe_batch(model, check_outputs, probes, seed, notes)
        if batch is not None:
            merged_model_out = run_model(model, batch, merged_routes)
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
    if rc is not None:  # every correction must fit before anything changes: try each on a copy first
        missing = sorted(f"{p.name}.weight" for p in plans if f"{p.name}.weight" not in rc.tensors)
        if missing:
            raise ReceiptError(f"the receipt has no entry for {missing}; it was written for another model or merge.")
        for plan in plans:
            trial = plan.weight.detach().clone()
            unmerge_tensor_(trial, [plan.updates[0][1]], dora_norms.get(plan.name))
            apply_receipt(trial, rc.tensors[f"{plan.name}.weight"], f"{plan.name}.weight")
    mapped = FileMappings()
    for plan in plans:
        up = plan.updates[0][1]
        with torch.no_grad():
            if mapped.holds(plan.weight):  # copy-on-write pages of the loaded file (see FileMappings)
                mapped.own_copy(cast(torch.Tensor, plan.layer.weight))
            stats[plan.name] = unmerge_tensor_(plan.weight, [up], dora_norms.get(plan.name))
            if up.bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_((bias.detach().float() - up.scale * up.bias.detach().float().to(bias.device)).to(bias.dtype))
            if rc is not None:
                for suffix in ("weight", "bias"):
                    entry = rc.tensors.get(f"{plan.name}.{suffix}")
                    target = cast(torch.Tensor | None, getattr(plan.layer, suffix, None))
                    if entry is not None and target is not None:
                        target.copy_(apply_receipt(target.detach(), entry, f"{plan.name}.{suffix}"))
                        exact.append(f"{plan.name}.{suffix}")
        if rc is not None:
            continue
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
    for item in experts:
        if mapped.holds(item.param):
            mapped.own_copy(item.param)
        unmerge_param_(item)
    bound = max((st.error_bound for n, st in stats.items() if f"{n}.weight" not in exact), default=0.0)
    notes_lineage = lineage_notes
    for pname, value in originals.items():
        target = params[pname]
        with torch.no_grad():
            target.copy_(value.to(target.dtype).to(target.device))
        exact.append(pname)

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        try:
            for plan in plans:
                up = plan.updates[0][1]
                st = stats[plan.name]
                probe_bias = bias_of(plan.layer)
                trained_bias = adapter.replaced.get(f"{plan.name}.bias")
                if trained_bias is not None and probe_bias is not None:  # adapter mode runs with the adapter's bias
                    probe_bias = trained_bias.to(probe_bias.dtype).to(probe_bias.device)
                probe = LayerProbe(
                    plan.name, plan.kind, plan.weight.detach(), probe_bias, [up], seed, MAX_PROBE_OUTPUTS
                )
                reason = ""
                if st.remerge_gap > 1.0 + 1e-6:
                    reason = (
                        f"re-merging the recovered weight misses the merged weight by {st.remerge_gap:.3g}x what rounding "
                        "allows: the subtraction lost precision"
                    )
                both = math.hypot(storage[plan.name], probe.storage(plan.weight))
                layers.append(probe.check(target_out[plan.name], tol, st.relative_residual, st.max_ulp, reason, both))
            layers += unmerged_checks(model, adapter, experts_merged, tol, seed) if experts else []
            if merged_model_out is not None and batch is not None:
                with adapter_mode(model, [adapter]) as peft_model:
                    ref = reference_outputs(peft_model, batch)
                if ref.note:
                    notes.append(ref.note)
                outputs = output_check(merged_model_out, ref, tol, batch, lambda: merged_storage, merged_routes)
        except Exception as e:  # verification must not crash after the weights changed
            why = f"verification could not run after the unmerge: {type(e).__name__}: {e}"
            report = VerificationReport("unmerge", False, tol, tuple(layers), None, notes=(*notes, why))
            raise VerificationError(
                f"{why}\nThe model HAS been unmerged in place; error.result holds it, unverified.",
                report,
                UnmergeResult(model, report, tuple(sorted(exact)), bound, verified=False),
            ) from e
    else:
        notes.append("verification off (verify=False)")
    notes.extend(notes_lineage)
    if rc is not None:
        notes.append(f"receipt applied: {len(exact)} tensors restored byte-identical to the base (SHA-256 checked)")
    if rounds:
        set_model_lineage(model, drop_round(rounds, fingerprint))
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
