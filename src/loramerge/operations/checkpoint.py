"""Out-of-core merge, unmerge and verification of safetensors checkpoints, one tensor at a time.

The model is never instantiated: adapter keys are mapped to checkpoint tensor names, each adapted
tensor is read into a reused buffer, merged in fp32 and rounded once (:mod:`loramerge.numerics.delta`, the
same code as the in-memory merge, so the results are bit-identical), and streamed to the output
shards; untouched tensors are copied file to file. Reading the next tensor, writing the previous
ones and verifying finished shards overlap with the merge of the current one. The output is
written into a temporary directory beside ``out`` and renamed only once complete and verified.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch

from loramerge.engine.checkpoint_steps import MergeStep
from loramerge.engine.checkpoint_stream import _publish
from loramerge.errors import (
    InvalidArgumentError,
    LoraMergeWarning,
    UnsupportedQuantizationError,
)
from loramerge.formats.adapter import Adapter, load_adapter
from loramerge.formats.confine import confined_file
from loramerge.formats.hub_download import hub_path
from loramerge.formats.io import atomic_directory
from loramerge.formats.lineage_records import (
    METADATA_KEY,
    fingerprint_of,
    lineage,
    new_round,
    summary,
    write_record,
)
from loramerge.formats.loading import resolve_dtype
from loramerge.formats.receipts import FILENAME as RECEIPT_FILE
from loramerge.formats.receipts import Receipt
from loramerge.formats.shard_writer import copy_side_files, release_pages
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.tolerance import Tolerance
from loramerge.plan.checkpoint_plan import AdapterMapping, _read_config, _untie_plan, map_adapter
from loramerge.plan.injection import variant_layers
from loramerge.plan.quant_spec import QuantSpec, bnb_config, checkpoint_quantization
from loramerge.proof.reports import VerificationReport
from loramerge.proof.results import CheckpointMergeReport

__all__ = ["CheckpointMergeReport", "map_adapter", "merge_checkpoint"]

from loramerge.operations.checkpoint_verify import _judged

logger = logging.getLogger(__name__)


def merge_checkpoint(
    base: str | Path,
    adapter: str | Path | Adapter,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    verify: bool | Literal["model"] = True,
    tolerance: Tolerance | None = None,
    progress: bool = True,
    qlora_base: Literal["original", "simulated"] | None = None,
    quantization: QuantSpec | str | Mapping[str, Any] | Any = None,
    base_revision: str | None = None,
    adapter_revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    receipt: bool = False,
) -> CheckpointMergeReport:
    """Merge a PEFT adapter into a safetensors checkpoint on disk, one tensor at a time.

    The model is never instantiated and memory does not grow with the model: each tensor is read,
    merged in fp32 and rounded once (bit-identical to :func:`~loramerge.merge`), and streamed to the
    output shards. The output is a complete checkpoint (config, generation config, tokenizer and
    other small files copied; index; ``{"format": "pt"}`` metadata) written atomically.

    Args:
        base: Checkpoint directory (single file or sharded with ``model.safetensors.index.json``).
        adapter: PEFT adapter directory, or an :class:`~loramerge.Adapter`.
        out: Output directory; must not exist unless ``overwrite``.
        dtype: Convert every floating tensor to this dtype (default: keep each tensor's dtype).
        max_shard_size: Largest shard, in bytes or as ``"5GB"`` / ``"500MB"``.
        overwrite: Replace an existing ``out`` (only once the new one is complete and verified).
        verify: Run :func:`verify_checkpoint` on the result before publishing it; ``"model"`` also
            loads base and result and runs the whole-model output check of :func:`~loramerge.verify`
            (needs both models in memory).
        tolerance: Settings of the tolerance rule.
        progress: Show a progress bar (tensors and bytes).
        qlora_base: For an adapter trained as QLoRA on a quantized copy of this 16-bit base:
            ``"simulated"`` quantizes and dequantizes every linear weight exactly as bitsandbytes
            does with ``quantization`` and merges into that (what the adapter was trained against);
            ``"original"`` merges into the 16-bit weights. Either way the report gives, per layer,
            how far the two choices are apart (:attr:`CheckpointMergeReport.qlora_gap`). With
            ``verify="model"`` and ``"simulated"``, the output is checked against the real QLoRA
            model (the base loaded with bitsandbytes). See :doc:`/qlora`.
        quantization: The quantization the adapter was trained with: a
            :class:`~loramerge.QuantSpec`, ``"nf4"``/``"fp4"``/``"int8"``, a dict of
            :class:`~loramerge.QuantSpec` fields or a transformers ``BitsAndBytesConfig``
            (default: nf4 with double quantization, blocks of 64).
        base_revision: When ``base`` is a Hub repo id: its branch, tag or commit.
        adapter_revision: When ``adapter`` is a Hub repo id: its branch, tag or commit.
        token: Hub token for downloads (default ``HF_TOKEN`` or the stored login).
        endpoint: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        receipt: Also write ``loramerge-receipt.safetensors`` into ``out``: what
            :func:`unmerge_checkpoint` needs to restore the base byte for byte.

    The merge is appended to the base's lineage and written to ``out/loramerge.json`` and every
    shard's metadata (:func:`~loramerge.lineage`).

    ``base`` and ``adapter`` may be Hub repo ids (``namespace/name``) when no such local directory
    exists; only safetensors weights, configs and tokenizer files are downloaded, into the HF cache.

    A base checkpoint saved pre-quantized by bitsandbytes (``quantization_config`` in its
    ``config.json``) is loaded with transformers, merged in memory (:func:`~loramerge.merge`,
    dequantizing) and saved as a 16-bit checkpoint (``dtype``, default bfloat16).

    Returns:
        What was written, with the verification report.

    Raises:
        UnsupportedQuantizationError: The base checkpoint is quantized with another method than bitsandbytes.
        AdapterMismatchError: Adapter keys that match no tensor, or wrong shapes (all listed).
        NonFiniteMergeError: A merged tensor would be non-finite or overflow (nothing is left on disk).
        VerificationError: The result is out of tolerance (nothing is left on disk).

    Example:
        >>> report = merge_checkpoint("base/", "adapter/", "merged/", max_shard_size="2GB")  # doctest: +SKIP
    """
    started = time.perf_counter()
    base_dir = hub_path(base, revision=base_revision, token=token, endpoint=endpoint)
    out_dir = Path(out)
    loaded = (
        adapter
        if isinstance(adapter, Adapter)
        else load_adapter(adapter, revision=adapter_revision, token=token, endpoint=endpoint)
    )
    spec = _quantization_spec(qlora_base, quantization, receipt)
    if _prequantized(base_dir, qlora_base):
        return _merge_prequantized(
            base_dir, loaded, out_dir, dtype, max_shard_size, overwrite, bool(verify), tolerance, started
        )
    reader = CheckpointReader(base_dir)
    mapping = map_adapter(reader, loaded)
    fingerprint = fingerprinted(loaded)
    target = resolve_dtype(dtype)
    source = str(adapter) if not isinstance(adapter, Adapter) else str(loaded.path or "<in memory>")
    dtype_name = str(target or next(iter(reader.tensors.values())).dtype)
    rounds = _rounds(base_dir, source, loaded, fingerprint, dtype_name, receipt)
    entry = rounds[-1]
    _alias_untied(base_dir, reader, mapping)
    tol = tolerance or Tolerance()
    step = MergeStep(mapping, target, bool(verify), tol, spec, qlora_base, Receipt(fingerprint) if receipt else None)
    step.peft_layers = variant_layers(base_dir, loaded, mapping.variants)

    simulated = spec if qlora_base == "simulated" else None
    model_check = functools.partial(_model_check, base_dir, loaded, mapping, target, verify, tol, simulated)

    def record(tmp: Path, verification: VerificationReport | None) -> None:
        done = dict(entry, verification=summary(verification))
        if step.receipt is not None:
            step.receipt.save(tmp / str(entry["receipt"]))
        _carry_receipts(base_dir, tmp, rounds[:-1])
        write_record(tmp, [*rounds[:-1], done], verification)

    report = _publish(
        "merge",
        base_dir,
        out_dir,
        reader,
        mapping,
        step.expect,
        step,
        step.passthrough(reader.tensors),
        target,
        max_shard_size,
        overwrite,
        progress,
        bool(verify),
        tol,
        started,
        model_check,
        step.norms,
        record,
        {METADATA_KEY: json.dumps(rounds, default=str)},
    )
    if spec is None:
        return report
    what = f"{qlora_base} ({spec.describe()})" + (_SIMULATED if qlora_base == "simulated" else "")
    return dataclasses.replace(report, qlora_base=what, qlora_gap=step.gaps)


_SIMULATED = ": every linear weight quantized and dequantized as bitsandbytes does, then merged"


def fingerprinted(adapter: Adapter) -> str:
    """The adapter's fingerprint; the pages of its tensors, which that read whole, need not stay
    resident: the stream reads each module's factors again and lets them go (flat memory)."""
    fingerprint = fingerprint_of(adapter)
    release_pages(list(adapter.tensors.values()))
    return fingerprint


def _rounds(
    base_dir: Path, source: str, adapter: Adapter, fingerprint: str, dtype: str, receipt: bool
) -> list[dict[str, Any]]:
    """The base's lineage with this merge appended as the last round."""
    entry = new_round(
        source=source,
        fingerprint=fingerprint,
        config=adapter.config,
        scales={m.name: m.scale for m in adapter.modules.values()},
        dtype=dtype.replace("torch.", ""),
        report=None,
        receipt=None,
    )
    rounds = [*lineage(base_dir), entry]
    if receipt:  # one file per round, so that every round can be undone exactly
        entry["receipt"] = RECEIPT_FILE.replace(".safetensors", f"-{len(rounds):03d}.safetensors")
    return rounds


def _quantization_spec(
    qlora_base: str | None, quantization: QuantSpec | str | Mapping[str, Any] | Any, receipt: bool
) -> QuantSpec | None:
    """The bitsandbytes format a QLoRA merge simulates (``None``: not a QLoRA merge), after checking the arguments."""
    if receipt and qlora_base == "simulated":
        raise InvalidArgumentError(
            "receipt=True (--receipt) cannot be combined with qlora_base='simulated': a receipt restores the weights "
            "merged into, and those are the simulated quantized ones, not this checkpoint. Drop the receipt, or use "
            "qlora_base='original'."
        )
    if qlora_base not in (None, "original", "simulated"):
        raise InvalidArgumentError(f"qlora_base={qlora_base!r}: use 'simulated' or 'original'")
    if quantization is not None and qlora_base is None:
        raise InvalidArgumentError(
            "quantization= describes a QLoRA base; pass qlora_base='simulated' or 'original' with it"
        )
    return QuantSpec.of(quantization) if qlora_base is not None else None


def _prequantized(base_dir: Path, qlora_base: str | None) -> bool:
    """Whether the base checkpoint was saved quantized by bitsandbytes (refusing other methods)."""
    method = checkpoint_quantization(_read_config(base_dir))
    if method is None:
        return False
    if method != "bitsandbytes":
        raise UnsupportedQuantizationError(
            f"{str(base_dir)!r} is quantized with {method!r}, which loramerge cannot dequantize exactly. "
            "Merge into the unquantized base checkpoint instead (qlora_base='original' or 'simulated')."
        )
    if qlora_base is not None:
        raise InvalidArgumentError(
            f"{str(base_dir)!r} is already quantized with bitsandbytes: qlora_base= chooses between the 16-bit "
            "weights and a simulation of them, which a pre-quantized checkpoint does not have. Leave it out."
        )
    return True


def _alias_untied(base_dir: Path, reader: CheckpointReader, mapping: AdapterMapping) -> None:
    """Tensors the output stores on their own although the base ties them: read them from their source."""
    untie = _untie_plan(base_dir, reader, set(mapping.modules) | set(mapping.replaced) | set(mapping.variants))
    if mapping.tied_copies:
        warnings.warn(
            f"the adapter replaces {sorted(mapping.tied_copies)}, which the checkpoint ties to "
            f"{sorted(set(mapping.tied_copies.values()))}: the output stores them as tensors of their own (as adapter "
            "mode computes) and says tie_word_embeddings=false in config.json.",
            LoraMergeWarning,
            stacklevel=3,
        )
    for name, source in {**untie, **mapping.tied_copies}.items():
        reader.add_alias(name, source)


def _model_check(
    base_dir: Path,
    adapter: Adapter,
    mapping: AdapterMapping,
    target: torch.dtype | None,
    verify: bool | Literal["model"],
    tol: Tolerance,
    simulated: QuantSpec | None,
    merged_dir: Path,
    report: VerificationReport,
) -> VerificationReport:
    """The checks after the stream: PEFT's own layers judge the written checkpoint (not when the weights
    merged into were simulated), then, with ``verify="model"``, the whole-model output check."""
    if simulated is None:  # adapter mode on this base is the reference (not on a simulated one)
        report = _judged(report, base_dir, merged_dir, adapter, mapping, target, 0, every_layer=False)
    else:
        note = "not judged against PEFT's own layers: the weights merged into are simulated, not this checkpoint's"
        report = dataclasses.replace(report, notes=(*report.notes, note))
    if verify != "model" or not report.passed:
        return report
    return _whole_model_check(report, base_dir, merged_dir, adapter, target, tol, simulated)


def _whole_model_check(
    report: VerificationReport,
    base_dir: Path,
    merged_dir: Path,
    adapter: Adapter,
    target: torch.dtype | None,
    tol: Tolerance,
    simulated: QuantSpec | None,
) -> VerificationReport:
    """``verify="model"``: load base and result and run the whole-model output check of :func:`~loramerge.verify`."""
    from loramerge.formats.loading import load_base
    from loramerge.operations.verification import verify as verify_models

    if simulated is not None:  # the real QLoRA model: the base loaded with bitsandbytes
        reference = load_base(base_dir, dtype=target, quantization_config=bnb_config(simulated), device_map="cpu")
    else:
        reference = load_base(base_dir, dtype=target)
    full = verify_models(reference, adapter, load_base(merged_dir), tolerance=tol, check_outputs=True)
    return dataclasses.replace(report, passed=full.passed, outputs=full.outputs)


def _carry_receipts(src: Path, dst: Path, rounds: list[dict[str, Any]]) -> None:
    """Copy the receipts of earlier rounds along, so that each of them can still be undone exactly.

    A receipt name is read from the lineage, a file someone else may have written: it must be a
    plain file name of a regular file inside ``src`` (:func:`~loramerge.formats.confine.confined_file`)."""
    for r in rounds:
        name = r.get("receipt") if isinstance(r, dict) else None
        if name:
            path = confined_file(src, name, "lineage: receipt", must_exist=False)
            if path.is_file():
                shutil.copyfile(path, dst / path.name)


def _merge_prequantized(
    base_dir: Path,
    adapter: Adapter,
    out_dir: Path,
    dtype: str | torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    verify: bool,
    tolerance: Tolerance | None,
    started: float,
) -> CheckpointMergeReport:
    """A checkpoint saved quantized by bitsandbytes: load it, merge in memory (dequantizing), save it atomically."""
    from loramerge.formats.loading import load_base
    from loramerge.operations.inmemory import merge

    model = load_base(base_dir, device_map="cpu")
    result = merge(model, adapter, verify=verify, tolerance=tolerance, dtype=dtype)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        copied, _ = copy_side_files(base_dir, tmp)
        for side in copied:
            if side in ("config.json", "generation_config.json"):
                (tmp / side).unlink()  # written again below, without the quantization config
        cast(Any, result.model).save_pretrained(tmp, max_shard_size=max_shard_size)
        files = tuple(
            sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
        )
        written = sum((tmp / f).stat().st_size for f in files if f.endswith(".safetensors"))
    changed = tuple(sorted(f"{c.name}.weight" for c in result.report.layers))
    return CheckpointMergeReport(
        out_dir,
        "merge",
        files,
        len(result.model.state_dict()),
        changed,
        written,
        time.perf_counter() - started,
        result.report if verify else None,
        result.dora_norms,
        qlora_base=f"pre-quantized base: {result.base_format}",
    )
