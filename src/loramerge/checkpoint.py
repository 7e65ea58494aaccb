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
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from loramerge.adapter import Adapter, AdapterModule, load_adapter
from loramerge.confine import confined_file
from loramerge.delta import Kind, LoraUpdate, check_updates, merge_tensor_, unmerge_tensor_
from loramerge.directio import BufferPool
from loramerge.errors import (
    AdapterMismatchError,
    InvalidArgumentError,
    LoraMergeWarning,
    NonFiniteMergeError,
    UnmergeImpossibleError,
    UnsupportedAdapterError,
    UnsupportedQuantizationError,
    VerificationError,
)
from loramerge.hub_download import hub_path
from loramerge.io import atomic_directory, read_json_object
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
from loramerge.quantized import QuantSpec, bnb_config, checkpoint_quantization, quantizable, simulate
from loramerge.receipts import FILENAME as RECEIPT_FILE
from loramerge.receipts import Receipt, ReceiptError, as_receipt, load_receipt
from loramerge.receipts import apply as apply_receipt
from loramerge.receipts import encode as encode_receipt
from loramerge.reports import LayerCheck, VerificationReport
from loramerge.shards import (
    CheckpointReader,
    ShardWriter,
    TensorInfo,
    copy_side_files,
    parse_size,
    plan_shards,
    return_freed_memory_to_os,
    scan_file,
)
from loramerge.skeleton import kind_of, layer_kinds, renamed_keys, tied_groups
from loramerge.tolerance import Tolerance, ulp
from loramerge.verification import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
    check_stored,
    output_subset,
    restrict_update,
    restrict_weight,
    weight_space_check,
)

__all__ = ["CheckpointMergeReport", "map_adapter", "merge_checkpoint", "unmerge_checkpoint", "verify_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointMergeReport:
    """What :func:`merge_checkpoint` or :func:`unmerge_checkpoint` wrote, and its verification.

    Attributes:
        output: The finished checkpoint directory.
        operation: ``"merge"`` or ``"unmerge"``.
        files: The weight files written (shards and index).
        tensors: Number of tensors written.
        changed: Names of the tensors the adapter changed.
        bytes_written: Bytes of tensor data written.
        seconds: Wall time of the whole operation (verification included).
        verification: The verification report (``None`` with ``verify=False``).
        dora_norms: For DoRA modules merged, the norms an unmerge needs (by module name).
        qlora_base: With ``qlora_base=``: which base the adapter was merged into and the
            quantization simulated, e.g. ``"simulated nf4, double quantization, blocks of 64"``.
        qlora_gap: With ``qlora_base=``: per adapted module, how far the two choices of base are
            apart, ``‖W_simulated − W_original‖ / ‖ΔW‖`` (the quantization error the adapter was
            trained against, as a fraction of the adapter's own update).
        side_files: The base's side files copied into the output (config, tokenizer, ...).
        skipped: Entries of the base directory not copied, each with the reason (subdirectories,
            links out of the directory, files a transformers checkpoint does not need).
    """

    output: Path
    operation: str
    files: tuple[str, ...]
    tensors: int
    changed: tuple[str, ...]
    bytes_written: int
    seconds: float
    verification: VerificationReport | None
    dora_norms: Mapping[str, torch.Tensor] = field(default_factory=dict)
    qlora_base: str = ""
    qlora_gap: Mapping[str, float] = field(default_factory=dict)
    side_files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Whether verification passed (``True`` when it did not run)."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "output": str(self.output),
            "operation": self.operation,
            "files": list(self.files),
            "tensors": self.tensors,
            "changed": list(self.changed),
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "qlora_base": self.qlora_base,
            "qlora_gap": dict(self.qlora_gap),
            "side_files": list(self.side_files),
            "skipped": list(self.skipped),
        }

    def __str__(self) -> str:
        gb = self.bytes_written / 1e9
        lines = [
            f"{self.operation}d checkpoint written to {self.output}: {self.tensors} tensors ({len(self.changed)} changed), "
            f"{gb:.2f} GB in {len(self.files)} file(s), {self.seconds:.1f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s)"
        ]
        if self.qlora_base:
            lines.append(f"QLoRA base: {self.qlora_base}")
        if self.qlora_gap:
            gaps = sorted(self.qlora_gap.items(), key=lambda kv: kv[1])
            median = gaps[len(gaps) // 2][1]
            lines.append(
                f"  simulated vs original base, ‖W_sim − W_orig‖ / ‖ΔW‖ per layer: median {median:.3g}, "
                f"worst {gaps[-1][1]:.3g} ({gaps[-1][0]})"
            )
        if self.skipped:
            lines.append(f"not copied from the base: {', '.join(self.skipped)}")
        lines.append(str(self.verification) if self.verification is not None else "verification off")
        return "\n".join(lines)


def _resolve(names: set[str], wanted: str) -> str | None:
    """The checkpoint tensor name for an adapter's ``wanted`` name, allowing for prefix differences."""
    if wanted in names:
        return wanted
    matches = [n for n in names if n.endswith("." + wanted)]
    if len(matches) == 1:
        return matches[0]
    parts = wanted.split(".")
    for i in range(1, len(parts) - 1):
        tail = ".".join(parts[i:])
        if tail in names:
            return tail
    return None


def _expected_shape(kind: Kind, update: LoraUpdate) -> tuple[int, ...]:
    a, b = update.lora_A, update.lora_B
    if kind == "linear":
        return (int(b.shape[0]), int(a.shape[1]))
    if kind in ("conv1d", "embedding"):
        return (int(a.shape[1]), int(b.shape[0]))
    return (int(b.shape[0]), *(int(s) for s in a.shape[1:]))


@dataclass
class AdapterMapping:
    """Adapter entries resolved to checkpoint tensor names."""

    modules: dict[str, tuple[AdapterModule, Kind]]  # weight tensor name -> module, resolved kind
    biases: dict[str, AdapterModule]  # bias tensor name -> module with a lora_bias
    replaced: dict[str, torch.Tensor]  # tensor name -> replacement
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (ids, rows)
    # a replaced tensor the checkpoint does not store because it is tied to one it does: written as
    # its own tensor (the output unties it), name -> the stored tensor it was tied to
    tied_copies: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> set[str]:
        """Every tensor name the adapter changes."""
        return set(self.modules) | set(self.biases) | set(self.replaced) | set(self.token_rows)


def _weight_layout(
    root: Path, module_name: str, mod: AdapterModule, shape: tuple[int, ...], layers: list[dict[str, str] | None]
) -> str:
    """``"linear"`` ([out, in]) or ``"conv1d"`` ([in, out], GPT-2) for a linear-like adapted weight, or
    a problem. A non-square stored shape fits one layout only. A square one fits both, and the
    adapter's ``fan_in_fan_out`` (saved once for all targets) cannot be trusted: the layer class of
    the model the config builds (:mod:`loramerge.skeleton`) decides, as in adapter mode."""
    candidates: tuple[Kind, ...] = ("linear", "conv1d")
    fits = [k for k in candidates if _expected_shape(k, mod.update) == shape]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        return mod.kind
    if not layers:
        layers.append(layer_kinds(root))
    known = layers[0]
    layer = kind_of(known, module_name) if known is not None else None
    if layer in ("linear", "conv1d"):
        return layer
    why = (
        "transformers cannot build this model from its config.json"
        if known is None
        else f"the model built from config.json has no unique Linear or Conv1D layer named {module_name!r}"
    )
    return (
        f"the weight is square {shape}, so a Linear ([out, in]) and a GPT-2 Conv1D ([in, out]) store it alike, and "
        f"{why}; merging it would be a guess. Merge in memory (loramerge.merge on the loaded model) instead."
    )


def map_adapter(reader: CheckpointReader, adapter: Adapter) -> AdapterMapping:
    """Map every adapter entry to a checkpoint tensor, checking shapes; one error lists every problem."""
    names = set(reader.names)
    problems: list[tuple[str, str]] = []
    layers: list[dict[str, str] | None] = []  # the model's layer kinds, built once if needed
    renamed: list[dict[str, str]] = []  # transformers' own key conversions, built once if needed

    def resolve(wanted: str) -> str | None:
        """The stored name of the model's ``wanted``: as saved, else as transformers' loading renames
        it (VLM and legacy names), else by a unique suffix."""
        if wanted in names:
            return wanted
        if not renamed:
            renamed.append(renamed_keys(reader.root, reader.names))
        return renamed[0].get(wanted) or _resolve(names, wanted)

    modules: dict[str, tuple[AdapterModule, Kind]] = {}
    biases: dict[str, AdapterModule] = {}
    for module_name, mod in adapter.modules.items():
        tensor = resolve(f"{module_name}.weight")
        if tensor is None:
            problems.append((module_name, "no tensor named like this in the checkpoint"))
            continue
        shape = reader.tensors[tensor].shape
        kind: Kind = mod.kind
        if kind in ("linear", "conv1d"):
            resolved = _weight_layout(reader.root, module_name, mod, shape, layers)
            if isinstance(resolved, str) and resolved not in ("linear", "conv1d"):
                problems.append((module_name, resolved))
                continue
            kind = cast(Kind, resolved)
        if _expected_shape(kind, mod.update) != shape:
            problems.append(
                (module_name, f"{tensor} has shape {shape}; the adapter's A/B fit {_expected_shape(kind, mod.update)}")
            )
            continue
        if mod.update.bias is not None:
            bias = resolve(f"{module_name}.bias")
            if bias is None:
                problems.append((module_name, "the adapter has a lora_bias but the checkpoint has no bias for it"))
                continue
            biases[bias] = mod
        modules[tensor] = (mod, kind)
    replaced: dict[str, torch.Tensor] = {}
    tied_copies: dict[str, str] = {}
    for pname, value in adapter.replaced.items():
        tensor = resolve(pname)
        partner = _stored_tie_partner(reader, pname) if tensor is None else None
        if partner is not None and reader.tensors[partner].shape == tuple(value.shape):
            replaced[pname], tied_copies[pname] = value, partner  # e.g. modules_to_save=["lm_head"], tied
            continue
        if tensor is None:
            problems.append(
                (
                    pname,
                    f"the adapter replaces this tensor ({adapter.replaced_kinds[pname]}) but the checkpoint has none",
                )
            )
        elif reader.tensors[tensor].shape != tuple(value.shape):
            problems.append(
                (
                    pname,
                    f"the checkpoint's {tensor} has shape {reader.tensors[tensor].shape}, the adapter's {tuple(value.shape)}",
                )
            )
        else:
            replaced[tensor] = value
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for pname, (ids, rows) in adapter.token_rows.items():
        tensor = resolve(pname)
        shape = reader.tensors[tensor].shape if tensor is not None else ()
        if tensor is None or len(shape) != 2:
            problems.append((pname, "the adapter replaces token rows of this embedding but the checkpoint has none"))
        elif rows.shape[1] != shape[1] or int(ids.max()) >= shape[0]:
            problems.append(
                (pname, f"rows of {rows.shape[1]} values for token ids up to {int(ids.max())}; {tensor} is {shape}")
            )
        else:
            token_rows[tensor] = (ids, rows)
    if problems:
        problems.sort()
        lines = "\n".join(f"  - {n}: {why}" for n, why in problems)
        raise AdapterMismatchError(
            f"the adapter {str(adapter.path or '<in memory>')!r} does not fit the checkpoint {str(reader.root)!r}, "
            f"{len(problems)} problem(s):\n{lines}\nUse the base checkpoint the adapter was trained on."
        )
    return AdapterMapping(modules, biases, replaced, token_rows, tied_copies)


def _stored_tie_partner(reader: CheckpointReader, name: str) -> str | None:
    """The stored tensor ``name`` is tied to in the model the checkpoint's config builds (``None``
    when it is not tied, or the model cannot be built)."""
    for group in tied_groups(reader.root) or []:
        if name in group:
            stored = [n for n in group if n in reader.tensors]
            return stored[0] if len(stored) == 1 else None
    return None


_INPUT_EMBEDDING_KEYS = ("embed_tokens", "wte.", "word_embeddings", "embed_in")
_TIEABLE_KEYS = ("embed", "shared", "wte", "wpe", "word_embeddings", "lm_head", "head", "output")


def _read_config(root: Path) -> dict[str, Any]:
    if not (root / "config.json").is_file():
        return {}
    return read_json_object(root / "config.json", "config")


def _untie_plan(root: Path, reader: CheckpointReader, touched: set[str]) -> dict[str, str]:
    """``{tied name: stored name}`` for every tensor that shares storage with one the adapter changes
    (the model's own tied-weights declarations, from the weightless model the config builds): in
    adapter mode the others do not see the delta, so the output writes them with the original values
    and says ``tie_word_embeddings=false``. T5 and BART tie ``shared`` to both ``embed_tokens`` and
    ``lm_head``; decoder LMs tie ``lm_head`` to the input embedding. Without a buildable model, the
    input-embedding / ``lm_head`` tie of the config is the only one known."""
    # transformers ties embeddings and output heads only: the weightless model (2-3 s to build) is
    # consulted when the adapter changes one of those
    groups = tied_groups(root) if any(k in n for n in touched for k in _TIEABLE_KEYS) else []
    if groups is not None:
        plan: dict[str, str] = {}
        for group in groups:
            changed = sorted(n for n in group if n in touched and n in reader.tensors)
            if changed:
                plan.update({n: changed[0] for n in group if n not in reader.tensors})
        if plan:
            warnings.warn(
                f"the checkpoint ties {sorted(plan)} to {sorted(set(plan.values()))}, which the adapter changes: the "
                "output stores them with the original values (as adapter mode computes) and says "
                "tie_word_embeddings=false in config.json.",
                LoraMergeWarning,
                stacklevel=3,
            )
        return plan
    config = _read_config(root)
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
    changed = sorted(n for n in touched if any(k in n for k in _INPUT_EMBEDDING_KEYS))
    if not tied or not changed or "lm_head.weight" in reader.tensors:
        return {}
    if len(changed) != 1:
        raise UnsupportedAdapterError(
            f"the checkpoint ties its embeddings and the adapter changes {changed}; which one is the tied input "
            "embedding is ambiguous. Merge in memory (loramerge.merge), which unties from the model's own ties."
        )
    warnings.warn(
        f"the checkpoint ties lm_head to {changed[0]}, which the adapter changes: the output stores lm_head.weight "
        "with the original values (as adapter mode computes) and says tie_word_embeddings=false in config.json.",
        LoraMergeWarning,
        stacklevel=3,
    )
    return {"lm_head.weight": changed[0]}


def _untie_config(root: Path) -> None:
    path = root / "config.json"
    config = _read_config(root)
    if not config:
        return
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class _Pipeline:
    """Read-ahead of the next tensor to transform and write-behind of the previous ones, around the
    caller's compute.

    Tensors in ``passthrough`` are never read into memory: the writer copies their bytes from the
    source file (hashing them on the way when ``written`` is given). The others are read into buffers of a
    :class:`~loramerge.directio.BufferPool` (three: one being read, one being transformed, one
    being written), which bounds the memory held by the pipeline.
    """

    def __init__(
        self,
        reader: CheckpointReader,
        names: list[str],
        writer: ShardWriter,
        passthrough: set[str],
        written: dict[str, str] | None,
    ):
        self.reader, self.names, self.writer, self.passthrough = reader, names, writer, passthrough
        self.written = written  # name -> digest (XXH3-128) of the bytes written, recorded by the writer's thread
        self.buffers = BufferPool(3)
        self.reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramerge-read")
        self.writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramerge-write")
        self.pending: list[tuple[Future[None], torch.Tensor | None]] = []  # in plan order
        self._lent: torch.Tensor | None = None

    def _read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = self.buffers.take(self.reader.tensors[name].nbytes)
        try:
            return self.reader.read_into(name, buffer), buffer
        except BaseException:
            self.buffers.give(buffer)
            raise

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """``(name, tensor)`` in plan order; ``tensor`` is ``None`` for a passthrough tensor (already
        queued for copying). Call :meth:`write` with each tensor's result before the next step."""
        todo = iter([n for n in self.names if n not in self.passthrough])
        first = next(todo, None)
        ahead = self.reads.submit(self._read, first) if first is not None else None
        for name in self.names:
            self._collect(block=False)
            if name in self.passthrough:
                self.pending.append((self.writes.submit(self._copy, name), None))
                yield name, None
                continue
            assert ahead is not None
            tensor, self._lent = ahead.result()
            following = next(todo, None)
            ahead = self.reads.submit(self._read, following) if following is not None else None
            yield name, tensor

    def _copy(self, name: str) -> None:
        path, offset = self.reader.location(name)
        digest = self.writer.copy(name, path, offset, self.reader.tensors[name].nbytes, self.written is not None)
        if self.written is not None and digest is not None:
            self.written[name] = digest

    def _write(self, name: str, tensor: torch.Tensor, buffer: torch.Tensor | None) -> None:
        try:
            digest = self.writer.write(name, tensor, self.written is not None)
            if self.written is not None and digest is not None:
                self.written[name] = digest
        finally:
            if buffer is not None:
                self.buffers.give(buffer)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue the result for ``name`` (the tensor just yielded) for writing; its buffer is reused after that."""
        buffer, self._lent = self._lent, None
        self.pending.append((self.writes.submit(self._write, name, tensor, buffer), buffer))

    def _collect(self, block: bool) -> None:
        """Forget finished writes, in order, raising the first failure."""
        while self.pending and (block or self.pending[0][0].done()):
            self.pending.pop(0)[0].result()

    def finish(self) -> None:
        self._collect(block=True)
        self.reads.shutdown(wait=True)
        self.writes.shutdown(wait=True)
        self.writer.close()

    def abort(self) -> None:
        """Stop after a failure: let the threads end, close the open shard, keep the first error."""
        self.writes.shutdown(wait=True, cancel_futures=True)
        for future, buffer in self.pending:
            if future.cancelled() and buffer is not None:
                self.buffers.give(buffer)  # a read waiting for a buffer can then finish
        if self._lent is not None:
            self.buffers.give(self._lent)
        self.reads.shutdown(wait=True, cancel_futures=True)
        self.writer.abort()


@dataclass
class _Expectations:
    """What the written checkpoint must hold, gathered while streaming: digests and layer probes."""

    digests: dict[str, str] = field(default_factory=dict)  # XXH3-128 of the bytes written (the writer's thread)
    unchanged: set[str] = field(default_factory=set)
    checks: dict[str, Callable[[torch.Tensor], LayerCheck]] = field(default_factory=dict)


def _probe_check(
    probe: LayerProbe, tol: Tolerance, rel: float, max_ulp: float, reason: str
) -> Callable[[torch.Tensor], LayerCheck]:
    """A check of a merged tensor as read back from disk against the probe made from its base."""

    def check(tensor: torch.Tensor) -> LayerCheck:
        return check_stored(probe, probe.outputs(tensor, None), tol, rel, max_ulp, reason, tensor)

    return check


def _fixed_check(layer: LayerCheck) -> Callable[[torch.Tensor], LayerCheck]:
    """A check already made while streaming (an unmerge compares with the merged input there)."""

    def check(tensor: torch.Tensor) -> LayerCheck:
        return layer

    return check


class _Verifier:
    """Re-reads each shard as soon as it is complete, in a background thread, while later shards
    are still being merged: every tensor's digest (XXH3-128) must be the one computed when it was written
    (for untouched tensors, that of the base's bytes), and every adapted tensor, as read back, must
    pass its layer probe."""

    def __init__(self, expect: _Expectations):
        self.expect = expect
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramerge-verify")
        self.futures: list[Future[tuple[list[str], list[LayerCheck], list[str]]]] = []

    def shard_written(self, path: Path) -> None:
        """Queue ``path`` for checking (called by the writer when a shard is closed)."""
        self.futures.append(self.pool.submit(self._check, path))

    def _check(self, path: Path) -> tuple[list[str], list[LayerCheck], list[str]]:
        seen: list[str] = []
        layers: list[LayerCheck] = []
        wrong: list[str] = []
        for name, digest, tensor in scan_file(path, keep=set(self.expect.checks)):
            seen.append(name)
            if digest != self.expect.digests.get(name):
                wrong.append(name)
            if tensor is not None:  # checked once: drop the probe, so memory does not grow with the model
                layers.append(self.expect.checks.pop(name)(tensor))
        return seen, layers, wrong

    def report(self, root: Path, names: list[str], tol: Tolerance, operation: str) -> VerificationReport:
        """Wait for every shard's check and put them together; the checkpoint must hold exactly ``names``."""
        seen: list[str] = []
        layers: list[LayerCheck] = []
        wrong: list[str] = []
        for future in self.futures:
            s, lay, w = future.result()
            seen += s
            layers += lay
            wrong += w
        self.pool.shutdown(wait=True)
        wrong += (set(names) ^ set(seen)) | (set(names) ^ set(CheckpointReader(root).names))  # missing or unexpected
        notes = (
            "re-read from disk: every tensor's XXH3-128 digest checked, adapted tensors probed as read back "
            f"(a seeded sample of up to {MAX_PROBE_OUTPUTS} output features each); no model was run",
        )
        passed = all(c.passed for c in layers) and not wrong
        return VerificationReport(
            operation,  # type: ignore[arg-type]
            passed,
            tol,
            tuple(layers),
            None,
            unchanged_checked=len(self.expect.unchanged),
            unexpected_changes=tuple(sorted(set(wrong))),
            notes=notes,
        )

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _compute_threads(threads: int) -> int:
    """Torch threads for the merge arithmetic while streaming: one core is left to the reading,
    hashing and writing threads (OpenMP workers that share a core with them mostly wait: measured
    on 2 cores, a merge took 26 ms with 2 torch threads beside a busy thread against 16 ms with 1)."""
    return max(1, min(threads, (os.cpu_count() or 2) - 1))


def _stream(
    base: Path,
    out: Path,
    reader: CheckpointReader,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    progress: bool,
    finalize: Callable[[Path], None],
    desc: str,
    passthrough: set[str],
    verifier: _Verifier | None,
    extra_metadata: Mapping[str, str],
    sides: list[list[str]],
) -> tuple[tuple[str, ...], int]:
    infos = [
        TensorInfo(t.name, dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype, t.shape, t.file)
        for t in reader.tensors.values()
    ]
    plan = plan_shards(infos, parse_size(max_shard_size))
    return_freed_memory_to_os()
    metadata = {**dict(reader.metadata.get(reader.files[0], {})), **extra_metadata}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        sides[:] = copy_side_files(base, tmp)
        if dtype is not None:
            _set_config_dtype(tmp, dtype)
        if any(name not in reader.stored for name in reader.names):
            _untie_config(tmp)
        order = [t.name for shard in plan for t in shard]
        writer = ShardWriter(tmp, plan, metadata, on_close=verifier.shard_written if verifier is not None else None)
        pipe = _Pipeline(reader, order, writer, passthrough, verifier.expect.digests if verifier is not None else None)
        bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress)
        threads = torch.get_num_threads()
        torch.set_num_threads(_compute_threads(threads))
        try:
            for count, (name, tensor) in enumerate(pipe, start=1):
                if tensor is not None:
                    result = transform(name, tensor)
                    if dtype is not None and result.is_floating_point():
                        result = result.to(dtype)
                    pipe.write(name, result)
                    del tensor, result  # the writer holds it now; do not keep it alive through the next read
                bar.update(reader.tensors[name].nbytes)
                bar.set_postfix_str(f"{count}/{len(order)} tensors", refresh=False)
            bar.close()
            pipe.finish()
            torch.set_num_threads(threads)
            finalize(tmp)
        except BaseException:
            bar.close()
            pipe.abort()  # the temporary directory goes; the original error is what the caller sees
            if verifier is not None:
                verifier.abort()
            raise
        finally:
            torch.set_num_threads(threads)
        files = tuple(
            sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
        )
        written = writer.bytes_written
    return files, written


def _set_config_dtype(root: Path, dtype: torch.dtype) -> None:
    path = root / "config.json"
    if not path.is_file():
        return
    config = read_json_object(path, "the base's config.json")
    name = str(dtype).replace("torch.", "")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _updates_for(mod: AdapterModule, kind: Kind) -> LoraUpdate:
    """The module's weight update with the resolved kind (a LoRA bias is a separate tensor here)."""
    up = mod.update
    return LoraUpdate(kind, up.lora_A, up.lora_B, mod.scale, up.magnitude, None)


def _publish(
    operation: Literal["merge", "unmerge"],
    src: Path,
    out: Path,
    reader: CheckpointReader,
    mapping: AdapterMapping,
    expect: _Expectations,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    passthrough: set[str],
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    progress: bool,
    verify: bool,
    tol: Tolerance,
    started: float,
    extra_check: Callable[[Path, VerificationReport], VerificationReport] | None = None,
    norms: Mapping[str, torch.Tensor] | None = None,
    record: Callable[[Path, VerificationReport | None], None] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> CheckpointMergeReport:
    """Stream ``src`` through ``transform`` into ``out`` (``passthrough`` tensors are copied byte for
    byte instead), verify what was written, write the record (lineage, receipt) and publish it all
    atomically."""
    expect.unchanged.update(passthrough)
    reports: list[VerificationReport] = []
    verifier = _Verifier(expect) if verify else None

    def finalize(tmp: Path) -> None:
        if verifier is None:
            if record is not None:
                record(tmp, None)
            return
        report = verifier.report(tmp, reader.names, tol, operation)
        if extra_check is not None and report.passed:
            report = extra_check(tmp, report)
        reports.append(report)
        if not report.passed:
            raise VerificationError(
                f"the {operation}d checkpoint is out of tolerance; nothing was written:\n" + "\n".join(report.failures),
                report,
            )
        if record is not None:
            record(tmp, report)

    sides: list[list[str]] = [[], []]
    files, written = _stream(
        src,
        out,
        reader,
        transform,
        dtype,
        max_shard_size,
        overwrite,
        progress,
        finalize,
        operation,
        passthrough,
        verifier,
        extra_metadata or {},
        sides,
    )
    changed = tuple(sorted(mapping.changed))
    return CheckpointMergeReport(
        out,
        operation,
        files,
        len(reader.names),
        changed,
        written,
        time.perf_counter() - started,
        reports[0] if reports else None,
        dict(norms or {}),
        side_files=tuple(sides[0]),
        skipped=tuple(sides[1]),
    )


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
