"""Glue to PEFT and transformers: attaching adapters, reading LoRA layers back, unwrapping models.

Everything that touches PEFT's module classes lives here, so the rest of loramerge works on plain
tensors (:mod:`loramerge.numerics.delta`) and typed adapters (:mod:`loramerge.formats.adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import TrainableTokensWrapper
from torch import nn

from loramerge.errors import AdapterMismatchError, UnsupportedAdapterError
from loramerge.formats.adapter import ATTENTION, Adapter, AdapterModule
from loramerge.numerics.delta import Kind
from loramerge.numerics.quantized import is_quantized_layer
from loramerge.plan.attention import attention_kept
from loramerge.plan.skeleton import module_kind, padding_unmergeable
from loramerge.preserve import ModuleFlags

__all__ = ["adapter_mode", "attach", "check_compatible", "unwrap"]

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
    params = _base_params(model, modules)
    problems: list[tuple[str, str]] = []
    kinds: dict[str, Kind] = {}
    for name, mod in adapter.modules.items():
        kind = _fitting_kind(name, mod, modules.get(name), problems)
        if kind is not None:
            kinds[name] = kind
    for name, variant in adapter.variant_modules.items():  # PEFT checks their factors when it loads them
        found = modules.get(name)
        if found is None:
            problems.append((name, "no such module in the model"))
        elif (variant == ATTENTION) != isinstance(base_layer_of(found), nn.MultiheadAttention) or (
            variant != ATTENTION and layer_kind(found) is None
        ):
            problems.append((name, f"is a {type(base_layer_of(found)).__name__}, which {variant} cannot target"))
    _check_replaced(adapter, params, problems)
    if problems:
        problems.sort()
        lines = "\n".join(f"  - {name}: {why}" for name, why in problems)
        hint = ""
        missing = [p for p in problems if p[1] == "no such module in the model"]
        if adapter.target_modules and len(missing) == len(adapter.target_modules):
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


def _base_params(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The model's parameters by name, those under PEFT's wrappers by the base model's names."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for name, module in modules.items():
        if isinstance(module, ModulesToSaveWrapper):
            for pname, p in module.original_module.named_parameters():
                params[f"{name}.{pname}"] = p
        elif isinstance(module, TrainableTokensWrapper):
            params[f"{name}.weight"] = cast(Any, module).token_adapter.base_layer.weight
        elif isinstance(module, BaseTunerLayer):
            for pname, p in base_layer_of(module).named_parameters(recurse=False):
                params[f"{name}.{pname}"] = p
    return params


def _fitting_kind(
    name: str, mod: AdapterModule, found: nn.Module | None, problems: list[tuple[str, str]]
) -> Kind | None:
    """The model's layer kind for one adapted module, when the adapter's factors fit it (else a problem)."""
    if found is None:
        problems.append((name, "no such module in the model"))
        return None
    kind = layer_kind(found)
    if kind is None and isinstance(base_layer_of(found), nn.MultiheadAttention):
        problems.append(
            (name, "an nn.MultiheadAttention, but the adapter lacks the out_proj factors PEFT saves with it")
        )
        return None
    if kind is None:
        problems.append((name, f"is a {type(base_layer_of(found)).__name__}, which LoRA cannot target"))
        return None
    if (kind == "embedding") != (mod.kind == "embedding") or (kind == "conv") != (mod.kind == "conv"):
        problems.append((name, f"the adapter holds a {mod.kind} update but the model's layer is {kind}"))
        return None
    base = base_layer_of(found)
    a_shape, b_shape, n_out = _expected_shapes(kind, base, mod.rank)
    up = mod.update
    if tuple(up.lora_A.shape) != a_shape or tuple(up.lora_B.shape) != b_shape:
        found_shapes = f"A {tuple(up.lora_A.shape)} and B {tuple(up.lora_B.shape)}"
        problems.append((name, f"expected A {a_shape} and B {b_shape}, found {found_shapes}"))
        return None
    if kind == "conv" and getattr(base, "groups", 1) != 1:
        problems.append((name, "grouped convolutions are not supported"))
    if kind == "conv" and (why := padding_unmergeable(base)) is not None:
        raise UnsupportedAdapterError(f"{name}: {why}; nothing was changed.")
    if up.magnitude is not None and up.magnitude.numel() != n_out:
        problems.append((name, f"expected a DoRA magnitude of {n_out} values, found {tuple(up.magnitude.shape)}"))
    if up.bias is not None:
        if getattr(base, "bias", None) is None:
            problems.append((name, "the adapter has lora_bias but the model's layer has no bias to merge it into"))
        elif tuple(up.bias.shape) != (n_out,):
            problems.append((name, f"expected a LoRA bias of shape ({n_out},), found {tuple(up.bias.shape)}"))
    return kind


def _check_replaced(adapter: Adapter, params: Mapping[str, torch.Tensor], problems: list[tuple[str, str]]) -> None:
    """Every tensor (or token row) the adapter replaces must exist in the model with a fitting shape."""
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
            kind = adapter.replaced_kinds[pname]
            problems.append((pname, f"the adapter replaces this tensor ({kind}) but the model has none"))
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


def _lora_config(adapter: Adapter, kinds: dict[str, Kind], *, trainable: bool) -> LoraConfig:
    allowed = {f.name for f in dataclasses.fields(LoraConfig)}
    raw = {k: v for k, v in adapter.config.items() if k in allowed}
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "revision", "auto_mapping"):
        raw.pop(key, None)
    # PEFT wraps an attention's out_proj itself when it wraps the attention
    raw["target_modules"] = [n for n in adapter.target_modules if ".base_layer." not in n]
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
        added = peft_model is None
        if peft_model is None:
            peft_model = cast(PeftModel, get_peft_model(model, config, adapter_name=name))
        else:
            peft_model.add_adapter(name, config)
        try:
            result = set_peft_model_state_dict(peft_model, dict(adapter.tensors), adapter_name=name)
        except RuntimeError as e:  # a variant's factors (checked by PEFT only) do not fit: take it off again
            if added:
                unwrap(peft_model)
            else:
                peft_model.delete_adapter(name)
            raise AdapterMismatchError(
                f"the adapter {str(adapter.path or '<in memory>')!r} does not fit the model: PEFT cannot load its "
                f"tensors ({e}). Nothing was merged. Use the base model the adapter was trained on."
            ) from e
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
            base = base_layer_of(module)
            if isinstance(base, nn.MultiheadAttention):  # PEFT wrapped its out_proj too
                base.out_proj = cast(Any, base_layer_of(base.out_proj))
            replacements.append((name, base))
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

    Tensors the adapters replace (``modules_to_save``, trained biases, saved embedding bases) and
    the weights of variant modules (KaSA truncates its base weight when PEFT attaches it) are copied
    first and written back afterwards; training and ``requires_grad`` flags are restored too.
    """
    flags = ModuleFlags.of([model])
    originals: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for pname in [*adapter.replaced, *(w for m in adapter.variant_modules for w in adapter.weight_names(m))]:
            if pname not in originals:
                originals[pname] = model.get_parameter(pname).detach().clone()
    current: nn.Module = model
    try:
        with attention_kept(model):  # before attaching: PEFT registers an attention's weights anew
            try:
                for i, adapter in enumerate(adapters):
                    current = attach(current, adapter, name=f"loramerge_{i}")
                yield current
            finally:
                if isinstance(current, PeftModel):
                    unwrap(current)
    finally:
        for pname, value in originals.items():
            with torch.no_grad():
                model.get_parameter(pname).copy_(value)
        flags.restore()
