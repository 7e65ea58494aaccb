"""Writing checkpoints: shard planning and names, the streaming shard writer with its digests,
and the side files a checkpoint carries (:mod:`loramerge.formats.shards` reads them)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import (
    LoraMergeError,
    OutputWriteError,
)
from loramerge.formats.confine import side_files
from loramerge.formats.directio import SequentialWriter, byte_view
from loramerge.formats.safetensors_header import _ST_NAMES, _truncated
from loramerge.formats.shards import _M_MMAP_THRESHOLD, INDEX_NAME, SINGLE_NAME, TensorInfo, _human, new_hasher

__all__ = ["ShardWriter", "copy_side_files", "plan_shards", "tensor_digest"]


def fast_digest(tensor: torch.Tensor) -> str:
    """:func:`new_hasher`'s digest of a tensor's bytes in its stored layout."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    hasher = new_hasher()
    hasher.update(byte_view(data))
    return str(hasher.hexdigest())


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in its stored layout (dtype and shape not included)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(byte_view(data)).hexdigest()


def trim_heap() -> None:
    """Hand the heap memory freed so far back to the system (glibc's ``malloc_trim``): called between
    a stream and the judgement that follows it, whose widened copies of one layer would otherwise
    come on top of the stream's freed but still resident temporaries (measured on the 3.55 GB merge:
    peak 0.74 GB with it, 0.86-0.96 GB without). A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # musl or another libc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages (clean file pages are dropped; nothing is discarded)


def release_pages(tensors: Sequence[torch.Tensor]) -> None:
    """Ask the kernel to take back the resident pages of tensors this process is done reading for now
    (``madvise(MADV_PAGEOUT)`` on the whole pages inside each tensor).

    Used for an adapter's factors once their module is merged: safetensors maps the adapter file, so
    every page read stays resident, and a whole adapter (71 MB for r=16 on every projection of a
    Qwen2-1.5B shape, twice that at twice the depth) would otherwise sit on top of a streaming merge
    whose memory is meant not to grow with the model. Reclaiming never changes a value: a file page
    is read again on the next access, and memory that has no file behind it (a tensor someone
    changed in place, or one not mapped from a file) is left where it is when there is no swap, or
    swapped out and back. A no-op off Linux or where the kernel does not know the advice."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        for t in tensors:
            if t.device.type != "cpu" or not t.numel():
                continue
            start = t.data_ptr()
            stop = start + t.numel() * t.element_size()
            first, last = -(-start // page) * page, stop // page * page  # whole pages only
            if last > first:
                libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def return_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold at 32 MiB, so that resident memory stays flat while streaming.

    By default glibc raises its mmap threshold dynamically after large blocks are freed; tensors
    below it then come from heap arenas that fragment and are not returned, so a streaming merge's
    resident memory grew with the number of tensors (measured when every tensor was a fresh
    allocation: 1.8 GB at 28 layers, 3.2 GB at 56). The large tensors now live in reused buffers
    (:class:`~loramerge.formats.directio.BufferPool`); a fixed threshold keeps the rest flat. 32 MiB rather
    than less: smaller temporaries then come from the heap instead of fresh, page-faulted mappings
    (measured: 2.5 s of system time instead of 3.9-4.6 s for a 3.55 GB merge). Process-wide,
    harmless elsewhere; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    """Transformers' shard file names: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes planned shards into a directory, one tensor at a time, in plan order.

    Call :meth:`write` (a tensor in memory) or :meth:`copy` (bytes straight from another
    safetensors file) once per tensor in the order of the plan, then :meth:`close` (which writes
    the index for sharded output). Every header is final before its data is written. Files are
    written through :class:`~loramerge.formats.directio.SequentialWriter` (``O_DIRECT`` where available).
    ``on_close`` is called with each shard's path once that shard is complete (from the thread
    that completed it).

    Raises:
        OutputWriteError: The disk is full (with the size the output needs).
    """

    def __init__(
        self,
        root: Path,
        plan: list[list[TensorInfo]],
        metadata: dict[str, str] | None = None,
        on_close: Callable[[Path], None] | None = None,
    ):
        self.root = root
        self.plan = plan
        self.on_close = on_close
        self.names = shard_names(len(plan))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue: Iterator[tuple[int, TensorInfo]] = ((i, t) for i, shard in enumerate(plan) for t in shard)
        self._file: SequentialWriter | None = None
        self._current = -1
        self.bytes_written = 0

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        offsets: dict[str, Any] = {"__metadata__": self.metadata}
        position = 0
        for info in self.plan[index]:
            offsets[info.name] = {
                "dtype": _ST_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [position, position + info.nbytes],
            }
            position += info.nbytes
        header = json.dumps(offsets, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self._file = SequentialWriter(self.root / self.names[index])
        self._file.write(torch.frombuffer(bytearray(struct.pack("<Q", len(header)) + header), dtype=torch.uint8))
        self._current = index

    def _close_shard(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with self._disk_errors(file.path.name):
                file.close()
            if self.on_close is not None:
                self.on_close(file.path)

    def _next(
        self, name: str, shape: tuple[int, ...] | None, dtype: torch.dtype | None, nbytes: int
    ) -> SequentialWriter:
        index, info = next(self._queue)
        if (
            info.name != name
            or info.nbytes != nbytes
            or shape not in (None, info.shape)
            or dtype not in (None, info.dtype)
        ):
            raise LoraMergeError(
                f"internal error: writer expected {info.name} {info.shape} {info.dtype}, got {name} {shape} {dtype} "
                f"({nbytes} bytes)"
            )
        if index != self._current:
            with self._disk_errors(name):
                self._open_shard(index)
        assert self._file is not None
        self.bytes_written += info.nbytes
        return self._file

    @contextlib.contextmanager
    def _disk_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            planned = sum(t.nbytes for shard in self.plan for t in shard)
            raise OutputWriteError(
                e.errno,
                f"the disk is full while writing {what} into {self.root} (the output needs about "
                f"{_human(planned)}). Free space or choose another output directory; nothing was left behind.",
            ) from e

    def write(self, name: str, tensor: torch.Tensor, digest: bool = False) -> str | None:
        """Write the next tensor of the plan (it must be the one the plan expects); with ``digest``,
        return the digest of its bytes (:func:`fast_digest`)."""
        data = tensor.detach().contiguous().cpu()
        file = self._next(name, tuple(data.shape), data.dtype, data.numel() * data.element_size())
        with self._disk_errors(name):
            file.write(data)
        return fast_digest(data) if digest else None

    def copy(self, name: str, source: Path, offset: int, nbytes: int, digest: bool = False) -> str | None:
        """Write the next tensor of the plan by copying its ``nbytes`` bytes from the file ``source``
        at ``offset`` (never held in memory as a whole); with ``digest``, return their digest
        (:func:`new_hasher`)."""
        file = self._next(name, None, None, nbytes)
        hasher = new_hasher() if digest else None
        fd = os.open(source, os.O_RDONLY)
        try:
            with self._disk_errors(name):
                file.copy_from(fd, offset, nbytes, hasher.update if hasher is not None else None)
        except EOFError as e:
            raise _truncated(source, str(e)) from e
        finally:
            os.close(fd)
        return hasher.hexdigest() if hasher is not None else None

    def abort(self) -> None:
        """Close the open shard without checking that the plan was completed (after a failure)."""
        if self._file is not None:
            self._file.abort()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index (for several shards)."""
        self._close_shard()
        left = list(self._queue)
        if left:
            raise LoraMergeError(f"internal error: {len(left)} planned tensors were not written")
        if len(self.plan) > 1:
            weight_map = {t.name: self.names[i] for i, shard in enumerate(self.plan) for t in shard}
            total = sum(t.nbytes for shard in self.plan for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """Copy the side files of checkpoint ``src`` (config, generation config, tokenizer and processor
    files, chat template, model card, license: :func:`~loramerge.formats.confine.side_files`) to ``dst``.

    Returns:
        ``(copied, skipped)``: names copied, and entries left behind with the reason (subdirectories,
        links out of ``src``, files a transformers checkpoint does not need).
    """
    carried, skipped = side_files(src)
    for path in carried:
        shutil.copyfile(path, dst / path.name)
    return [p.name for p in carried], skipped
