"""The base model's module tree without weights: transformers builds it from the checkpoint's
``config.json`` on the ``meta`` device (no memory), and loramerge reads layer types from it.

A checkpoint stores tensors, not layers: a square ``[n, n]`` weight is the same shape for an
``nn.Linear`` (``[out, in]``) and for GPT-2's ``Conv1D`` (``[in, out]``), and an adapter's
``fan_in_fan_out`` flag is saved once for all its targets (PEFT saves ``false`` when the last
target was a Linear, even if others are Conv1D). The layer class decides, as it does in adapter mode.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "PADDED_CONV",
    "checkpoint_keys",
    "conv1d_free",
    "conv_padded",
    "kind_of",
    "layer_kinds",
    "meta_model",
    "module_kind",
    "padding_unmergeable",
    "renamed_keys",
    "tied_groups",
    "tied_names",
]

logger = logging.getLogger(__name__)


def module_kind(module: nn.Module) -> str | None:
    """``"conv1d"`` (transformers' GPT-2 style ``Conv1D``), ``"linear"``, ``"embedding"``, ``"conv"``
    or ``None`` for a module LoRA cannot target."""
    name = type(module).__name__
    if name == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


PADDED_CONV = (
    "a convolution padded with other than zeros: PEFT's adapter mode pads its LoRA branch with zeros, so no merged "
    "weight computes what adapter mode computes at the borders (merging would change the model's outputs). Keep "
    "this adapter unmerged, or train it without this layer in target_modules"
)


def padding_unmergeable(conv: nn.Module) -> str | None:
    """Why no merged weight computes what PEFT's adapter mode computes for this convolution (``None``:
    it can be merged): PEFT's LoRA branch pads with zeros, so a base that pads otherwise (reflect,
    replicate, circular) gives a different result at the borders than the merged convolution."""
    padding: Any = getattr(conv, "padding", (0,))
    padded = padding == "same" if isinstance(padding, str) else any(int(p) != 0 for p in padding)
    if getattr(conv, "padding_mode", "zeros") == "zeros" or not padded:
        return None
    return PADDED_CONV.replace("other than zeros", repr(getattr(conv, "padding_mode", "")))


def conv_padded(root: Path, module_name: str) -> bool:
    """Whether the model ``root/config.json`` describes pads the convolution ``module_name`` otherwise
    than with zeros (:func:`padding_unmergeable`; ``False`` where transformers cannot build it)."""
    kinds = layer_kinds(root)
    return kinds is not None and kind_of(kinds, module_name) == "conv-padded"


def meta_model(root: Path) -> nn.Module | str:
    """The model ``root/config.json`` describes, built by transformers on the ``meta`` device (its
    ``architectures[0]`` class, else ``AutoModel``; no code from the checkpoint is run), or the
    reason it cannot be built (custom code, unknown architecture, a config transformers cannot read)."""
    if not (root / "config.json").is_file():
        return f"{str(root)!r} has no config.json"
    try:
        import transformers

        config: Any = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
        archs = list(getattr(config, "architectures", None) or [])
        cls: Any = getattr(transformers, archs[0], None) if archs else None
        with torch.device("meta"):
            auto: Any = transformers.AutoModel
            return cast(nn.Module, cls(config) if cls is not None else auto.from_config(config))
    except Exception as e:  # custom code, unknown architecture, a config transformers cannot read
        logger.info("transformers cannot build %s from its config (%s); layer types unknown", root, e)
        return f"transformers cannot build the model from {str(root / 'config.json')!r} ({type(e).__name__}: {e})"


def conv1d_free(root: Path) -> bool:
    """Whether the model ``root/config.json`` describes certainly has no GPT-2 style ``Conv1D`` layer,
    decided from transformers' own modeling code for its ``model_type`` (and every sub-model's)
    without importing it: no modeling file it uses, nor any modeling file those import, mentions
    ``Conv1D``. Then every linear-like layer is an ``nn.Linear``, and the weightless model (2-3 s of
    imports) need not be built to tell a square weight's layout. ``False`` whenever it is not
    certain: custom code (``auto_map``), an unknown ``model_type``, a file that mentions ``Conv1D``."""
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _config_conv1d_free(config, 0)


def _config_conv1d_free(config: dict[str, Any], depth: int) -> bool:
    model_type = config.get("model_type")
    if depth > 4 or config.get("auto_map") or not isinstance(model_type, str):
        return False
    if not re.fullmatch(r"[a-z0-9_\-]{1,64}", model_type) or not _modeling_conv1d_free(model_type.replace("-", "_")):
        return False
    subs = [v for k, v in config.items() if isinstance(v, dict) and (k.endswith("_config") or "model_type" in v)]
    return all(_config_conv1d_free(sub, depth + 1) for sub in subs)


@functools.lru_cache(maxsize=32)
def _modeling_conv1d_free(package: str) -> bool:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return False
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    path = models / package / f"modeling_{package}.py"
    return path.is_file() and _source_conv1d_free(path, models, set())


def _source_conv1d_free(path: Path, models: Path, seen: set[Path]) -> bool:
    """No ``Conv1D`` in ``path`` nor in the modeling files under ``models`` it imports, transitively."""
    if path in seen:
        return True
    seen.add(path)
    text = path.read_text(encoding="utf-8")
    if "Conv1D" in text:
        return False
    for dots, module, names in re.findall(r"^\s*from\s+(\.+)([\w.]*)\s+import\s+\(?([\w\s,]*)", text, re.M):
        base = path.parent
        for _ in range(len(dots) - 1):
            base = base.parent
        target = base.joinpath(*module.split(".")) if module else base
        candidates = [target.with_suffix(".py"), target / "__init__.py"]
        candidates += [target / f"{n.strip()}.py" for n in names.split(",") if n.strip()]
        for candidate in candidates:
            inside = candidate.resolve().is_relative_to(models.resolve())
            if inside and candidate.is_file() and not _source_conv1d_free(candidate, models, seen):
                return False
    return True


def tied_names(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The parameter names of ``model`` that share one tensor, each group in registration order."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return tuple(tuple(names) for names in owners.values() if len(names) > 1)


@functools.lru_cache(maxsize=8)
def _skeleton(root: str, mtime: float) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, ...], ...]] | None:
    model = meta_model(Path(root))
    if isinstance(model, str):
        return None
    kinds = []
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind == "conv" and padding_unmergeable(module) is not None:
            kind = "conv-padded"  # a convolution no merged weight can stand for (padding_unmergeable)
        if kind is not None and name:
            kinds.append((name, kind))
    return tuple(kinds), tied_names(model)


def layer_kinds(root: Path) -> dict[str, str] | None:
    """Module path → layer kind (:func:`module_kind`) of the model checkpoint ``root`` describes, or
    ``None`` when transformers cannot build it from its config (custom code, unknown architecture)."""
    found = _build(root)
    return dict(found[0]) if found is not None else None


def tied_groups(root: Path) -> list[tuple[str, ...]] | None:
    """The parameter names that share one tensor in the model checkpoint ``root`` describes (its
    own tied-weights declarations, as transformers ties them), or ``None`` when it cannot be built."""
    found = _build(root)
    return list(found[1]) if found is not None else None


def _build(root: Path) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, ...], ...]] | None:
    config = root / "config.json"
    if not config.is_file():
        return None
    return _skeleton(str(root), config.stat().st_mtime)


def kind_of(kinds: dict[str, str], module_name: str) -> str | None:
    """The kind of ``module_name`` in ``kinds``: by exact name, else by a unique suffix match either
    way (a checkpoint saved from another head class adds or drops a prefix such as ``model.``)."""
    if module_name in kinds:
        return kinds[module_name]
    matches = {k for n, k in kinds.items() if n.endswith("." + module_name) or module_name.endswith("." + n)}
    return matches.pop() if len(matches) == 1 else None


def checkpoint_keys(model: nn.Module, stored: list[str]) -> dict[str, str]:
    """``{model parameter name: stored tensor name}`` for the stored names that transformers'
    own loading renames (VLM checkpoints saved as ``language_model.model.…`` load as
    ``model.language_model.…``, legacy names, the base-model prefix), computed with transformers'
    conversion mapping for ``model``. Names it would fuse or split (a weight converter, e.g. MoE
    experts packed into one tensor) are left out: they are not one tensor each. Empty when this
    transformers has no such mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(cast(Any, model))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        out: dict[str, str] = {}
        for name in stored:
            renamed, converted = rename_source_key(name, renamings, converters, prefix, meta)
            if converted is None and renamed != name:
                out[renamed] = name
        return out
    except Exception as e:  # an older or newer transformers without this API
        logger.info("transformers' checkpoint key conversions are not available (%s)", e)
        return {}


@functools.lru_cache(maxsize=8)
def _renamed(root: str, mtime: float, stored: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    model = meta_model(Path(root))
    return () if isinstance(model, str) else tuple(checkpoint_keys(model, list(stored)).items())


def renamed_keys(root: Path, stored: list[str]) -> dict[str, str]:
    """:func:`checkpoint_keys` for the checkpoint at ``root`` (empty when its model cannot be built)."""
    config = root / "config.json"
    if not config.is_file():
        return {}
    return dict(_renamed(str(root), config.stat().st_mtime, tuple(stored)))
