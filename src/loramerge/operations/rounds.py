"""A helper for training loops: train a LoRA, merge it, train a fresh one on the merged model, ...

:func:`next_round` ends a round in one call: it saves the adapter just trained, merges it with
verification (and a receipt), and returns the merged model with a fresh LoRA attached for the
next round. The lineage keeps each round's adapter directory and receipt, so
:func:`unmerge_rounds` can take rounds off again, newest first, byte for byte.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from loramerge.errors import InvalidArgumentError, LoraMergeError
from loramerge.formats.adapter import load_adapter
from loramerge.formats.confine import confined_file
from loramerge.formats.lineage_records import LineageError, fingerprint_of, lineage, set_model_lineage
from loramerge.formats.receipts import ReceiptError
from loramerge.operations.inmemory import merge
from loramerge.operations.inmemory_unmerge import unmerge
from loramerge.proof.results import MergeResult, UnmergeResult

__all__ = ["RoundResult", "next_round", "unmerge_rounds"]

logger = logging.getLogger(__name__)

RECEIPT_NAME = "loramerge-receipt.safetensors"


@dataclass(frozen=True)
class RoundResult:
    """What :func:`next_round` did.

    Attributes:
        model: The merged model with a fresh LoRA attached (a ``PeftModel``), ready to train.
        merge: The merge's result (report, receipt, DoRA norms).
        adapter_dir: Where the adapter of the round just ended was saved (with its receipt).
        round: How many rounds the model now contains.
    """

    model: PeftModel
    merge: MergeResult
    adapter_dir: Path
    round: int


def next_round(
    model: PeftModel,
    save_dir: str | Path,
    *,
    lora_config: LoraConfig | None = None,
    adapter_name: str | None = None,
    receipt: bool = True,
    **merge_kwargs: Any,
) -> RoundResult:
    """End a training round: save the adapter, merge it (verified), attach a fresh LoRA.

    Args:
        model: The ``PeftModel`` being trained (one adapter; the active one is used).
        save_dir: Directory for this round's adapter (and its receipt); must not exist yet.
        lora_config: Config of the fresh LoRA; default: the same as the round just ended, with
            PEFT's default initialisation (B = 0, so the new round starts from the merged model).
        adapter_name: The adapter to save and merge; default: the active one.
        receipt: Save a receipt beside the adapter so the round can be undone byte for byte.
        **merge_kwargs: Passed on to :func:`~loramerge.merge` (``verify``, ``tolerance``, ...).

    Raises:
        VerificationError: The merge is out of tolerance (the model has been changed).

    Example:
        >>> for step in range(3):  # doctest: +SKIP
        ...     train(model)
        ...     model = next_round(model, f"rounds/{step}").model
    """
    root = Path(save_dir)
    if root.exists() and any(root.iterdir()):
        raise LoraMergeError(f"{str(root)!r} already exists and is not empty; give each round its own directory.")
    name = adapter_name or model.active_adapters[0]
    config = copy.deepcopy(lora_config or model.peft_config[name])
    if lora_config is None:
        cast(Any, config).init_lora_weights = True
    model.save_pretrained(str(root), selected_adapters=[name])
    saved = root / name if name != "default" and (root / name).is_dir() else root
    saved_fingerprint = fingerprint_of(load_adapter(saved))
    result = merge(model, adapter_names=[name], receipt=receipt, **merge_kwargs)
    merged = result.model
    rounds = lineage(merged)
    if rounds and rounds[-1]["adapter"]["sha256"] != saved_fingerprint:
        raise LoraMergeError(
            f"the adapter saved in {str(saved)!r} differs from the one merged (PEFT changed it while saving?); "
            "this round could not be undone from it."
        )
    if rounds:  # name this round by where its adapter now lives
        rounds[-1]["adapter"]["source"] = str(saved)
        _SAVED_HERE.add((str(saved), saved_fingerprint))
        if result.receipt is not None:
            result.receipt.save(saved / RECEIPT_NAME)
            rounds[-1]["receipt"] = str(saved / RECEIPT_NAME)
        set_model_lineage(merged, rounds)
    fresh = get_peft_model(cast(Any, merged), cast(Any, config))
    logger.info("round %d merged from %s; fresh LoRA attached", len(rounds), saved)
    return RoundResult(fresh, result, saved, len(rounds))


# Adapter directories this process saved in next_round, with their fingerprints: the only
# ``source`` entries of a lineage that unmerge_rounds follows without being told (a lineage read
# from a checkpoint's config is a record someone else may have written).
_SAVED_HERE: set[tuple[str, str]] = set()


def unmerge_rounds(
    model: nn.Module,
    count: int = 1,
    *,
    adapters: Sequence[str | Path] | None = None,
    receipts: bool = True,
    **unmerge_kwargs: Any,
) -> list[UnmergeResult]:
    """Take the last ``count`` rounds off ``model`` (newest first), with their saved adapters and
    receipts (byte-exact; a receipt a round recorded must still be beside its adapter, else
    :class:`~loramerge.ReceiptError`; ``receipts=False`` does plain unmerges). A ``PeftModel`` from
    :func:`next_round` has its fresh, not yet merged LoRA removed first.

    Args:
        model: The model whose lineage records the rounds.
        count: How many rounds to take off.
        adapters: The adapter directory of each of those rounds, newest first. Needed for rounds
            that :func:`next_round` did not save in this process (a lineage read from a checkpoint
            is someone else's record: its ``source`` names are never followed); each must hold the
            adapter the round recorded (its SHA-256 fingerprint).
        receipts: Use the receipts the rounds recorded.
        **unmerge_kwargs: Passed on to :func:`~loramerge.unmerge`.

    Returns:
        One :class:`~loramerge.UnmergeResult` per round, newest first (``results[-1].model`` is the
        model with those rounds removed).

    Raises:
        LineageError: An adapter is not the one its round recorded.
        LoraMergeError: A round's adapter directory is not known: pass ``adapters=``.

    Example:
        >>> start = unmerge_rounds(model, count=3)[-1].model  # doctest: +SKIP
    """
    plain: nn.Module = cast(Any, model).unload() if isinstance(model, PeftModel) else model
    rounds = lineage(plain)
    if count > len(rounds):
        raise LoraMergeError(f"the model holds {len(rounds)} round(s); cannot unmerge {count}.")
    if adapters is not None and len(adapters) != count:
        raise InvalidArgumentError(f"adapters= names {len(adapters)} directories for {count} round(s); give one each.")
    results = []
    for i, entry in enumerate(reversed(rounds[len(rounds) - count :])):
        recorded = str(entry["adapter"].get("source") or "")
        fingerprint = str(entry["adapter"].get("sha256") or "")
        if adapters is not None:
            source = Path(adapters[i])
        elif (recorded, fingerprint) in _SAVED_HERE:
            source = Path(recorded)
        else:
            raise LoraMergeError(
                f"round {len(rounds) - i} names its adapter {recorded!r}, which this process did not save: a lineage "
                "read from a checkpoint is not followed to a directory. Pass adapters=[...] with the adapter "
                "directory of each round to undo, newest first."
            )
        adapter = load_adapter(source)
        if fingerprint_of(adapter) != fingerprint:
            raise LineageError(
                f"{str(source)!r} is not the adapter round {len(rounds) - i} merged (its fingerprint differs from the "
                "one the lineage recorded); nothing was changed by this round."
            )
        receipt = _round_receipt(entry, source) if receipts else None
        results.append(unmerge(plain, adapter, receipt=receipt, **unmerge_kwargs))
    return results


def _round_receipt(entry: dict[str, Any], source: Path) -> Path | None:
    """The receipt a round recorded: a file beside its adapter (never a path read from the record
    itself), which must exist when the round says it was written."""
    recorded = entry.get("receipt")
    if not recorded:
        return None
    path = confined_file(source, Path(str(recorded)).name, "lineage: receipt", must_exist=False)
    if not path.is_file():
        raise ReceiptError(
            f"this round recorded the receipt {path.name!r} beside its adapter in {str(source)!r}, but it is missing: "
            "without it the unmerge is not byte-exact. Restore it, or pass receipts=False for a plain unmerge."
        )
    return path
