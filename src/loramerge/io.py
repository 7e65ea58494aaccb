"""File I/O: reading tensors from safetensors (or, when allowed, pickle) and atomic directory writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramerge.errors import AdapterConfigError, LoraMergeError, UnsafeFormatError

__all__ = ["atomic_directory", "read_tensors"]


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


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary directory beside ``target``, rename it on success.

    On any exception the temporary directory is removed and ``target`` is left as it was. An existing
    ``target`` is refused unless ``overwrite`` is true (it is then replaced only once the new one is
    complete).
    """
    final = Path(target)
    if final.exists() and not overwrite:
        raise LoraMergeError(
            f"{str(final)!r} already exists; choose another output path or pass overwrite=True (--overwrite on the command line)."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, backup)
            os.replace(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
