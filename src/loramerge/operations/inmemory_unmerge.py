"""In-memory unmerge: remove a saved adapter's updates from a merged model, in place, verified."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from loramerge.engine.inmemory_unmerge import UnmergeRun
from loramerge.errors import (
    AdapterMismatchError,
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
from loramerge.formats.receipts import Receipt, as_receipt
from loramerge.numerics.tolerance import Tolerance
from loramerge.plan.peft_glue import check_compatible
from loramerge.preserve import preserved
from loramerge.proof.model_runs import CheckOutputs, Probes
from loramerge.proof.reports import LayerCheck, VerificationReport
from loramerge.proof.results import UnmergeResult

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
    norms = {**(rc.dora_norms if rc is not None else {}), **dict(dora_norms or {})}
    kept = {**(rc.originals if rc is not None else {}), **dict(originals or {})}
    run = UnmergeRun.plan(model, adapter, verify, tol, seed, norms, kept, rc, kinds)
    if verify:
        run.measure(check_outputs, probes)
    run.try_receipt()
    run.apply()

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        try:
            outputs = run.judge(layers)
        except Exception as e:  # verification must not crash after the weights changed
            why = f"verification could not run after the unmerge: {type(e).__name__}: {e}"
            report = VerificationReport("unmerge", False, tol, tuple(layers), None, notes=(*run.notes, why))
            raise VerificationError(
                f"{why}\nThe model HAS been unmerged in place; error.result holds it, unverified.",
                report,
                UnmergeResult(model, report, tuple(sorted(run.exact)), run.bound, verified=False),
            ) from e
    else:
        run.notes.append("verification off (verify=False)")
    notes = [*run.notes, *lineage_notes]
    if rc is not None:
        notes.append(f"receipt applied: {len(run.exact)} tensors restored byte-identical to the base (SHA-256 checked)")
    if rounds:
        set_model_lineage(model, drop_round(rounds, fingerprint))
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("unmerge", passed, tol, tuple(layers), outputs, notes=tuple(notes))
    result = UnmergeResult(model, report, tuple(sorted(run.exact)), run.bound, verified=verify)
    if not passed:
        raise VerificationError(
            "the unmerged model is out of tolerance (the model HAS been changed in place):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result
