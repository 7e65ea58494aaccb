"""Unmerging a saved adapter from a merged checkpoint, out of core, verified tensor by tensor and judged in reverse by PEFT's own layers (adapter mode on the restored base must reproduce the merged input)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loramerge.engine.checkpoint_steps import UnmergeStep, find_original, refuse_inexact_unmerge
from loramerge.engine.checkpoint_stream import _publish
from loramerge.formats.adapter import Adapter, load_adapter
from loramerge.formats.confine import confined_file
from loramerge.formats.lineage_records import (
    METADATA_KEY,
    check_last,
    drop_round,
    lineage,
    write_record,
)
from loramerge.formats.receipts import Receipt, ReceiptError, as_receipt, load_receipt
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.tolerance import Tolerance
from loramerge.operations.checkpoint import _carry_receipts, fingerprinted
from loramerge.operations.checkpoint_verify import _judged
from loramerge.plan.checkpoint_plan import AdapterMapping, map_adapter
from loramerge.proof.reports import VerificationReport
from loramerge.proof.results import CheckpointMergeReport

__all__ = ["unmerge_checkpoint"]

logger = logging.getLogger(__name__)


def unmerge_checkpoint(
    merged: str | Path,
    adapter: str | Path | Adapter,
    out: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    dora_norms: Mapping[str, torch.Tensor] | None = None,
    originals: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
    receipt: Receipt | str | Path | bool | None = None,
    force: bool = False,
) -> CheckpointMergeReport:
    """Remove a saved adapter from a merged checkpoint on disk, one tensor at a time.

    Each adapted tensor becomes ``round(W_merged - ΔW)`` (the same code as :func:`~loramerge.unmerge`).
    Verification, per tensor: re-merging the result lands on the merged tensor, and the recovered
    tensor with the adapter applied reproduces the merged tensor's outputs on probe vectors within
    the tolerance rule; every other tensor is copied byte for byte. The same limits as the
    in-memory unmerge apply: DoRA needs ``dora_norms``, replaced tensors need ``originals``.

    With a receipt (``receipt=`` a path or :class:`~loramerge.Receipt`; by default the
    ``loramerge-receipt.safetensors`` the merge wrote into ``merged``, when the lineage says it
    belongs to this adapter; ``receipt=False`` ignores it) every adapted tensor comes back
    byte-identical to the base, and norms and originals come from it. The lineage must say this
    adapter was the last one merged (``force=True`` overrides); the output's lineage drops it.

    Example:
        >>> unmerge_checkpoint("merged/", "adapter/", "recovered/").passed  # doctest: +SKIP
        True

    Raises:
        LineageError: The adapter is not the last one merged (nothing written).
        ReceiptError: The receipt belongs to another merge or is corrupt (nothing written).
        UnmergeImpossibleError: DoRA norms or replaced originals are missing (nothing written).
        VerificationError: The result is out of tolerance (nothing is left on disk).
    """
    started = time.perf_counter()
    merged_dir, out_dir = Path(merged), Path(out)
    loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    reader = CheckpointReader(merged_dir)
    mapping = map_adapter(reader, loaded)
    tol = tolerance or Tolerance()
    fingerprint = fingerprinted(loaded)
    rounds = lineage(merged_dir)
    lineage_notes = check_last(rounds, fingerprint, force)
    rc = _receipt(receipt, merged_dir, rounds, fingerprint)
    if rc is not None:
        rc.check_adapter(fingerprint)
        absent = sorted(n for n in [*mapping.modules, *mapping.biases] if n not in rc.tensors)
        if absent:
            raise ReceiptError(f"the receipt has no entry for {absent}; it was written for another checkpoint.")
    norms = {**(rc.dora_norms if rc is not None else {}), **dict(dora_norms or {})}
    originals = {**(rc.originals if rc is not None else {}), **dict(originals or {})}
    _check_unmergeable(loaded, mapping, norms, originals)
    step = UnmergeStep(mapping, norms, originals, rc, verify, tol, seed)
    remaining = drop_round(rounds, fingerprint)

    def record(tmp: Path, verification: VerificationReport | None) -> None:
        if verification is not None and (lineage_notes or rc is not None):
            extra = [*lineage_notes] + (
                ["receipt applied: adapted tensors restored byte for byte"] if rc is not None else []
            )
            verification = dataclasses.replace(verification, notes=(*verification.notes, *extra))
        _carry_receipts(merged_dir, tmp, remaining)
        write_record(tmp, remaining, verification)

    return _publish(
        "unmerge",
        merged_dir,
        out_dir,
        reader,
        mapping,
        step.expect,
        step,
        set(reader.names) - mapping.changed,
        None,
        max_shard_size,
        overwrite,
        progress,
        verify,
        tol,
        started,
        # PEFT's adapter mode on the restored base must compute what the merged input stores
        extra_check=lambda tmp, report: _judged(
            report, tmp, merged_dir, loaded, mapping, None, seed, every_layer=False, rounded_base=True
        ),
        record=record,
        extra_metadata={METADATA_KEY: json.dumps(remaining, default=str)},
    )


def _receipt(
    receipt: Receipt | str | Path | bool | None, merged_dir: Path, rounds: list[dict[str, Any]], fingerprint: str
) -> Receipt | None:
    """The receipt to apply: the one passed, or the one the last merge wrote (if it merged this adapter)."""
    if isinstance(receipt, (Receipt, str, Path)):
        return as_receipt(receipt)
    if receipt is not None or not rounds or not rounds[-1].get("receipt"):
        return None
    if rounds[-1]["adapter"].get("sha256") != fingerprint:
        return None
    found = confined_file(merged_dir, rounds[-1]["receipt"], "lineage: receipt", must_exist=False)
    if not found.is_file():
        raise ReceiptError(
            f"the lineage of {str(merged_dir)!r} says the last merge wrote the receipt {found.name!r}, but it is "
            "missing: without it the unmerge is not byte-exact. Restore the file, or pass receipt=False "
            "(--no-receipt) for a plain unmerge within the documented bound."
        )
    return load_receipt(found)


def _check_unmergeable(
    adapter: Adapter, mapping: AdapterMapping, norms: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor]
) -> None:
    """Refuse, before writing anything, an unmerge that cannot be exact: DoRA norms, replaced originals
    or the base weights of variant modules missing."""
    missing_norms = sorted(mod.name for mod, _ in mapping.modules.values() if mod.use_dora and mod.name not in norms)
    missing_originals = sorted(
        [
            n
            for n, k in adapter.replaced_kinds.items()
            if k in ("modules_to_save", "trained_bias") and n not in originals
        ]
        + [n for n in mapping.token_rows if find_original(originals, n) is None]
    )
    missing_variants = sorted({m for t, m in mapping.variants.items() if find_original(originals, t) is None})
    refuse_inexact_unmerge(adapter, missing_norms, missing_originals, missing_variants, "written")
