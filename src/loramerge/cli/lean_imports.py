"""A checkpoint command with nothing quantized runs without importing bitsandbytes.

PEFT imports bitsandbytes whenever it is installed (``peft.helpers`` at import, its layer dispatch
at injection), and bitsandbytes' import compiles its CPU kernels with ``torch.compile``: measured
2–3.5 s of a verified ``loramerge merge`` of a 3.5 GB checkpoint on the 2-core development
machine, for nothing when no layer is quantized. While such a command runs, ``bitsandbytes`` is
marked absent in ``sys.modules`` (its import raises ``ImportError``, ``find_spec`` answers
``None``), so PEFT and transformers take their paths for an environment without it.

Afterwards the process is given back as it was: the mark is removed, the availability answers
PEFT and transformers cached during the command are forgotten, and the one reference PEFT kept
(``peft.helpers.bnb``) becomes bitsandbytes itself, imported on first use. Nothing is hidden when
bitsandbytes or PEFT is already imported, when the command quantizes (``--qlora-base``), or when
the checkpoint's ``config.json`` cannot be read or declares a quantization.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["without_bitsandbytes"]

_PACKAGE = "bitsandbytes"
# Functions that cache whether bitsandbytes is available (``functools.lru_cache``), by module.
_CACHED_ANSWERS = {
    "peft.import_utils": ("is_bnb_available", "is_bnb_4bit_available"),
    "transformers.utils.import_utils": ("is_bitsandbytes_available",),
}


def _checkpoint(args: argparse.Namespace) -> Path | None:
    """The local checkpoint a merge, unmerge or verify command reads (``None``: none, or from the Hub)."""
    if args.command == "merge":
        return None if args.qlora_base is not None else Path(args.base)
    if args.command == "unmerge":
        return Path(args.merged)
    if args.command == "verify" and not args.hub and args.base:
        return Path(args.base)
    return None


def nothing_quantized(args: argparse.Namespace) -> bool:
    """Whether the command certainly touches no quantized layer: a local checkpoint whose
    ``config.json`` declares no quantization, and no ``--qlora-base``."""
    root = _checkpoint(args)
    if root is None:
        return False
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # the command itself reports what is wrong with the file
    if not isinstance(config, dict):
        return False
    text = config.get("text_config")
    nested = text.get("quantization_config") if isinstance(text, dict) else None
    return config.get("quantization_config") is None and nested is None


def _forget_cached_answers() -> None:
    for module_name, names in _CACHED_ANSWERS.items():
        module = sys.modules.get(module_name)
        for name in names:
            clear = getattr(getattr(module, name, None), "cache_clear", None)
            if callable(clear):
                clear()


def _imported_on_first_use() -> Any:
    """bitsandbytes as a module that imports itself on first attribute access (registered in
    ``sys.modules``, so that a later ``import bitsandbytes`` gets the same module)."""
    spec = importlib.util.find_spec(_PACKAGE)
    assert spec is not None and spec.loader is not None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def without_bitsandbytes(args: argparse.Namespace) -> Iterator[bool]:
    """Run a command with bitsandbytes marked absent when it certainly needs none; yields whether it is."""
    installed = _PACKAGE not in sys.modules and importlib.util.find_spec(_PACKAGE) is not None
    if not installed or "peft" in sys.modules or not nothing_quantized(args):
        yield False
        return
    sys.modules[_PACKAGE] = None  # type: ignore[assignment]  # the import system's mark for "absent"
    try:
        yield True
    finally:
        if _PACKAGE in sys.modules and sys.modules[_PACKAGE] is None:
            del sys.modules[_PACKAGE]
        _forget_cached_answers()
        helpers = sys.modules.get("peft.helpers")
        if helpers is not None and getattr(helpers, "bnb", 0) is None:
            helpers.bnb = sys.modules.get(_PACKAGE) or _imported_on_first_use()  # type: ignore[attr-defined]
