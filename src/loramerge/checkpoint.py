"""Out-of-core merge, unmerge and verification of safetensors checkpoints, one tensor at a time.

The model is never instantiated: adapter keys are mapped to checkpoint tensor names, each adapted
tensor is read into a reused buffer, merged in fp32 and rounded once (:mod:`loramerge.delta`, the
same code as the in-memory merge, so the results are bit-identical), and streamed to the output
shards; untouched tensors are copied file to file. Reading the next tensor, writing the previous
ones and verifying finished shards overlap with the merge of the current one. The output is
written into a temporary directory beside ``out`` and renamed only once complete and verified.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from loramerge.adapter import Adapter, AdapterModule, load_adapter
from loramerge.checkpoint_plan import AdapterMapping, _read_config, _untie_plan, map_adapter
from loramerge.checkpoint_stream import _Expectations, _fixed_check, _probe_check, _publish
from loramerge.confine import confined_file
from loramerge.delta import Kind, LoraUpdate, check_updates, merge_tensor_, unmerge_tensor_
from loramerge.errors import (
    InvalidArgumentError,
    LoraMergeWarning,
    NonFiniteMergeError,
    UnmergeImpossibleError,
    UnsupportedQuantizationError,
)
from loramerge.hub_download import hub_path
from loramerge.io import atomic_directory
from loramerge.layer_checks import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
    check_stored,
    output_subset,
    restrict_update,
    restrict_weight,
    weight_space_check,
)
from loramerge.lineage_records import (
    METADATA_KEY,
    check_last,
    drop_round,
    fingerprint_of,
    lineage,
    new_round,
    summary,
    write_record,
)
from loramerge.loading import resolve_dtype
from loramerge.oracle import judge_by_peft
from loramerge.quant_spec import QuantSpec, bnb_config, checkpoint_quantization, quantizable, simulate
from loramerge.receipts import FILENAME as RECEIPT_FILE
from loramerge.receipts import Receipt, ReceiptError, as_receipt, load_receipt
from loramerge.receipts import apply as apply_receipt
from loramerge.receipts import encode as encode_receipt
from loramerge.reports import CheckpointMergeReport, LayerCheck, VerificationReport
from loramerge.shard_writer import copy_side_files
from loramerge.shards import CheckpointReader
from loramerge.tolerance import Tolerance, ulp

__all__ = ["CheckpointMergeReport", "map_adapter", "merge_checkpoint", "unmerge_checkpoint", "verify_checkpoint"]

logger = logging.getLogger(__name__)


def _updates_for(mod: AdapterModule, kind: Kind) -> LoraUpdate:
    """The module's weight update with the resolved kind (a LoRA bias is a separate tensor here)."""
    up = mod.update
    return LoraUpdate(kind, up.lora_A, up.lora_B, mod.scale, up.magnitude, None)


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
    if qlora_base not in (None, "original", "simulated"):
        raise InvalidArgumentError(f"qlora_base={qlora_base!r}: use 'simulated' or 'original'")
    if quantization is not None and qlora_base is None:
        raise InvalidArgumentError(
            "quantization= describes a QLoRA base; pass qlora_base='simulated' or 'original' with it"
        )
    spec = QuantSpec.of(quantization) if qlora_base is not None else None
    method = checkpoint_quantization(_read_config(base_dir))
    if method is not None:
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
        return _merge_prequantized(
            base_dir, loaded, out_dir, dtype, max_shard_size, overwrite, bool(verify), tolerance, started
        )
    if receipt and qlora_base == "simulated":
        raise InvalidArgumentError(
            "receipt=True (--receipt) cannot be combined with qlora_base='simulated': a receipt restores the weights "
            "merged into, and those are the simulated quantized ones, not this checkpoint. Drop the receipt, or use "
            "qlora_base='original'."
        )
    reader = CheckpointReader(base_dir)
    mapping = map_adapter(reader, loaded)
    fingerprint = fingerprint_of(loaded)
    rc = Receipt(fingerprint) if receipt else None
    entry = new_round(
        source=str(adapter) if not isinstance(adapter, Adapter) else str(loaded.path or "<in memory>"),
        fingerprint=fingerprint,
        config=loaded.config,
        scales={m.name: m.scale for m in loaded.modules.values()},
        dtype=str(resolve_dtype(dtype) or next(iter(reader.tensors.values())).dtype).replace("torch.", ""),
        report=None,
        receipt=None,
    )
    rounds = [*lineage(base_dir), entry]
    if receipt:  # one file per round, so that every round can be undone exactly
        entry["receipt"] = RECEIPT_FILE.replace(".safetensors", f"-{len(rounds):03d}.safetensors")
    untie = _untie_plan(base_dir, reader, set(mapping.modules) | set(mapping.replaced))
    if mapping.tied_copies:
        warnings.warn(
            f"the adapter replaces {sorted(mapping.tied_copies)}, which the checkpoint ties to "
            f"{sorted(set(mapping.tied_copies.values()))}: the output stores them as tensors of their own (as adapter "
            "mode computes) and says tie_word_embeddings=false in config.json.",
            LoraMergeWarning,
            stacklevel=2,
        )
    for name, source in {**untie, **mapping.tied_copies}.items():
        reader.add_alias(name, source)
    target = resolve_dtype(dtype)
    tol = tolerance or Tolerance()
    norms: dict[str, torch.Tensor] = {}
    expect = _Expectations()

    gaps: dict[str, float] = {}
    passthrough = {  # byte for byte: never read into memory, the writer copies their bytes
        name
        for name, info in reader.tensors.items()
        if name not in mapping.changed
        and not (target is not None and info.dtype.is_floating_point)
        and not (qlora_base == "simulated" and info.dtype.is_floating_point and quantizable(name, info.shape))
    }

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        quantized = spec is not None and quantizable(name, tuple(tensor.shape)) and tensor.is_floating_point()
        if name in mapping.modules:
            mod, kind = mapping.modules[name]
            up = _updates_for(mod, kind)
            if name in mapping.replaced:  # a saved embedding base: adapter mode applies the delta to it
                tensor = mapping.replaced[name].to(tensor.dtype, copy=True)  # merged into in place below
            work = tensor if target is None else tensor.to(target)
            source: torch.Tensor | None = None
            if spec is not None and quantized and kind == "linear":
                simulated = simulate(tensor, spec)
                gap = float(torch.linalg.vector_norm(simulated - tensor.float()))  # before work (maybe tensor) changes
                if qlora_base == "simulated":
                    source = simulated
            if verify:  # the probe's reference comes from the base tensor, before it is changed
                base_w = work if source is None else source.to(tensor.dtype)  # exact: bitsandbytes' values
                probe = LayerProbe(mod.name, kind, base_w, None, [up], 0, MAX_PROBE_OUTPUTS)
            original = work.clone() if rc is not None else None
            # The output is atomic, so non-finite results need not be found before computing them: the
            # rounding residual is NaN or infinite exactly when a result is non-finite or overflowed.
            stats = merge_tensor_(work, [up], source=source)
            if spec is not None and quantized and kind == "linear":
                gaps[mod.name] = gap / stats.delta_norm if stats.delta_norm > 0 else math.inf
            if not math.isfinite(stats.residual_norm) or not math.isfinite(stats.delta_norm):
                problems = check_updates([up], tensor if target is None else tensor.to(target)) or ["non-finite result"]
                raise NonFiniteMergeError(
                    f"merging {mod.name} would produce non-finite weights or overflow ({'; '.join(problems)}); "
                    "nothing was written. Check the adapter for NaN/Inf, or merge into a wider dtype."
                )
            if verify:
                expect.checks[name] = _probe_check(probe, tol, stats.relative_residual, math.nan, "")
            if "dora_norms" in stats.extras:
                norms[mod.name] = stats.extras["dora_norms"].cpu()
            if rc is not None and original is not None:
                recovered = work.clone()
                unmerge_tensor_(recovered, [up], norms.get(mod.name))
                rc.tensors[name] = encode_receipt(original, recovered)
                if mod.name in norms:
                    rc.dora_norms[mod.name] = norms[mod.name]
            return work
        if name in mapping.biases:
            mod = mapping.biases[name]
            assert mod.update.bias is not None
            work = tensor if target is None else tensor.to(target)
            merged_bias = (work.float() + mod.scale * mod.update.bias.float()).to(work.dtype)
            if rc is not None:
                recovered = (merged_bias.float() - mod.scale * mod.update.bias.float()).to(work.dtype)
                rc.tensors[name] = encode_receipt(work, recovered)
            return merged_bias
        if name in mapping.replaced:
            if rc is not None:
                rc.originals[name] = (tensor if target is None else tensor.to(target)).clone()
            return mapping.replaced[name].to(tensor.dtype if target is None else target)
        if name in mapping.token_rows:  # trainable tokens: PEFT's rows replace the base's, in its dtype
            ids, rows = mapping.token_rows[name]
            work = tensor if target is None else tensor.to(target)
            if rc is not None:
                rc.originals[name] = work.clone()
            return work.index_copy(0, ids, rows.to(work.dtype))
        if quantized and qlora_base == "simulated":
            assert spec is not None
            return simulate(tensor, spec).to(tensor.dtype if target is None else target)
        return tensor  # untouched but converted to ``dtype`` on the way out

    def model_check(tmp: Path, report: VerificationReport) -> VerificationReport:
        if qlora_base != "simulated":  # adapter mode on this base is the reference (not on a simulated one)
            report = _judged(report, base_dir, tmp, loaded, mapping, target, 0, every_layer=False)
        else:
            note = "not judged against PEFT's own layers: the weights merged into are simulated, not this checkpoint's"
            report = dataclasses.replace(report, notes=(*report.notes, note))
        if verify != "model" or not report.passed:
            return report
        from loramerge.loading import load_base
        from loramerge.verification import verify as verify_models

        if qlora_base == "simulated":  # the real QLoRA model: the base loaded with bitsandbytes
            assert spec is not None
            reference = load_base(base_dir, dtype=target, quantization_config=bnb_config(spec), device_map="cpu")
        else:
            reference = load_base(base_dir, dtype=target)
        full = verify_models(reference, loaded, load_base(tmp), tolerance=tol, check_outputs=True)
        return dataclasses.replace(report, passed=full.passed, outputs=full.outputs)

    def record(tmp: Path, verification: VerificationReport | None) -> None:
        done = dict(entry, verification=summary(verification))
        if rc is not None:
            rc.save(tmp / str(entry["receipt"]))
        _carry_receipts(base_dir, tmp, rounds[:-1])
        write_record(tmp, [*rounds[:-1], done], verification)

    report = _publish(
        "merge",
        base_dir,
        out_dir,
        reader,
        mapping,
        expect,
        transform,
        passthrough,
        target,
        max_shard_size,
        overwrite,
        progress,
        bool(verify),
        tol,
        started,
        model_check,
        norms,
        record,
        {METADATA_KEY: json.dumps(rounds, default=str)},
    )
    if spec is None:
        return report
    what = f"{qlora_base} ({spec.describe()})"
    if qlora_base == "simulated":
        what += ": every linear weight quantized and dequantized as bitsandbytes does, then merged"
    return dataclasses.replace(report, qlora_base=what, qlora_gap=gaps)


def _carry_receipts(src: Path, dst: Path, rounds: list[dict[str, Any]]) -> None:
    """Copy the receipts of earlier rounds along, so that each of them can still be undone exactly.

    A receipt name is read from the lineage, a file someone else may have written: it must be a
    plain file name of a regular file inside ``src`` (:func:`~loramerge.confine.confined_file`)."""
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
    from loramerge.inmemory import merge
    from loramerge.loading import load_base

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


def verify_checkpoint(
    base: str | Path,
    adapter: str | Path | Adapter,
    merged: str | Path,
    *,
    tolerance: Tolerance | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = False,
    max_outputs: int | None = None,
) -> VerificationReport:
    """Check, without loading any model, that ``merged`` is ``base`` with ``adapter`` merged in.

    Per adapted tensor: ``W_merged`` against ``W_base + ΔW`` elementwise (in ulps of the merged
    dtype) and a functional check on seeded random probe vectors (the merged tensor evaluated exactly
    against ``x W_baseᵀ + s (x Aᵀ) Bᵀ`` computed in fp32/fp64). Every other tensor must be
    byte-identical to the base (after ``dtype`` conversion, when one was asked for), every replaced
    tensor equal to the adapter's copy, and both checkpoints must hold the same tensors.

    ``max_outputs`` restricts the checks of each adapted tensor to a seeded sample of that many
    output features (``merge_checkpoint`` uses 512 for its own verification); ``None`` checks every
    element.

    Returns:
        The report (``outputs`` is ``None``: no model is run); the worst layers first in its text.

    Example:
        >>> print(verify_checkpoint("base/", "adapter/", "merged/"))  # doctest: +SKIP
    """
    tol = tolerance or Tolerance()
    loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    base_reader, merged_reader = CheckpointReader(base), CheckpointReader(merged)
    mapping = map_adapter(base_reader, loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraMergeWarning)
        untie = _untie_plan(Path(base), base_reader, set(mapping.modules) | set(mapping.replaced))
    for name, source in {**untie, **mapping.tied_copies}.items():
        if name in merged_reader.tensors:
            base_reader.add_alias(name, source)
    layers: list[LayerCheck] = []
    changed: list[str] = []
    wrong_dtype: list[str] = []
    notes = [
        "no model was run: per-tensor checks only (verify() on loaded models, or merge_checkpoint(verify='model'), "
        "adds the whole-model check)"
    ]
    if dtype is None:
        base_floats = {t.dtype for t in base_reader.tensors.values() if t.dtype.is_floating_point}
        merged_floats = {t.dtype for t in merged_reader.tensors.values() if t.dtype.is_floating_point}
        if len(merged_floats) == 1 and merged_floats != base_floats:
            dtype = next(iter(merged_floats))
            notes.append(
                f"every floating tensor of the merged checkpoint is {dtype}, the base's are "
                f"{sorted(str(d) for d in base_floats)}: compared after converting the base to {dtype}"
            )
    missing = sorted(set(base_reader.names) ^ set(merged_reader.names))
    bar = tqdm(total=len(base_reader.names), unit="tensor", desc="verify", disable=not progress)
    checked = 0
    for name in base_reader.names:
        bar.update(1)
        if name not in merged_reader.tensors:
            continue
        got = merged_reader.get(name)
        original = base_reader.get(name)
        if dtype is not None and original.is_floating_point():
            original = original.to(dtype)
        if got.dtype != original.dtype and name not in mapping.replaced:
            wrong_dtype.append(f"{name} ({original.dtype} expected, {got.dtype} found)")
            changed.append(name)
            continue
        if name in mapping.modules:
            mod, kind = mapping.modules[name]
            up = _updates_for(mod, kind)
            idx = output_subset(mod.name, kind, original, seed, max_outputs)
            sub = [restrict_update(up, idx)]
            rel, max_ulp, reason = weight_space_check(
                kind, restrict_weight(kind, original, idx), restrict_weight(kind, got, idx), sub, tol
            )
            probe = LayerProbe(mod.name, kind, original, None, [up], seed, max_outputs)
            out = probe.outputs(got, None)
            layers.append(check_stored(probe, out, tol, rel, max_ulp, reason, got))
            continue
        if name in mapping.biases:
            mod = mapping.biases[name]
            assert mod.update.bias is not None
            expected = (original.float() + mod.scale * mod.update.bias.float()).to(original.dtype)
            checked += 1
            if got.shape != expected.shape or bool(
                ((got.float() - expected.float()).abs() > ulp(expected, got.dtype)).any()
            ):
                changed.append(name)
            continue
        expected = mapping.replaced[name].to(got.dtype) if name in mapping.replaced else original
        if name in mapping.token_rows:
            ids, rows = mapping.token_rows[name]
            expected = original.index_copy(0, ids, rows.to(original.dtype))
        checked += 1
        if got.dtype != expected.dtype or got.shape != expected.shape or not torch.equal(got, expected):
            changed.append(name)
    bar.close()
    if wrong_dtype:
        notes.append(
            f"dtype mismatch in {len(wrong_dtype)} tensor(s), e.g. {wrong_dtype[:3]}: if the merge converted dtypes, "
            "pass dtype= (the CLI: compare checkpoints of the same dtype)"
        )
    if missing:
        notes.append(f"tensors present in only one checkpoint: {missing[:10]}")
    passed = all(c.passed for c in layers) and not changed and not missing
    report = VerificationReport(
        operation="verify",
        passed=passed,
        tolerance=tol,
        layers=tuple(layers),
        outputs=None,
        unchanged_checked=checked,
        unexpected_changes=tuple(sorted(changed + missing)),
        notes=tuple(notes),
    )
    return _judged(report, Path(base), Path(merged), loaded, mapping, dtype, seed)


def _judged(
    report: VerificationReport,
    base: Path,
    merged: Path,
    adapter: Adapter,
    mapping: AdapterMapping,
    dtype: torch.dtype | None,
    seed: int,
    every_layer: bool = True,
    rounded_base: bool = False,
) -> VerificationReport:
    """``report`` (loramerge's own checks of a merged checkpoint) joined with the judgement of PEFT's
    own layers (:mod:`loramerge.oracle`): a layer PEFT's adapter mode disagrees with fails, and a
    tensor loramerge's mapping changed that adapter mode leaves alone must equal the base's."""
    plan = {mod.name: (kind, mod.scale, mod.rank, mod.use_dora) for mod, kind in mapping.modules.values()}
    judged = judge_by_peft(base, merged, adapter, report.tolerance, dtype, seed, list(report.layers), every_layer, plan)
    wrong = list(judged.unexpected)
    base_reader, merged_reader = CheckpointReader(base), CheckpointReader(merged)
    for name in sorted(mapping.changed):
        if judged.leaves_alone(name) and name in merged_reader.tensors and name in base_reader.tensors:
            expected = base_reader.get(name) if dtype is None else base_reader.get(name).to(dtype)
            if not torch.equal(merged_reader.get(name), expected):
                wrong.append(name)  # changed, and adapter mode leaves it alone
    unexpected = tuple(sorted(set(report.unexpected_changes) | set(wrong)))
    return dataclasses.replace(
        report,
        passed=report.passed and all(c.passed for c in judged.layers) and not wrong,
        layers=tuple(judged.layers),
        unexpected_changes=unexpected,
        notes=(*report.notes, judged.note),
    )


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
