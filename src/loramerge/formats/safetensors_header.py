"""The safetensors header, validated as untrusted data: dtypes, shapes and offsets are checked
against the file's size before any tensor byte is read."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from loramerge.errors import (
    AdapterConfigError,
)

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


MAX_HEADER_BYTES = 100 * 2**20


def parse_header(
    raw: bytes, file_size: int, where: str
) -> tuple[dict[str, str], list[tuple[str, str, tuple[int, ...], int, int]]]:
    """Validate a safetensors header as the format specifies, before anything is read or allocated.

    ``raw`` is the JSON header (the bytes after the 8-byte length) of a file of ``file_size`` bytes.
    Checked: a JSON object; ``__metadata__`` (optional) an object of strings; every tensor entry an
    object with a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` of two
    integers whose difference is numel × itemsize; offsets sorted, contiguous from 0, without overlap,
    ending exactly where the file ends.

    Returns:
        ``(metadata, [(name, dtype code, shape, begin, end), ...])`` in file order (offsets relative
        to the data section).

    Raises:
        AdapterConfigError: Naming ``where``, the tensor and what is wrong.
    """

    def bad(detail: str) -> AdapterConfigError:
        return AdapterConfigError(
            f"{where} is not a valid safetensors file: {detail}. It is truncated or corrupt, or was not written by a "
            "safetensors writer: re-download or re-save it."
        )

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("'__metadata__' must be an object of strings")
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is described by a {type(entry).__name__}, not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise bad(f"tensor {name!r} has dtype {code!r}; known: {sorted(_ST_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}; expected two non-negative integers")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=_ST_DTYPES[code]).element_size()
        begin, end = offsets
        if end - begin != numel * itemsize:
            raise bad(
                f"tensor {name!r} has {end - begin} bytes for shape {shape} of {code} ({numel * itemsize} needed)"
            )
        entries.append((name, code, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise bad(f"tensor {name!r} starts at byte {begin} and {what}")
        position = end
    if 8 + len(raw) + position > file_size:
        raise bad(f"the data ends at byte {8 + len(raw) + position} but the file has {file_size} bytes (truncated?)")
    if 8 + len(raw) + position < file_size:
        raise bad(f"{file_size - 8 - len(raw) - position} bytes follow its last tensor, which no tensor covers")
    return dict(metadata), entries


def _read_header(path: Path) -> tuple[dict[str, str], list[tuple[str, str, tuple[int, ...], int, int]], int]:
    """A safetensors file's validated header (:func:`parse_header`) and the offset where its data begins."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(raw) != 8:
                raise AdapterConfigError(
                    f"{str(path)!r} is not a readable safetensors file (shorter than its 8-byte header length); "
                    "it may be truncated or corrupt: re-download or re-save it."
                )
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterConfigError(
                    f"{str(path)!r} is not a valid safetensors file: its header length {length} exceeds "
                    f"{'the file' if length > size - 8 else 'the 100 MiB limit'}; it is truncated or corrupt: "
                    "re-download or re-save it."
                )
            header = f.read(length)
    except OSError as e:
        raise AdapterConfigError(f"{str(path)!r} cannot be read ({e}).") from e
    metadata, entries = parse_header(header, size, repr(str(path)))
    return metadata, entries, 8 + length


def _truncated(path: Path, detail: str) -> AdapterConfigError:
    return AdapterConfigError(
        f"{str(path)!r} is shorter than its header says ({detail}): truncated while in use? Re-download or re-save it."
    )
