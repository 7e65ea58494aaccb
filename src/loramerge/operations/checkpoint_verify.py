"""Verifying a merged checkpoint against its base and adapter, tensor by tensor, and the judgement of any checkpoint result by PEFT's own layers (:mod:`loramerge.proof.oracle`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loramerge.errors import (
    LoraMergeWarning,
)
from loramerge.formats.adapter import Adapter, load_adapter
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.tolerance import Tolerance, ulp
from loramerge.plan.checkpoint_plan import AdapterMapping, _untie_plan, _updates_for, map_adapter
from loramerge.proof.layer_checks import (
    LayerProbe,
    check_stored,
    output_subset,
    restrict_update,
    restrict_weight,
    weight_space_check,
)
from loramerge.proof.oracle import judge_by_peft
from loramerge.proof.reports import LayerCheck, VerificationReport

__all__ = ["verify_checkpoint"]

logger = logging.getLogger(__name__)


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
        untie = _untie_plan(
            Path(base), base_reader, set(mapping.modules) | set(mapping.replaced) | set(mapping.variants)
        )
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
    dtype = dtype if dtype is not None else _merged_dtype(base_reader, merged_reader, notes)
    missing = sorted(set(base_reader.names) ^ set(merged_reader.names))
    bar = tqdm(total=len(base_reader.names), unit="tensor", desc="verify", disable=not progress)
    checked = 0
    for name in base_reader.names:
        bar.update(1)
        if name not in merged_reader.tensors or name in mapping.variants:  # variants: PEFT's layers judge them
            continue
        got = merged_reader.get(name)
        original = base_reader.get(name)
        if dtype is not None and original.is_floating_point():
            original = original.to(dtype)
        if got.dtype != original.dtype and name not in mapping.replaced:
            wrong_dtype.append(f"{name} ({original.dtype} expected, {got.dtype} found)")
            changed.append(name)
            continue
        layer, same = _check_tensor(name, got, original, mapping, tol, seed, max_outputs)
        if layer is not None:
            layers.append(layer)
            continue
        checked += 1
        if not same:
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


def _merged_dtype(base: CheckpointReader, merged: CheckpointReader, notes: list[str]) -> torch.dtype | None:
    """The dtype every floating tensor was converted to, when the merged checkpoint holds one the base does not."""
    base_floats = {t.dtype for t in base.tensors.values() if t.dtype.is_floating_point}
    merged_floats = {t.dtype for t in merged.tensors.values() if t.dtype.is_floating_point}
    if len(merged_floats) != 1 or merged_floats == base_floats:
        return None
    dtype = next(iter(merged_floats))
    notes.append(
        f"every floating tensor of the merged checkpoint is {dtype}, the base's are "
        f"{sorted(str(d) for d in base_floats)}: compared after converting the base to {dtype}"
    )
    return dtype


def _check_tensor(
    name: str,
    got: torch.Tensor,
    original: torch.Tensor,
    mapping: AdapterMapping,
    tol: Tolerance,
    seed: int,
    max_outputs: int | None,
) -> tuple[LayerCheck | None, bool]:
    """An adapted weight's check (a layer check), or whether any other tensor holds what it must."""
    if name in mapping.modules:
        mod, kind = mapping.modules[name]
        up = _updates_for(mod, kind)
        idx = output_subset(mod.name, kind, original, seed, max_outputs)
        sub = [restrict_update(up, idx)]
        rel, max_ulp, reason = weight_space_check(
            kind, restrict_weight(kind, original, idx), restrict_weight(kind, got, idx), sub, tol
        )
        probe = LayerProbe(mod.name, kind, original, None, [up], seed, max_outputs)
        return check_stored(probe, probe.outputs(got, None), tol, rel, max_ulp, reason, got), True
    if name in mapping.biases:
        mod = mapping.biases[name]
        assert mod.update.bias is not None
        expected = (original.float() + mod.scale * mod.update.bias.float()).to(original.dtype)
        off = got.shape != expected.shape or bool(
            ((got.float() - expected.float()).abs() > ulp(expected, got.dtype)).any()
        )
        return None, not off
    expected = mapping.replaced[name].to(got.dtype) if name in mapping.replaced else original
    if name in mapping.token_rows:
        ids, rows = mapping.token_rows[name]
        expected = original.index_copy(0, ids, rows.to(original.dtype))
    return None, got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)


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
    own layers (:mod:`loramerge.proof.oracle`): a layer PEFT's adapter mode disagrees with fails, and a
    tensor loramerge's mapping changed that adapter mode leaves alone must equal the base's."""
    plan: dict[str, Any] = {
        mod.name: (kind, mod.scale, mod.rank, mod.use_dora) for mod, kind in mapping.modules.values()
    }
    plan.update({module: ("merged by PEFT's layer", module) for module in mapping.variants.values()})  # every one
    judged = judge_by_peft(base, merged, adapter, report.tolerance, dtype, seed, list(report.layers), every_layer, plan)
    wrong = list(judged.unexpected)
    judged_names = {c.name.removesuffix(" (attention)") for c in judged.layers}  # (an attention's row)
    for module in sorted(set(mapping.variants.values()) - judged_names):  # no other check covers them
        reason = "merged by PEFT's own layer, and PEFT's layer could not be built to judge it"
        unjudged = LayerCheck(
            module, "linear", "", math.nan, math.nan, math.inf, math.nan, math.nan, 0.0, False, reason
        )
        judged.layers.append(unjudged)
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
