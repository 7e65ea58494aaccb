"""PEFT's own layers as the reference for a checkpoint: each LoRA layer (or ``ParamWrapper``) of the
weightless adapter-mode model (:mod:`loramerge.proof.oracle`), holding base values read from the
checkpoint, is run on seeded probes and compared with the same base layer holding the merged
values, under the tolerance rule."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.tolerance import Tolerance, reference_dtype, relative_errors, ulp, unit_roundoff
from loramerge.plan.injection import ADAPTER
from loramerge.plan.param_targets import parameter_path
from loramerge.plan.skeleton import meta_model, module_kind
from loramerge.proof.param_checks import judge_values
from loramerge.proof.reports import LayerCheck

PROBES = 16  # probe inputs per layer


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"oracle:{seed}:{name}".encode()).digest()[:4], "little")


def _probes(base: nn.Module, name: str, seed: int, dtype: torch.dtype) -> torch.Tensor | str:
    """Seeded inputs for ``base`` (built from its own attributes): token ids for an embedding,
    vectors for a linear layer, small images of one output position or two for a convolution."""
    gen = torch.Generator().manual_seed(_seed(name, seed))
    kind = module_kind(base)
    if kind == "embedding":
        return torch.randint(0, int(cast(Any, base).num_embeddings), (PROBES,), generator=gen)
    if kind == "linear":
        return torch.randn(PROBES, int(cast(Any, base).in_features), generator=gen, dtype=dtype)
    if kind == "conv1d":
        return torch.randn(PROBES, int(cast(Any, base).weight.shape[0]), generator=gen, dtype=dtype)
    if kind == "conv":
        conv = cast(Any, base)
        spatial = [(k - 1) * d + s + 1 for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride, strict=True)]
        return torch.randn(PROBES, int(conv.in_channels), *spatial, generator=gen, dtype=dtype)
    return f"PEFT wrapped a {type(base).__name__}, which the oracle cannot probe"


@contextmanager
def _holding(base: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """``base`` with its parameters replaced by ``values`` for the duration, then put back."""
    saved = {n: getattr(base, n) for n in values}
    try:
        for n, v in values.items():
            setattr(base, n, nn.Parameter(v, requires_grad=False))
        yield
    finally:
        for n, p in saved.items():
            setattr(base, n, p)


def _squared_ulp(t: torch.Tensor, stored: torch.dtype, wide: torch.dtype, divisor: float) -> torch.Tensor:
    """``ulp(t)² / divisor`` in ``wide``, computed in place (one full-size temporary at a time)."""
    out = ulp(t, stored).to(wide)
    return out.pow_(2).div_(divisor)


def _rounding_variance(layer: Any, merged: torch.Tensor, wide: torch.dtype, stored: torch.dtype) -> torch.Tensor:
    """Per-element variance of the rounding a faithful merge may add beyond storing ``W + ΔW``
    (the rule of :func:`~loramerge.proof.layer_checks.merge_rounding_variance`), with ``ΔW`` and
    ``|s| |B| |A|`` taken from PEFT's own layer (``get_delta_weight``) in the layer's layout.
    Built in place, so that at most two full-size temporaries live at once."""
    variance = _squared_ulp(merged, stored, wide, 12)
    if stored == torch.float64:
        return variance
    u32 = unit_roundoff(torch.float32)
    if ADAPTER in getattr(layer, "lora_magnitude_vector", {}):
        return variance.add_(merged.to(wide).abs_().mul_(3 * u32).pow_(2).div_(3))
    try:
        with torch.no_grad():
            variance.add_(_squared_ulp(layer.get_delta_weight(ADAPTER), stored, wide, 12))
            if ADAPTER in layer.lora_embedding_A:
                factors = [layer.lora_embedding_A[ADAPTER], layer.lora_embedding_B[ADAPTER]]
            else:
                factors = [*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters()]
            originals = [f.detach().clone() for f in factors]
            for f in factors:
                f.abs_()
            try:
                bound = layer.get_delta_weight(ADAPTER).to(wide).abs_()
            finally:
                for f, o in zip(factors, originals, strict=True):
                    f.copy_(o)
    except Exception:  # a variant without a plain ΔW: storing the weight is all that is allowed
        return variance
    rank = int(layer.r.get(ADAPTER, 1))
    return variance.add_(bound.mul_((rank + 2) * u32).pow_(2).div_(3))


@contextmanager
def _lora_widened(layer: Any, wide: torch.dtype) -> Iterator[None]:
    """``layer``'s LoRA parameters as ``wide`` copies and the layer in eval mode, for the duration."""
    parts = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    modules = [m for attr in parts for m in [getattr(layer, attr, None)] if m is not None]
    previous = [(p, p.data) for m in modules for p in m.parameters()]
    training = layer.training
    try:
        for p, data in previous:
            p.data = data.to(wide, copy=True)
        layer.eval()
        yield
    finally:
        layer.train(training)
        for p, data in previous:
            p.data = data


def _layer_check(
    name: str,
    layer: Any,
    base_values: dict[str, torch.Tensor],
    merged_values: dict[str, torch.Tensor],
    tol: Tolerance,
    seed: int,
    rounded_base: bool = False,
) -> LayerCheck:
    base = layer.get_base_layer()
    stored = merged_values["weight"].dtype
    wide = reference_dtype(stored)
    kind = module_kind(base) or type(base).__name__
    x = _probes(base, name, seed, wide)
    if isinstance(x, str):
        return LayerCheck(name, kind, str(stored)[6:], math.nan, math.nan, math.nan, math.nan, 0, 0, False, x)
    with torch.no_grad():
        with _lora_widened(layer, wide):
            with _holding(base, {n: v.to(wide) for n, v in base_values.items()}):
                reference = cast(torch.Tensor, layer(x)).to(wide)
            variance = _rounding_variance(layer, merged_values["weight"], wide, stored)
        if rounded_base:
            variance.add_(_squared_ulp(base_values["weight"], stored, wide, 12))
        with _holding(base, {n: v.to(wide) for n, v in merged_values.items()}):
            value = cast(torch.Tensor, base(x)).to(wide)
        bias = merged_values.get("bias")  # its rounding adds to every output, as the bias does
        spread_bias = {} if bias is None else {"bias": _squared_ulp(bias, stored, wide, 12)}
        with _holding(base, {"weight": variance, **spread_bias}):
            spread = cast(torch.Tensor, base(x if kind == "embedding" else x.pow(2))).to(wide)
        del variance
    err, _ = relative_errors(value, reference)
    ref_rms = float(reference.double().pow(2).mean().sqrt())
    s_err = float(spread.double().clamp(min=0).mean().sqrt()) / ref_rms if ref_rms > 0 else 0.0
    limit = tol.factor * s_err + tol.floor_for(stored) / 4
    ok = math.isfinite(err) and err <= limit
    reason = (
        ""
        if ok
        else (
            f"output error {err:.3g} against PEFT's own LoRA layer (adapter mode, built from config.json and the "
            f"adapter file) exceeds the limit {limit:.3g}"
        )
    )
    return LayerCheck(name, kind, str(stored)[6:], math.nan, math.nan, err, math.nan, s_err, limit, ok, reason)


def layer_family(name: str, layer: nn.Module) -> tuple[Any, ...]:
    """What a LoRA layer shares with the others of its kind: its base layer's class and weight
    shape, the last part of its module name, and PEFT's rank, scale, variant and ``lora_bias`` for it."""
    m = cast(Any, layer)
    base = m.get_base_layer()
    variant = (getattr(m, "lora_variant", None) or {}).get(ADAPTER)
    parameter = getattr(m, "parameter_name", None)  # a ParamWrapper (target_parameters) adapts this one
    weight = m.get_param() if parameter is not None else base.weight
    return (
        type(base).__name__,
        tuple(weight.shape),
        parameter or name.rsplit(".", 1)[-1],
        int(m.r.get(ADAPTER, 0)),
        float(m.scaling.get(ADAPTER, 0.0)),
        type(variant).__name__,
        bool(m.lora_bias.get(ADAPTER, False)),
    )


def _convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


@dataclass(frozen=True)
class _Pieces:
    """The stored tensors transformers builds one parameter from, as its loader collects them."""

    converter: Any
    names: dict[str, list[str]]  # source pattern -> stored names, in the loader's order

    def value(self, read: Callable[[str], torch.Tensor | None]) -> torch.Tensor | None:
        """The parameter as transformers' own conversion operations build it (``None``: a piece is missing)."""
        tensors: dict[str, Any] = {}
        for pattern, names in self.names.items():
            found = [read(n) for n in names]
            if any(t is None for t in found):
                return None
            tensors[pattern] = found
        for op in self.converter.operations:
            tensors = op.convert(
                tensors,
                source_patterns=list(self.converter.source_patterns),
                target_patterns=list(self.converter.target_patterns),
            )
        return cast(torch.Tensor, next(iter(tensors.values())))


def _pieces(root: Path, stored: list[str]) -> dict[str, _Pieces]:
    """For each parameter transformers fuses from several stored tensors, the pieces, grouped and
    ordered as transformers' loader does it (its renaming, its converters, its natural key order):
    independent of the merge's own plan (:mod:`loramerge.plan.fused`)."""
    model = meta_model(root)
    if isinstance(model, str):
        return {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(cast(Any, model))
    except Exception:  # no weight converters in this transformers
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta, prefix = model.state_dict(), getattr(model, "base_model_prefix", None)
    out: dict[str, _Pieces] = {}
    for name in sorted(stored, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        converter = next((c for c in converters if pattern is not None and pattern in c.source_patterns), None)
        if converter is not None and pattern is not None:
            out.setdefault(renamed, _Pieces(converter, {})).names.setdefault(pattern, []).append(name)
    return out


def _param_check(
    name: str,
    layer: Any,
    pieces_of: Mapping[str, _Pieces],
    base_reader: CheckpointReader,
    merged_reader: CheckpointReader,
    dtype: torch.dtype | None,
    judge: bool,
    changed: set[str],
    problems: list[str],
) -> Callable[[Tolerance, int, bool], LayerCheck] | None:
    """PEFT's ``ParamWrapper`` judged on the parameter as transformers assembles it from the stored
    pieces of the base and of the merged checkpoint (``None``: nothing to judge, or a problem)."""
    param = parameter_path(name, layer)
    pieces = pieces_of.get(param)
    if pieces is None:
        problems.append(f"{param}: PEFT adapts it, but the checkpoint stores no tensors transformers builds it from")
        return None
    changed.update(n for names in pieces.names.values() for n in names)
    if not judge:
        return None
    try:
        base = pieces.value(base_reader.get)
        merged = pieces.value(lambda n: merged_reader.get(n) if n in merged_reader.tensors else None)
    except Exception as e:  # transformers' own operation refused the pieces
        problems.append(f"{param}: transformers cannot assemble it from the stored pieces ({type(e).__name__}: {e})")
        return None
    if base is None or merged is None:
        problems.append(f"{param}: a stored piece of it is missing from the merged checkpoint")
        return None
    base_values = _convert(base, dtype if dtype is not None else merged.dtype)
    return lambda tol, seed, rounded: judge_values(param, layer, ADAPTER, base_values, merged, tol, seed, rounded)
