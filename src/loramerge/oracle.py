"""The reference a checkpoint merge is judged against: PEFT's adapter mode, rebuilt without weights.

A check must not share code with what it checks. :mod:`loramerge.checkpoint` plans a merge from
tensor names and the adapter file; this module asks transformers and PEFT instead. transformers
builds the base model from the checkpoint's ``config.json`` on the ``meta`` device (no memory),
PEFT wraps and loads the adapter into it as ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)``
does, and every LoRA layer PEFT made is then run on seeded probes, with its base weight read from
the base checkpoint, against the same base layer holding the merged weight. Which module is adapted,
its layer class (so Linear or GPT-2 ``Conv1D`` layout), its scale, its variant, and which stored
tensors are tied to it all come from transformers and PEFT: none from loramerge's own plan or
delta math. Every tensor tied to an adapted one must still hold what adapter mode uses for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loramerge.adapter import TRAINING_STATE, Adapter
from loramerge.param_checks import judge_values
from loramerge.param_targets import parameter_path
from loramerge.reports import LayerCheck
from loramerge.shards import CheckpointReader
from loramerge.skeleton import meta_model, module_kind, renamed_keys, tied_names
from loramerge.tolerance import Tolerance, reference_dtype, relative_errors, ulp, unit_roundoff

__all__ = ["AdapterMode", "Judgement", "OracleResult", "adapter_mode", "check_merged_checkpoint", "judge_by_peft"]

logger = logging.getLogger(__name__)

PROBES = 16  # probe inputs per layer
ADAPTER = "default"


@dataclass
class AdapterMode:
    """The base model as PEFT's adapter mode runs it, without base weights.

    Attributes:
        layers: PEFT's LoRA layer for each adapted module path (LoRA factors loaded, base weight a
            placeholder unless the adapter file itself carries one).
        tokens: PEFT's trainable-tokens wrapper for each embedding (or tied head) with trainable tokens.
        saved: Parameters whose value adapter mode takes from the adapter, not the base
            (``modules_to_save`` copies, biases trained with ``bias="all"``, saved base layers).
        groups: Parameter names of the base model that share one tensor.
        prefix: The model's ``base_model_prefix`` (checkpoints saved by another head class add or drop it).
    """

    layers: dict[str, nn.Module]
    tokens: dict[str, nn.Module]  # PEFT's TrainableTokensWrapper by module path
    saved: dict[str, torch.Tensor]
    groups: tuple[tuple[str, ...], ...]
    prefix: str
    placeholders: set[int]
    alive: list[torch.Tensor]


def _placeholder(param: torch.Tensor) -> nn.Parameter:
    """A CPU stand-in of ``param``'s shape that takes no memory (stride 0), so that PEFT keeps the
    loaded LoRA factors on the CPU instead of moving them to the meta device of their base layer."""
    return nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape), requires_grad=False)


def _model_name(peft_name: str) -> str | None:
    """A parameter name of the wrapped model as the base model names it (``None``: PEFT's own)."""
    if "lora_" in peft_name or ".original_module." in peft_name:
        return None
    return peft_name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")


def adapter_mode(root: Path, adapter: Adapter) -> AdapterMode | str:
    """Build :class:`AdapterMode` for the checkpoint at ``root``, or say why it cannot be built."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    model = meta_model(root)
    if isinstance(model, str):
        return model
    groups = tied_names(model)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    allowed = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = LoraConfig(**{k: v for k, v in adapter.config.items() if k in allowed})
            config.inference_mode = True
            # Every base parameter becomes a CPU stand-in that takes no memory before PEFT wraps the
            # model, so that PEFT initializes its layers (and keeps the loaded factors) on the CPU.
            placeholders: set[int] = set()
            alive: list[torch.Tensor] = []  # kept, so that no loaded tensor can reuse a placeholder's id
            for module in model.modules():
                for pname, p in list(module.named_parameters(recurse=False)):
                    if p.is_meta:
                        alive.append(_placeholder(p))
                        setattr(module, pname, alive[-1])
                        placeholders.add(id(alive[-1]))
            peft_model = PeftModel(model, config, adapter_name=ADAPTER, low_cpu_mem_usage=True)
            inner = cast(nn.Module, peft_model.base_model.model)
            layers = {n: cast(nn.Module, m) for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
            tensors = {k: v.clone() for k, v in adapter.tensors.items() if not TRAINING_STATE.search(k)}
            result = set_peft_model_state_dict(peft_model, tensors, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    except Exception as e:  # PEFT's own refusal: the adapter does not fit what the config builds
        return f"PEFT cannot load the adapter into the model the config builds ({type(e).__name__}: {e})"
    unused = sorted(getattr(result, "unexpected_keys", []) or [])
    unloaded = sorted(n for n, p in peft_model.named_parameters() if "lora_" in n and p.is_meta)
    if unused or unloaded:
        return (
            "the adapter's tensors do not fit the module names of the model the config builds "
            f"(unused: {unused[:3]}, not loaded: {unloaded[:3]})"
        )
    tokens = {n: m for n, m in inner.named_modules() if type(m).__name__ == "TrainableTokensWrapper"}
    saved: dict[str, torch.Tensor] = {}
    for name, p in inner.named_parameters(remove_duplicate=False):
        if ".token_adapter." in name:  # trainable tokens: judged through PEFT's wrapper (tokens)
            continue
        key = _model_name(name)
        if key is not None and not p.is_meta and id(p) not in placeholders:
            saved[key] = p.detach()
    return AdapterMode(layers, tokens, saved, groups, prefix, placeholders, alive)


@dataclass(frozen=True)
class OracleResult:
    """What the oracle found about a merged checkpoint.

    Attributes:
        layers: One check per LoRA layer PEFT made, against PEFT's own layer.
        problems: Other tensors that do not hold what adapter mode uses, each with the reason.
        changed: The merged checkpoint's tensor names adapter mode changes or adds (adapted
            weights and biases, replaced tensors, untied copies); every other tensor must equal the base's.
        added: Of ``changed``, those the base checkpoint does not store (untied copies).
        adapted: How many LoRA layers PEFT made (``len(layers)`` unless ``every_layer=False``).
    """

    layers: tuple[LayerCheck, ...]
    problems: tuple[str, ...]
    changed: frozenset[str]
    added: frozenset[str]
    adapted: int = 0


class _Names:
    """Model parameter names resolved to one checkpoint's stored tensors, ties included."""

    def __init__(
        self,
        reader: CheckpointReader,
        prefix: str,
        groups: tuple[tuple[str, ...], ...] | Callable[[], tuple[tuple[str, ...], ...]],
    ):
        self.reader, self.prefix = reader, prefix
        self.stored = set(reader.stored)
        self._groups = groups
        self._group: dict[str, tuple[str, ...]] | None = None
        self._renamed: dict[str, str] | None = None

    @property
    def group(self) -> dict[str, tuple[str, ...]]:
        """Parameter name → its tie group (built on first use: it may need the weightless model)."""
        if self._group is None:
            groups = self._groups() if callable(self._groups) else self._groups
            self._group = {name: g for g in groups for name in g}
        return self._group

    def direct(self, param: str) -> str | None:
        """The stored tensor saved under ``param``'s name (allowing the model's base prefix)."""
        candidates = [param]
        if self.prefix:
            candidates.append(f"{self.prefix}.{param}")
            if param.startswith(self.prefix + "."):
                candidates.append(param[len(self.prefix) + 1 :])
        found = next((c for c in candidates if c in self.stored), None)
        if found is None:  # as transformers' own loading renames stored names (VLM, legacy names)
            if self._renamed is None:
                self._renamed = renamed_keys(self.reader.root, sorted(self.stored))
            found = self._renamed.get(param)
        return found

    def provided(self, param: str) -> str | None:
        """The stored tensor whose value ``param`` gets when the checkpoint is loaded. transformers
        (5.x) ties a parameter the checkpoint does not store to the member of its tie group that it
        does store, and leaves members stored with different values untied (with a warning)."""
        for member in (param, *self.group.get(param, ())):
            found = self.direct(member)
            if found is not None:
                return found
        return None


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
    (the rule of :func:`~loramerge.layer_checks.merge_rounding_variance`), with ``ΔW`` and
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
    independent of the merge's own plan (:mod:`loramerge.fused`)."""
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


def check_merged_checkpoint(
    base_root: Path,
    merged_root: Path,
    adapter: Adapter,
    tolerance: Tolerance,
    *,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    mode: AdapterMode | None = None,
    every_layer: bool = True,
    plan: Mapping[str, Any] | None = None,
    rounded_base: bool = False,
) -> OracleResult | str:
    """Judge the checkpoint at ``merged_root`` against adapter mode on ``base_root`` (see the module
    docstring), or say why adapter mode cannot be rebuilt (then nothing was checked).

    ``every_layer=False`` runs PEFT's layer for one layer of each :func:`layer_family` (and every
    layer tied to another tensor or carrying a saved base) instead of all: the mistakes only this
    check can see (a layout, a scale, a variant, a tie) are the same for every layer of a family,
    while loramerge's own per-layer probes and the digests of every tensor cover each layer. Which
    tensors change is still decided for every layer. ``plan`` (module name → what the merge did
    with it, e.g. its layout and scale) splits families further, so that a layer the merge treated
    unlike the rest of its family is run through PEFT's layer too. ``rounded_base``: the base was
    itself computed and rounded (an unmerge's output, judged by merging it again): its rounding is
    allowed too.

    ``dtype``: the merge converted every floating tensor to it (the base is compared after the same
    conversion)."""
    built = mode if mode is not None else adapter_mode(base_root, adapter)
    if isinstance(built, str):
        return built
    mode = built
    base_reader, merged_reader = CheckpointReader(base_root), CheckpointReader(merged_root)
    groups = mode.groups

    def merged_groups() -> tuple[tuple[str, ...], ...]:  # the ties transformers applies when loading the output
        model = meta_model(merged_root)
        return groups if isinstance(model, str) else tied_names(model)

    base_names = _Names(base_reader, mode.prefix, mode.groups)
    merged_names = _Names(merged_reader, mode.prefix, merged_groups)
    problems: list[str] = []
    changed: set[str] = set()
    covered: set[str] = set()  # model parameters whose adapter-mode value was checked
    checks: list[LayerCheck] = []

    def read(names: _Names, param: str, what: str) -> torch.Tensor | None:
        stored = names.provided(param)
        if stored is None:
            problems.append(f"{param}: the {what} checkpoint holds no tensor for it (nor for a tensor tied to it)")
            return None
        return names.reader.get(stored)

    tied = {member for group in mode.groups for member in group}
    families: set[tuple[Any, ...]] = set()
    pieces: dict[str, _Pieces] = {}
    for name, layer in mode.layers.items():
        if type(layer).__name__ == "ParamWrapper":  # target_parameters: a parameter stored in pieces
            if not pieces:
                pieces.update(_pieces(base_root, list(base_reader.names)))
            family = (*layer_family(name, layer), (plan or {}).get(name))
            judge = every_layer or family not in families
            families.add(family)
            check = _param_check(name, layer, pieces, base_reader, merged_reader, dtype, judge, changed, problems)
            if check is not None:
                checks.append(check(tolerance, seed, rounded_base))
            continue
        base = cast(Any, layer).get_base_layer()
        base_values: dict[str, torch.Tensor] = {}
        merged_values: dict[str, torch.Tensor] = {}
        params = dict(base.named_parameters(recurse=False))
        special = any(f"{name}.{n}" in tied or id(p) not in mode.placeholders for n, p in params.items())
        family = (*layer_family(name, layer), (plan or {}).get(name))
        judge = every_layer or special or family not in families
        families.add(family)
        for pname, p in params.items():
            param = f"{name}.{pname}"
            covered.add(param)
            if not judge:  # which tensors change is still decided, from PEFT's layer
                lora_bias = bool(cast(Any, layer).lora_bias.get(ADAPTER, False))
                stored = merged_names.provided(param)
                if stored is not None and (pname == "weight" or lora_bias):
                    changed.add(stored)
                continue
            if id(p) not in mode.placeholders:
                original: torch.Tensor | None = p.detach()  # the adapter file carries this base tensor
            else:
                original = read(base_names, param, "base")
            got = read(merged_names, param, "merged")
            if original is None or got is None:
                continue
            base_values[pname] = _convert(original, dtype if dtype is not None else got.dtype)
            merged_values[pname] = got
            stored = merged_names.provided(param)
            lora_bias = bool(cast(Any, layer).lora_bias.get(ADAPTER, False))
            if stored is not None and (pname == "weight" or lora_bias or id(p) not in mode.placeholders):
                changed.add(stored)
        if "weight" in merged_values:
            checks.append(_layer_check(name, layer, base_values, merged_values, tolerance, seed, rounded_base))
    for name, wrapper in mode.tokens.items():  # trainable tokens: PEFT's own merged rows
        param = f"{name}.weight"
        covered.add(param)
        original, got, stored = read(base_names, param, "base"), read(merged_names, param, "merged"), None
        if original is None or got is None:
            continue
        stored = merged_names.provided(param)
        assert stored is not None
        changed.add(stored)
        layer = cast(Any, wrapper).token_adapter
        with torch.no_grad(), _holding(layer.base_layer, {"weight": _convert(original, got.dtype)}):
            expected = layer.get_merged_weights([ADAPTER]).detach()
        if got.shape != expected.shape or not torch.equal(got, expected):
            problems.append(f"{stored}: its rows are not PEFT's trainable-tokens rows over the base's")
    for param, value in mode.saved.items():
        if param in covered:
            continue
        covered.add(param)
        got = read(merged_names, param, "merged")
        stored = merged_names.provided(param)
        if got is None or stored is None:
            continue
        changed.add(stored)
        expected = _convert(value, got.dtype)
        if got.shape != expected.shape or not torch.equal(got, expected):
            problems.append(f"{stored}: differs from the adapter's copy, which adapter mode uses instead of the base's")
    for group in mode.groups:  # the other members of a tie keep the value adapter mode gives them
        if not any(member in covered for member in group):
            continue
        for member in group:
            if member in covered:
                continue
            stored = merged_names.provided(member)
            original = read(base_names, member, "base")
            got = read(merged_names, member, "merged")
            if stored is None or original is None or got is None:
                continue
            changed.add(stored)
            if got.shape != original.shape or not torch.equal(got, _convert(original, got.dtype)):
                problems.append(
                    f"{member}: tied to an adapted tensor in the base model, but adapter mode leaves it unchanged; "
                    f"the merged checkpoint gives it the value of {stored}, which differs"
                )
    added = frozenset(changed - set(base_reader.stored))
    return OracleResult(tuple(checks), tuple(problems), frozenset(changed), added, len(mode.layers))


@dataclass(frozen=True)
class Judgement:
    """loramerge's own per-layer checks, joined with the oracle's (:func:`judge_by_peft`).

    Attributes:
        layers: Every layer check; a layer failing against PEFT's own layer fails, with that reason.
        note: How the reference was made, for the report.
        unexpected: Tensors that do not hold what adapter mode uses.
        changed: The tensors adapter mode changes (``None`` when the oracle could not be built).
    """

    layers: list[LayerCheck]
    note: str
    unexpected: list[str]
    changed: frozenset[str] | None

    def leaves_alone(self, name: str) -> bool:
        """Whether adapter mode certainly leaves the stored tensor ``name`` as it is in the base."""
        return self.changed is not None and name not in self.changed


def judge_by_peft(
    base_root: Path,
    merged_root: Path,
    adapter: Adapter,
    tolerance: Tolerance,
    dtype: torch.dtype | None,
    seed: int,
    own: list[LayerCheck],
    every_layer: bool = True,
    plan: Mapping[str, Any] | None = None,
    rounded_base: bool = False,
) -> Judgement:
    """Run :func:`check_merged_checkpoint` and join its layer checks with loramerge's ``own``."""
    result = check_merged_checkpoint(
        base_root,
        merged_root,
        adapter,
        tolerance,
        dtype=dtype,
        seed=seed,
        every_layer=every_layer,
        plan=plan,
        rounded_base=rounded_base,
    )
    if isinstance(result, str):
        note = (
            f"not judged against PEFT's own layers: {result}; the per-tensor checks follow loramerge's own "
            "mapping of the adapter (exact names, no shape guesses)"
        )
        return Judgement(list(own), note, [], None)
    by_name = {c.name: c for c in result.layers}
    layers = []
    for check in own:
        oracle = by_name.pop(check.name, None)
        if oracle is not None and not oracle.passed:
            reason = "; ".join(r for r in (check.reason, oracle.reason) if r)
            check = dataclasses.replace(check, passed=False, reason=reason)
        layers.append(check)
    layers += by_name.values()  # layers PEFT adapts that loramerge's own mapping did not
    names = sorted({p.split(":", 1)[0] for p in result.problems})
    judged = (
        f"all {result.adapted}"
        if len(result.layers) == result.adapted
        else f"{len(result.layers)} of {result.adapted} (one per layer family: class, shape, name, rank, scale, "
        "variant; every tied one)"
    )
    note = (
        f"judged against PEFT's own LoRA layers ({judged}), built from config.json and the adapter file on a "
        "weightless model and run on seeded probes; which tensors change, ties and replaced tensors checked for all"
    )
    if result.problems:
        note += ". Not as adapter mode: " + "; ".join(result.problems[:5])
    return Judgement(layers, note, names, result.changed)
