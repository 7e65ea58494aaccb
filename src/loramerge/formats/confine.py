"""Names read from files are data, not paths: confinement of every file name a checkpoint names.

A ``model.safetensors.index.json``, a ``loramerge.json`` or a shard's metadata is written by someone
else. Every file name taken from one must be a plain name (no separators, no ``..``, not absolute)
of a regular file inside the directory that holds it, and stays so once symlinks are resolved; the
only links followed out of a directory are huggingface_hub's cache links from a snapshot to the
repository's own ``blobs`` folder. Side files copied into an output come from an explicit list of
what a transformers checkpoint holds.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from loramerge.errors import UnsafePathError

__all__ = ["SIDE_FILE_PATTERNS", "confined_file", "plain_name", "side_files"]

# What a transformers checkpoint holds besides its weights (config, generation config, tokenizer and
# processor files, chat template, model card and license). Matched against plain file names.
SIDE_FILE_PATTERNS: tuple[str, ...] = (
    r"config\.json",
    r"generation_config\.json",
    r"(tokenizer|tokenizer_config|special_tokens_map|added_tokens)\.json",
    r"tokenizer\.model",
    r"(vocab|merges)\.(json|txt)",
    r"spiece\.model",
    r"sentencepiece\.bpe\.model",
    r"(preprocessor|processor|image_processor|feature_extractor|video_preprocessor)_config\.json",
    r"chat_template\.(jinja|json)",
    r"(README|readme)\.md",
    r"LICEN[CS]E(\.(md|txt))?",
    r"NOTICE(\.(md|txt))?",
)
_SIDE = re.compile("|".join(f"(?:{p})" for p in SIDE_FILE_PATTERNS))


def plain_name(value: object, what: str) -> str:
    """``value`` if it is a plain file name (a non-empty string without separators, ``..``, NUL or a
    drive), else :class:`~loramerge.errors.UnsafePathError` naming ``what``."""
    if not isinstance(value, str) or not value:
        raise UnsafePathError(f"{what}: expected a file name, found {value!r}; the file is corrupt or hostile.")
    bad = (
        "/" in value
        or "\\" in value
        or "\x00" in value
        or value in (".", "..")
        or os.path.isabs(value)
        or (len(value) > 1 and value[1] == ":")
    )
    if bad:
        raise UnsafePathError(
            f"{what}: {value!r} is not a plain file name (it has a separator, '..', a drive or is absolute); "
            "loramerge reads and writes only files directly inside the directories it was given. The file is "
            "corrupt or hostile: re-download it from a source you trust."
        )
    return value


def _allowed_roots(root: Path) -> list[Path]:
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # huggingface_hub's cache: snapshot files link to ../../blobs
        roots.append(real.parent.parent / "blobs")
    return roots


def confined_file(root: Path, value: object, what: str, *, must_exist: bool = True) -> Path:
    """``root / value`` for a plain file name ``value`` whose target, symlinks resolved, is a regular
    file inside ``root`` (see the module docstring); :class:`~loramerge.errors.UnsafePathError`
    otherwise. With ``must_exist=False`` a missing file is returned as is (the caller reports it)."""
    name = plain_name(value, what)
    path = root / name
    if not os.path.lexists(path):
        if must_exist:
            raise UnsafePathError(f"{what}: {name!r} does not exist in {str(root)!r}.")
        return path
    real = path.resolve()
    if not any(r in real.parents for r in _allowed_roots(root)):
        raise UnsafePathError(
            f"{what}: {name!r} in {str(root)!r} is a link to {str(real)!r}, outside that directory; loramerge does not "
            "follow links out of a checkpoint. Replace the link with the file itself."
        )
    try:
        mode = real.stat().st_mode
    except OSError as e:
        raise UnsafePathError(f"{what}: {name!r} in {str(root)!r} cannot be read ({e}).") from e
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{what}: {name!r} in {str(root)!r} is not a regular file.")
    return path


def side_files(root: Path) -> tuple[list[Path], list[str]]:
    """The side files of checkpoint ``root`` that an output may carry, and what was skipped (with why).

    Carried: regular files directly in ``root`` whose names are on :data:`SIDE_FILE_PATTERNS`,
    confined as :func:`confined_file`. Skipped: everything else that is not a weight file or index
    (subdirectories, links out, other files).
    """
    carried: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.endswith((".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")):
            continue
        if name.startswith(".") or entry.is_dir():
            skipped.append(f"{name}/ (a directory)" if entry.is_dir() else f"{name} (hidden)")
            continue
        if not _SIDE.fullmatch(name):
            skipped.append(f"{name} (not a file a transformers checkpoint needs)")
            continue
        try:
            carried.append(confined_file(root, name, "side file"))
        except UnsafePathError:
            skipped.append(f"{name} (a link out of the checkpoint, or not a regular file)")
    return carried, skipped
