"""Parameters transformers fuses from several stored tensors when it loads a checkpoint.

transformers 5 stores the experts of Mixtral, Qwen2-MoE and most mixture-of-experts models as one
3-D parameter per projection (``mlp.experts.gate_up_proj``), while their checkpoints keep one 2-D
tensor per expert and projection (``block_sparse_moe.experts.3.w1.weight``). Its weight converters
say how to build the first from the second: stack the experts (``MergeModulelist(dim=0)``), then
concatenate the projections along the output dimension (``Concatenate(dim=1)``). This module reads
those converters, so that a merge can write each stored tensor its slice of the fused parameter.
Converters doing anything else are reported, not guessed.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

from loramerge.plan.skeleton import meta_model

__all__ = ["FusedParam", "fused_keys", "fused_params"]

logger = logging.getLogger(__name__)

# the converters whose slices are plain row ranges of each expert's matrix
_ROW_SLICES = ((("MergeModulelist", 0),), (("MergeModulelist", 0), ("Concatenate", 1)))


@dataclass(frozen=True)
class FusedParam:
    """How transformers builds one parameter from stored tensors.

    Attributes:
        sources: For each source pattern of the converter, in concatenation order, the stored
            names of experts 0, 1, 2, ...: expert ``e`` of the parameter is the concatenation, along
            its rows, of ``sources[0][e]``, ``sources[1][e]``, ...
        unsupported: Why the converter's slices are not plain row ranges ("" when they are).
    """

    sources: tuple[tuple[str, ...], ...]
    unsupported: str = ""


def _expert_index(pattern: str, name: str) -> int | None:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, name)
    return int(found.group(1)) if found else None


def fused_params(model: nn.Module, stored: Sequence[str]) -> dict[str, FusedParam]:
    """``{model parameter name: FusedParam}`` for the stored tensors transformers' weight converters
    fuse when loading into ``model`` (empty when this transformers has no such conversions)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(cast(Any, model))
    except Exception as e:  # an older or newer transformers without this API
        logger.info("transformers' weight converters are not available (%s)", e)
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    found: dict[str, tuple[Any, dict[int, dict[int, str]]]] = {}
    problems: dict[str, str] = {}
    for name in stored:
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if pattern is None:
            continue
        converter = next((c for c in converters if pattern in c.source_patterns), None)
        expert = _expert_index(pattern, name)
        if converter is None or expert is None:
            problems[renamed] = f"{name}: no expert index in its converter's pattern {pattern!r}"
            continue
        source = list(converter.source_patterns).index(pattern)
        _, by_source = found.setdefault(renamed, (converter, {}))
        by_source.setdefault(source, {})[expert] = name
    out: dict[str, FusedParam] = {}
    for param, (converter, by_source) in found.items():
        ops = tuple((type(op).__name__, getattr(op, "dim", None)) for op in converter.operations)
        why = problems.get(param, "")
        if not why and ops not in _ROW_SLICES:
            why = f"transformers builds it with {[type(op).__name__ for op in converter.operations]}"
        counts = {len(experts) for experts in by_source.values()}
        complete = len(by_source) == len(converter.source_patterns) and len(counts) == 1
        sources: tuple[tuple[str, ...], ...] = ()
        if complete:
            count = counts.pop()
            if all(sorted(experts) == list(range(count)) for experts in by_source.values()):
                sources = tuple(tuple(by_source[j][e] for e in range(count)) for j in sorted(by_source))
        if not sources and not why:
            why = "the checkpoint does not hold every expert of every source tensor"
        out[param] = FusedParam(sources, why)
    return out


@functools.lru_cache(maxsize=8)
def _fused(root: str, mtime: float, stored: tuple[str, ...]) -> tuple[tuple[str, FusedParam], ...]:
    model = meta_model(Path(root))
    return () if isinstance(model, str) else tuple(fused_params(model, list(stored)).items())


def fused_keys(root: Path, stored: Sequence[str]) -> dict[str, FusedParam]:
    """:func:`fused_params` for the checkpoint at ``root`` (empty when its model cannot be built)."""
    config = root / "config.json"
    if not config.is_file():
        return {}
    return dict(_fused(str(root), config.stat().st_mtime, tuple(stored)))
