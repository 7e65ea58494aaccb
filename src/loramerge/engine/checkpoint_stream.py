"""The streaming engine of a checkpoint merge: read each tensor, transform it, write it to the
output shards, verify what was written, and publish the directory atomically.

Reading the next tensor, writing the previous ones and verifying finished shards overlap with the
merge of the current one (:class:`_Pipeline`); :class:`_Verifier` re-checks every stored tensor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from loramerge.errors import (
    VerificationError,
)
from loramerge.formats.directio import BufferPool
from loramerge.formats.io import atomic_directory, read_json_object
from loramerge.formats.shard_writer import (
    ShardWriter,
    copy_side_files,
    plan_shards,
    return_freed_memory_to_os,
    trim_heap,
)
from loramerge.formats.shards import CheckpointReader, TensorInfo, parse_size, scan_file
from loramerge.numerics.tolerance import Tolerance
from loramerge.plan.checkpoint_plan import AdapterMapping, _untie_config
from loramerge.proof.layer_checks import MAX_PROBE_OUTPUTS, LayerProbe, check_stored
from loramerge.proof.reports import LayerCheck, VerificationReport
from loramerge.proof.results import CheckpointMergeReport

logger = logging.getLogger(__name__)


class _Pipeline:
    """Read-ahead of the next tensor to transform and write-behind of the previous ones, around the
    caller's compute.

    Tensors in ``passthrough`` are never read into memory: the writer copies their bytes from the
    source file (hashing them on the way when ``written`` is given). The others are read into buffers of a
    :class:`~loramerge.formats.directio.BufferPool` (three: one being read, one being transformed, one
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
        self.buffers.clear()  # what runs next (the verification's end, PEFT's judgement) needs that memory

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
            return_freed_memory_to_os()
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
            trim_heap()  # the stream's freed temporaries, before the judgement's widened copies
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
