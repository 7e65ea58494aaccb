"""Glue to PEFT and transformers: attaching adapters, reading LoRA layers back, unwrapping models.

Everything that touches PEFT's module classes lives here, so the rest of loramerge works on plain
tensors (:mod:`loramerge.delta`) and typed adapters (:mod:`loramerge.adapter`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import TrainableTokensWrapper
from torch import nn

from loramerge.adapter import Adapter, check_mergeable_settings
from loramerge.delta import Kind, LoraUpdate
from loramerge.errors import AdapterMismatchError, LoraMergeWarning, UnsupportedAdapterError
from loramerge.preserve import ModuleFlags
from loramerge.quantized import is_quantized_layer
from loramerge.skeleton import module_kind

__all__ = ["LayerPlan", "TokenPlan", "adapter_mode", "attach", "check_compatible", "collect_plans", "unwrap"]

logger = logging.getLogger(__name__)


def base_layer_of(module: Any) -> nn.Module:
    """The original layer under any PEFT wrapper."""
    return cast(nn.Module, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)


def layer_kind(module: nn.Module) -> Kind | None:
    """The LoRA layer kind of a (possibly wrapped) module, or ``None`` when LoRA cannot target it."""
    return cast(Kind | None, module_kind(base_layer_of(module)))


def _expected_shapes(kind: Kind, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(A shape, B shape, output features)`` that an adapter of ``rank`` must have for ``base``."""
    weight = cast(torch.Tensor, base.weight)
    if kind == "embedding":
        num, dim = weight.shape
        return (rank, num), (dim, rank), dim
    if kind == "conv1d":
        n_in, n_out = weight.shape
        return (rank, n_in), (n_out, rank), n_out
    if kind == "linear":
        if is_quantized_layer(base):  # a packed weight: the layer knows its shape
            n_out, n_in = int(cast(Any, base).out_features), int(cast(Any, base).in_features)
        else:
            n_out, n_in = weight.shape
        return (rank, n_in), (n_out, rank), n_out
    conv = cast(nn.Conv2d, base)
    kernel = tuple(weight.shape[2:])
    return (rank, conv.in_channels, *kernel), (conv.out_channels, rank, *(1,) * len(kernel)), conv.out_channels


def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths of ``model``, with PEFT's wrappers seen through (``x.base_layer`` is ``x``)."""
    table: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if ".base_layer" in name or ".lora_" in name or ".modules_to_save" in name or ".original_module" in name:
            continue
        table[name] = module
    return table


def _attention_refused(name: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        f"{name}: LoRA on an nn.MultiheadAttention layer (PEFT adapts its packed in_proj_weight and out_proj "
        "together) is not supported by loramerge yet; nothing was changed. The adapter fits this model: merge it "
        "with PEFT's merge_and_unload(), or keep it in adapter mode."
    )


def check_compatible(model: nn.Module, adapter: Adapter) -> dict[str, Kind]:
    """Check, without changing anything, that ``adapter`` fits ``model``.

    Every adapted module must exist and be a layer LoRA can target, every A/B (and DoRA magnitude,
    LoRA bias) shape must fit, and every replaced tensor must exist with the same shape.

    Returns:
        The layer kind of each adapted module, as the model has it (a GPT-2 ``Conv1D`` is
        ``"conv1d"`` whatever the adapter's ``fan_in_fan_out`` says, as in PEFT).

    Raises:
        AdapterMismatchError: Listing every problem, sorted by module name.
    """
    if isinstance(model, PeftModel):
        model = cast(nn.Module, model.base_model.model)
    modules = _module_table(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, module in modules.items():
        if isinstance(module, ModulesToSaveWrapper):
            for pname, p in module.original_module.named_parameters():
                params[f"{name}.{pname}"] = p
        elif isinstance(module, TrainableTokensWrapper):
            params[f"{name}.weight"] = cast(Any, module).token_adapter.base_layer.weight
        elif isinstance(module, BaseTunerLayer):
            for pname, p in base_layer_of(module).named_parameters(recurse=False):
                params[f"{name}.{pname}"] = p
    problems: list[tuple[str, str]] = []
    kinds: dict[str, Kind] = {}
    for name, mod in adapter.modules.items():
        found = modules.get(name)
        if found is None:
            problems.append((name, "no such module in the model"))
            continue
        kind = layer_kind(found)
        if kind is None and isinstance(base_layer_of(found), nn.MultiheadAttention):
            raise _attention_refused(name)
        if kind is None:
            problems.append((name, f"is a {type(base_layer_of(found)).__name__}, which LoRA cannot target"))
            continue
        if (kind == "embedding") != (mod.kind == "embedding") or (kind == "conv") != (mod.kind == "conv"):
            problems.append((name, f"the adapter holds a {mod.kind} update but the model's layer is {kind}"))
            continue
        base = base_layer_of(found)
        a_shape, b_shape, n_out = _expected_shapes(kind, base, mod.rank)
        up = mod.update
        if tuple(up.lora_A.shape) != a_shape or tuple(up.lora_B.shape) != b_shape:
            problems.append(
                (
                    name,
                    f"expected A {a_shape} and B {b_shape}, found A {tuple(up.lora_A.shape)} and B {tuple(up.lora_B.shape)}",
                )
            )
            continue
        if kind == "conv" and getattr(base, "groups", 1) != 1:
            problems.append((name, "grouped convolutions are not supported"))
        if up.magnitude is not None and up.magnitude.numel() != n_out:
            problems.append((name, f"expected a DoRA magnitude of {n_out} values, found {tuple(up.magnitude.shape)}"))
        if up.bias is not None:
            if getattr(base, "bias", None) is None:
                problems.append((name, "the adapter has lora_bias but the model's layer has no bias to merge it into"))
            elif tuple(up.bias.shape) != (n_out,):
                problems.append((name, f"expected a LoRA bias of shape ({n_out},), found {tuple(up.bias.shape)}"))
        kinds[name] = kind
    for pname, (ids, rows) in adapter.token_rows.items():
        target = params.get(pname)
        if target is None or target.dim() != 2:
            problems.append((pname, "the adapter replaces token rows of this embedding but the model has none"))
        elif rows.shape[1] != target.shape[1] or int(ids.max()) >= target.shape[0]:
            problems.append(
                (
                    pname,
                    f"rows of {rows.shape[1]} values for token ids up to {int(ids.max())}; the model's embedding is "
                    f"{tuple(target.shape)}",
                )
            )
    for pname, tensor in adapter.replaced.items():
        target = params.get(pname)
        if target is None:
            problems.append(
                (pname, f"the adapter replaces this tensor ({adapter.replaced_kinds[pname]}) but the model has none")
            )
        elif tuple(target.shape) != tuple(tensor.shape):
            hint = ""
            if adapter.replaced_kinds[pname] == "saved_base" or "embed" in pname or "lm_head" in pname:
                hint = "; if the vocabulary was resized for training, call model.resize_token_embeddings() first"
            problems.append(
                (
                    pname,
                    f"expected shape {tuple(tensor.shape)} from the adapter, the model has {tuple(target.shape)}{hint}",
                )
            )
    if problems:
        problems.sort()
        lines = "\n".join(f"  - {name}: {why}" for name, why in problems)
        hint = ""
        if (
            len([p for p in problems if p[1] == "no such module in the model"]) == len(adapter.modules)
            and adapter.modules
        ):
            hint = (
                f"\nNone of the adapter's modules exist in this model: the adapter was probably trained for another "
                f"architecture (its config names base model {adapter.base_model_name_or_path!r})."
            )
        raise AdapterMismatchError(
            f"the adapter {str(adapter.path or '<in memory>')!r} does not fit the model "
            f"({type(model).__name__}), {len(problems)} problem(s):\n{lines}{hint}\n"
            "Use the base model the adapter was trained on."
        )
    return kinds


def _lora_config(adapter: Adapter, kinds: dict[str, Kind], *, trainable: bool) -> LoraConfig:
    allowed = {f.name for f in dataclasses.fields(LoraConfig)}
    raw = {k: v for k, v in adapter.config.items() if k in allowed}
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "revision", "auto_mapping"):
        raw.pop(key, None)
    raw["target_modules"] = sorted(adapter.modules)
    raw["init_lora_weights"] = True
    raw["inference_mode"] = not trainable
    raw["fan_in_fan_out"] = any(k == "conv1d" for k in kinds.values())
    if not raw.get("modules_to_save"):
        saved = sorted({n.rsplit(".", 1)[0] for n, k in adapter.replaced_kinds.items() if k == "modules_to_save"})
        raw["modules_to_save"] = saved or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig(**raw)


def attach(model: nn.Module, adapter: Adapter, *, name: str = "default", trainable: bool = False) -> PeftModel:
    """Attach ``adapter`` to ``model`` in adapter mode, after checking that it fits.

    Nothing is changed when the check fails. Attaching to a :class:`~peft.PeftModel` adds the
    adapter next to those already there; all attached adapters are then active (their updates add
    up, which is what merging them in order gives).

    Args:
        model: A transformers model (or any ``nn.Module``), or a ``PeftModel`` to add to.
        adapter: From :func:`~loramerge.load_adapter`.
        name: The adapter's name in the ``PeftModel``.
        trainable: Leave the LoRA weights trainable and the model in the mode it is in (for continued
            training). Default: as ``PeftModel.from_pretrained``, LoRA weights frozen and the model in
            eval mode (dropout off).

    Returns:
        The ``PeftModel`` (wrapping ``model`` in place; no weights are copied).

    Raises:
        AdapterMismatchError: Every mismatch, sorted by module: missing modules, wrong layer types,
            wrong A/B shapes, a name already in use.

    Example:
        >>> peft_model = attach(model, load_adapter(adapter_dir))  # doctest: +SKIP
    """
    peft_model = model if isinstance(model, PeftModel) else None
    if peft_model is not None and name in peft_model.peft_config:
        raise AdapterMismatchError(f"an adapter named {name!r} is already attached; pass another name= to attach().")
    if (
        peft_model is not None
        and adapter.replaced_kinds
        and any(cfg.modules_to_save for cfg in peft_model.peft_config.values() if isinstance(cfg, LoraConfig))
    ) and any(k == "modules_to_save" for k in adapter.replaced_kinds.values()):
        raise UnsupportedAdapterError(
            "two attached adapters would both replace whole modules (modules_to_save); PEFT runs only one such copy "
            "at a time. Merge the first adapter, then attach the second to the merged model."
        )
    kinds = check_compatible(model, adapter)
    config = _lora_config(adapter, kinds, trainable=trainable)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="peft")
        if peft_model is None:
            peft_model = cast(PeftModel, get_peft_model(model, config, adapter_name=name))
        else:
            peft_model.add_adapter(name, config)
        result = set_peft_model_state_dict(peft_model, dict(adapter.tensors), adapter_name=name)
    unexpected = sorted(k for k in getattr(result, "unexpected_keys", []) if name in k or "lora" in k)
    if unexpected:
        raise AdapterMismatchError(f"PEFT did not use these adapter tensors: {unexpected[:10]}")
    tuner = cast(Any, peft_model.base_model)
    tuner.set_adapter(list(peft_model.peft_config))
    if not trainable:  # as PeftModel.from_pretrained: frozen and in eval mode (dropout off) for inference
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)
        peft_model.eval()
    return peft_model


@dataclass
class LayerPlan:
    """One weight to merge: where it lives and the updates of each adapter, in merge order."""

    name: str
    kind: Kind
    layer: nn.Module  # the base layer (owns .weight / .bias)
    updates: list[tuple[str, LoraUpdate]]
    quantized: bool = False  # a bitsandbytes base layer: .weight is packed, see loramerge.quantized
    via_peft: bool = False  # a LoRA variant loramerge does not model: merged by PEFT's own layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight tensor (looked up each time: untying may replace it)."""
        return cast(torch.Tensor, self.layer.weight)


@dataclass
class TokenPlan:
    """Trainable tokens of one embedding: the rows PEFT's layer looks up instead of the base's."""

    name: str
    layer: Any  # PEFT's TrainableTokensLayer (its base_layer owns the weight)
    adapter: str

    @property
    def weight(self) -> torch.Tensor:
        """The embedding weight the rows are written into."""
        return cast(torch.Tensor, self.layer.base_layer.weight)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token ids, rows)``, the rows in the weight's dtype, as PEFT's own merge writes them."""
        ids = torch.tensor(self.layer.token_indices[self.adapter], dtype=torch.long, device=self.weight.device)
        return ids, self.layer.trainable_tokens_delta[self.adapter].detach().to(self.weight)


def _lora_update(module: LoraLayer, adapter_name: str, kind: Kind, name: str, via_peft: bool = False) -> LoraUpdate:
    m = cast(Any, module)
    if kind == "embedding":
        a, b = m.lora_embedding_A[adapter_name], m.lora_embedding_B[adapter_name]
    else:
        a, b = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight
    magnitude = None
    if adapter_name in m.lora_magnitude_vector:
        if kind not in ("linear", "conv1d") and not via_peft:
            raise UnsupportedAdapterError(
                f"{name}: DoRA on {kind} layers is not supported yet; DoRA on linear layers is."
            )
        magnitude = m.lora_magnitude_vector[adapter_name].weight
    bias = m.lora_B[adapter_name].bias if m.lora_bias.get(adapter_name, False) else None
    if kind == "conv":
        base = base_layer_of(module)
        if getattr(base, "groups", 1) != 1 or any(s != 1 for s in b.shape[2:]):
            raise UnsupportedAdapterError(
                f"{name}: grouped convolutions or LoRA B kernels larger than 1 are not supported."
            )
    return LoraUpdate(kind, a.detach(), b.detach(), float(m.scaling[adapter_name]), magnitude=magnitude, bias=bias)


def _needs_peft(module: Any, adapter_names: Sequence[str], kind: Kind, name: str) -> bool:
    """Whether this layer holds state loramerge's own math does not model (a PEFT LoRA variant other
    than DoRA on a linear layer; DoRA on an embedding or a convolution), so that PEFT's own layer
    must merge it. Such a layer is proven against PEFT's own layer on probes, and refused before
    any change where that layer cannot be run on them (see
    :func:`~loramerge.layer_checks.peft_layer_output`)."""
    variants = cast(dict[str, Any], getattr(module, "lora_variant", None) or {})
    magnitudes = cast(Any, getattr(module, "lora_magnitude_vector", None) or {})
    special = []
    for adapter_name in adapter_names:
        variant = variants.get(adapter_name)
        dora = adapter_name in magnitudes
        if (variant is not None and not type(variant).__name__.startswith("Dora")) or (
            dora and kind in ("embedding", "conv")
        ):
            special.append(type(variant).__name__ if variant is not None else "DoRA")
    return bool(special)


def peft_merged(
    module: nn.Module, adapter_names: Sequence[str], dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) PEFT's own layer merges ``adapter_names`` into, computed on a copy of this
    one layer widened to fp32 (fp64 for fp32 weights) and rounded once to ``dtype``.

    Raises:
        UnsupportedAdapterError: PEFT itself cannot merge the layer (its reason is given).
    """
    weight = cast(torch.Tensor, base_layer_of(module).weight)
    wide = torch.float64 if weight.dtype in (torch.float32, torch.float64) else torch.float32
    clone = copy.deepcopy(module).to(wide)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cast(Any, clone).merge(safe_merge=True, adapter_names=list(adapter_names))
    except Exception as e:  # PEFT's own refusal (aLoRA, Arrow, ...) or failure
        raise UnsupportedAdapterError(
            f"{name}: PEFT cannot merge this LoRA layer ({type(e).__name__}: {e}); nothing was changed."
        ) from e
    merged = base_layer_of(clone)
    bias = cast(torch.Tensor | None, getattr(merged, "bias", None))
    return cast(torch.Tensor, merged.weight).detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def collect_plans(
    peft_model: PeftModel, adapter_names: Sequence[str]
) -> tuple[list[LayerPlan], dict[str, str], list[TokenPlan]]:
    """The LoRA layers of ``peft_model`` to merge for ``adapter_names``, the module copies to keep,
    and the trainable-token rows to write.

    Returns:
        ``(plans, saved, tokens)``: one :class:`LayerPlan` per adapted weight, for each
        ``modules_to_save`` wrapper the adapter whose copy replaces the module, and one
        :class:`TokenPlan` per embedding with trainable tokens.
    """
    from peft.tuners.lora import layer as lora_layer

    plans: list[LayerPlan] = []
    saved: dict[str, str] = {}
    tokens: list[TokenPlan] = []
    model = cast(nn.Module, peft_model.base_model.model)
    for adapter_name in adapter_names:
        config = peft_model.peft_config[adapter_name]
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        check_mergeable_settings(raw, f"adapter {adapter_name!r}", layer_variants=True)
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            owners = [a for a in adapter_names if a in module.modules_to_save]
            if len(owners) > 1:
                raise UnsupportedAdapterError(
                    f"{name}: adapters {owners} each replace this module (modules_to_save); merge them one at a time."
                )
            if owners:
                saved[name] = owners[0]
            continue
        if isinstance(module, TrainableTokensWrapper):
            layer = cast(Any, module).token_adapter
            active = [a for a in adapter_names if a in layer.token_indices]
            if len(active) > 1:
                raise UnsupportedAdapterError(
                    f"{name}: adapters {active} each replace token rows; merge them one at a time."
                )
            if active and layer.tied_adapter is None:  # a tied head shares the embedding's rows and weight
                tokens.append(TokenPlan(name, layer, active[0]))
            continue
        if type(module).__name__ == "TrainableTokensLayer" or isinstance(module, lora_layer.ParamWrapper):
            continue  # a ParamWrapper (target_parameters) is planned by loramerge.param_targets
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in adapter_names if a in module.lora_A or a in module.lora_embedding_A]
        if not active:
            continue
        if module.merged:
            raise UnsupportedAdapterError(
                f"{name}: PEFT has already merged {module.merged_adapters} into this layer (merge_adapter()); "
                "call peft_model.unmerge_adapter() first, then loramerge.merge()."
            )
        if is_quantized_layer(base_layer_of(module)):  # whichever LoRA class PEFT wrapped it in
            if _needs_peft(module, active, "linear", name):
                raise UnsupportedAdapterError(
                    f"{name}: a LoRA variant on a quantized layer is not supported; nothing was changed."
                )
            updates = [(a, _lora_update(module, a, "linear", name)) for a in active]
            plans.append(LayerPlan(name, "linear", base_layer_of(module), updates, quantized=True))
            continue
        if isinstance(module, lora_layer.Embedding):
            kind: Kind = "embedding"
        elif isinstance(module, lora_layer._ConvNd):
            kind = "conv"
        elif type(module) is lora_layer.Linear:
            kind = "conv1d" if module.fan_in_fan_out else "linear"
        elif isinstance(module, lora_layer.MultiheadAttention):
            raise _attention_refused(name)
        else:
            raise UnsupportedAdapterError(
                f"{name}: LoRA layer type {type(module).__module__}.{type(module).__name__} is not supported "
                "(of quantized layers, loramerge merges bitsandbytes 4-bit and 8-bit ones)."
            )
        via_peft = _needs_peft(module, active, kind, name)
        updates = [(a, _lora_update(module, a, kind, name, via_peft)) for a in active]
        plans.append(LayerPlan(name, kind, base_layer_of(module), updates, via_peft=via_peft))
    return plans, saved, tokens


def untie_shared(model: nn.Module, plans: Sequence[LayerPlan]) -> list[str]:
    """Give every other user of a weight that is about to be merged its own copy of it.

    Tied input/output embeddings are the usual case: merging a delta into ``embed_tokens`` must not
    change ``lm_head``, because in adapter mode ``lm_head`` does not see the delta. The model's
    config is set to ``tie_word_embeddings=False`` so that saving and reloading keeps them apart.

    Returns:
        The parameter names that got their own copy.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, module, pname))
    untied: list[str] = []
    for plan in plans:
        weight = plan.weight
        users = owners.get(id(weight), [])
        others = [(m, mod, p) for m, mod, p in users if mod is not plan.layer]
        seen: set[int] = set()
        for mname, module, pname in others:
            if id(module) in seen:
                continue
            seen.add(id(module))
            setattr(module, pname, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
            untied.append(f"{mname}.{pname}" if mname else pname)
    if untied:
        config = getattr(model, "config", None)
        for cfg in (config, getattr(config, "get_text_config", lambda: None)() if config is not None else None):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        tied_keys = getattr(model, "_tied_weights_keys", None)
        if isinstance(tied_keys, dict):
            model._tied_weights_keys = {}  # type: ignore[assignment]
        elif isinstance(tied_keys, list):
            model._tied_weights_keys = []  # type: ignore[assignment]
        warnings.warn(
            f"untied {sorted(set(untied))} from the merged weights they shared: in adapter mode they do not see the "
            "LoRA delta, so after the merge they must hold the original values. The model's config now says "
            "tie_word_embeddings=False so that saving and reloading keeps them apart.",
            LoraMergeWarning,
            stacklevel=3,
        )
    return sorted(set(untied))


def unwrap(peft_model: PeftModel, saved: dict[str, str] | None = None) -> nn.Module:
    """Remove every PEFT wrapper from ``peft_model`` in place and return the plain model.

    LoRA layers are replaced by their base layer (as they are: merge first to keep the update).
    ``modules_to_save`` wrappers are replaced by the adapter copy named in ``saved``, or by the
    original module.
    """
    saved = saved or {}
    model = cast(nn.Module, peft_model.base_model.model)
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if ".base_layer" in f"{name}.":  # inside a wrapper that goes as a whole (nested ParamWrappers)
            continue
        if isinstance(module, ModulesToSaveWrapper):
            owner = saved.get(name)
            new = module.modules_to_save[owner] if owner is not None else module.original_module
            replacements.append((name, new))
        elif isinstance(module, TrainableTokensWrapper):  # the rows are written into its weight already
            replacements.append((name, cast(Any, module).token_adapter.base_layer))
        elif type(module).__name__ == "TrainableTokensLayer":
            continue  # inside the wrapper above, which goes as a whole
        elif isinstance(module, BaseTunerLayer):
            replacements.append((name, base_layer_of(module)))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


@contextlib.contextmanager
def adapter_mode(model: nn.Module, adapters: Sequence[Adapter]) -> Iterator[nn.Module]:
    """Run ``model`` with ``adapters`` attached, then restore it exactly as it was.

    Tensors the adapters replace (``modules_to_save``, trained biases, saved embedding bases) are
    copied first and written back afterwards; training and ``requires_grad`` flags are restored too.
    """
    flags = ModuleFlags.of([model])
    originals: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for pname in adapter.replaced:
            if pname not in originals:
                originals[pname] = model.get_parameter(pname).detach().clone()
    current: nn.Module = model
    try:
        for i, adapter in enumerate(adapters):
            current = attach(current, adapter, name=f"loramerge_{i}")
        yield current
    finally:
        if isinstance(current, PeftModel):
            unwrap(current)
        for pname, value in originals.items():
            with torch.no_grad():
                model.get_parameter(pname).copy_(value)
        flags.restore()
