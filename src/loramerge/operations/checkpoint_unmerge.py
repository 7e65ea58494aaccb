"""Unmerging a saved adapter from a merged checkpoint, out of core, verified tensor by tensor and judged in reverse by PEFT's own layers (adapter mode on the restored base must reproduce the merged input)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from loramerge.engine.checkpoint_stream import _Expectations, _fixed_check, _publish
from loramerge.errors import (
    UnmergeImpossibleError,
)
from loramerge.formats.adapter import Adapter, load_adapter
from loramerge.formats.confine import confined_file
from loramerge.formats.lineage_records import (
    METADATA_KEY,
    check_last,
    drop_round,
    fingerprint_of,
    lineage,
    write_record,
)
from loramerge.formats.receipts import Receipt, ReceiptError, as_receipt, load_receipt
from loramerge.formats.receipts import apply as apply_receipt
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.delta import unmerge_tensor_
from loramerge.numerics.tolerance import Tolerance
from loramerge.operations.checkpoint import _carry_receipts
from loramerge.operations.checkpoint_verify import _judged
from loramerge.plan.checkpoint_plan import _updates_for, map_adapter
from loramerge.proof.layer_checks import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
)
from loramerge.proof.reports import CheckpointMergeReport, VerificationReport

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
    fingerprint = fingerprint_of(loaded)
    rounds = lineage(merged_dir)
    lineage_notes = check_last(rounds, fingerprint, force)
    rc: Receipt | None = None
    if isinstance(receipt, (Receipt, str, Path)):
        rc = as_receipt(receipt)
    elif (
        receipt is None and rounds and rounds[-1].get("receipt") and rounds[-1]["adapter"].get("sha256") == fingerprint
    ):
        found = confined_file(merged_dir, rounds[-1]["receipt"], "lineage: receipt", must_exist=False)
        if not found.is_file():
            raise ReceiptError(
                f"the lineage of {str(merged_dir)!r} says the last merge wrote the receipt {found.name!r}, but it is "
                "missing: without it the unmerge is not byte-exact. Restore the file, or pass receipt=False "
                "(--no-receipt) for a plain unmerge within the documented bound."
            )
        rc = load_receipt(found)
    if rc is not None:
        rc.check_adapter(fingerprint)
        absent = sorted(n for n in [*mapping.modules, *mapping.biases] if n not in rc.tensors)
        if absent:
            raise ReceiptError(f"the receipt has no entry for {absent}; it was written for another checkpoint.")
    norms = {**(rc.dora_norms if rc is not None else {}), **dict(dora_norms or {})}
    originals = {**(rc.originals if rc is not None else {}), **dict(originals or {})}
    missing_norms = sorted(mod.name for mod, _ in mapping.modules.values() if mod.use_dora and mod.name not in norms)
    missing_originals = sorted(
        [n for n, k in loaded.replaced_kinds.items() if k in ("modules_to_save", "trained_bias") and n not in originals]
        + [
            n
            for n in mapping.token_rows
            if not any(n == k or n.endswith("." + k) or k.endswith("." + n) for k in originals)
        ]
    )
    if missing_norms or missing_originals:
        raise UnmergeImpossibleError(
            "cannot unmerge exactly; nothing was written:\n"
            + (f"  - DoRA modules {missing_norms} need dora_norms= (from the merge report)\n" if missing_norms else "")
            + (
                f"  - {missing_originals} were replaced by the adapter (modules_to_save, trained biases, trainable-token "
                "rows) and neither the merged checkpoint nor the adapter holds their original values: pass originals= "
                "(read from the base checkpoint), or merge with receipt=True (--receipt), which keeps them\n"
                if missing_originals
                else ""
            )
        )
    expect = _Expectations()

    passthrough = set(reader.names) - mapping.changed

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in mapping.modules:
            mod, kind = mapping.modules[name]
            up = _updates_for(mod, kind)
            work = tensor.clone()
            stats = unmerge_tensor_(work, [up], norms.get(mod.name))
            if rc is not None:
                work = apply_receipt(work, rc.tensors[name], name)
            if verify:
                probe = LayerProbe(mod.name, kind, work, None, [up], seed, MAX_PROBE_OUTPUTS)
                reason = ""
                if stats.remerge_gap > 1.0 + 1e-6:
                    reason = f"re-merging misses the merged tensor by {stats.remerge_gap:.3g}x what rounding allows"
                storage = math.hypot(probe.storage(tensor), probe.storage(work))
                layer = probe.check(
                    probe.outputs(tensor, None), tol, stats.relative_residual, math.nan, reason, storage
                )
                expect.checks[name] = _fixed_check(layer)
            return work
        if name in mapping.biases:
            mod = mapping.biases[name]
            assert mod.update.bias is not None
            bias = (tensor.float() - mod.scale * mod.update.bias.float()).to(tensor.dtype)
            return apply_receipt(bias, rc.tensors[name], name) if rc is not None else bias
        if name in mapping.token_rows:  # the original rows, from originals=
            ids, _ = mapping.token_rows[name]
            key = next(k for k in originals if name == k or name.endswith("." + k) or k.endswith("." + name))
            return tensor.index_copy(0, ids, originals[key].to(tensor.dtype).index_select(0, ids))
        assert name in mapping.replaced  # every other tensor is copied through
        key = next(k for k in originals if name == k or name.endswith("." + k) or k.endswith("." + name))
        return originals[key].to(tensor.dtype)

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
        expect,
        transform,
        passthrough,
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
