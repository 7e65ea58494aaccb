"""File I/O: reading tensors from safetensors (or, when allowed, pickle); atomic directory writes live in
:mod:`loramerge.formats.publish` (re-exported here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramerge.errors import AdapterConfigError, UnsafeFormatError
from loramerge.formats.publish import atomic_directory

__all__ = ["atomic_directory", "read_json_object", "read_tensors"]


def read_tensors(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, on CPU.

    ``.safetensors`` files are always accepted. Pickle files (``.bin``, ``.pt``, ``.pth``) only with
    ``allow_pickle=True``, and then through ``torch.load(weights_only=True)``.
    """
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterConfigError(
                f"{str(path)!r} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                "re-download or re-save it."
            ) from e
    if not allow_pickle:
        raise UnsafeFormatError(
            f"{str(path)!r} is a pickle file, which can run arbitrary code when loaded; convert it to safetensors "
            "or pass allow_pickle=True if you trust it."
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad pickles
        raise AdapterConfigError(f"{str(path)!r} could not be read as a weights-only pickle ({e}).") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterConfigError(f"{str(path)!r} does not hold a flat dict of tensors.")
    return {str(k): v for k, v in obj.items()}


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a file someone else may have written).

    Raises:
        AdapterConfigError: Naming ``what`` and the file: not readable, not valid JSON (with the
            position), or not a JSON object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterConfigError(f"{what} {str(path)!r} is not valid JSON ({e}); re-download or re-save it.") from e
    except OSError as e:
        raise AdapterConfigError(f"{what} {str(path)!r} cannot be read ({e.strerror}).") from e
    if not isinstance(data, dict):
        raise AdapterConfigError(
            f"{what} {str(path)!r} must hold a JSON object, found a JSON {type(data).__name__}; re-download or re-save it."
        )
    return data
