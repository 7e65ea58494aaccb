"""PEFT's adapter mode without weights: the base's module tree built by transformers from
``config.json`` on the ``meta`` device, with PEFT's LoRA layers injected and the adapter's factors
loaded as ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)`` does.

Both the checkpoint plan (which stored tensor each wrapper changes, and which layer class it is)
and the oracle (PEFT's layers run on probes) read PEFT's own injection from here: neither guesses
targets from names or shapes. Nothing here does LoRA math.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loramerge.errors import AdapterMismatchError, UnsupportedAdapterError
from loramerge.formats.adapter import Adapter
from loramerge.formats.adapter_tensors import TRAINING_STATE
from loramerge.formats.shard_writer import release_pages
from loramerge.plan.skeleton import meta_model, tied_names

__all__ = [
    "ADAPTER",
    "AdapterMode",
    "adapter_mode",
    "peft_merged_attention",
    "peft_merged_attention_part",
    "peft_merged_bias",
    "peft_merged_weight",
    "stored_owner",
    "variant_layers",
]

ADAPTER = "default"  # the adapter name PEFT's injected layers use


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
            release_pages(list(adapter.tensors.values()))  # the file's pages, read by the copy, need not stay
            result = set_peft_model_state_dict(peft_model, tensors, adapter_name=ADAPTER, low_cpu_mem_usage=True)
            # Loading next to a 16-bit placeholder rounds the factors to its dtype; from_pretrained keeps
            # them in fp32 (autocast_adapter_dtype): upcast as it does and load the file's values again.
            cast(Any, peft_model.base_model)._cast_adapter_dtype(adapter_name=ADAPTER, autocast_adapter_dtype=True)
            set_peft_model_state_dict(peft_model, tensors, adapter_name=ADAPTER)
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


def variant_layers(root: Path, adapter: Adapter, variants: Mapping[str, str]) -> dict[str, nn.Module]:
    """PEFT's own layer for each stored weight of a module only PEFT merges (KaSA, BD-LoRA, DoRA on
    embeddings and convolutions), by stored tensor name (``variants``: tensor name → module name),
    from PEFT's injection into the model the checkpoint at ``root`` builds from ``config.json``."""
    if not variants:
        return {}
    modules = sorted(set(variants.values()))
    kinds = sorted({adapter.variant_modules[m] for m in modules})
    mode = adapter_mode(root, adapter)
    if isinstance(mode, str):
        raise UnsupportedAdapterError(
            f"{modules} ({', '.join(kinds)}) can only be merged through PEFT's own layer, which needs the model "
            f"config.json builds, but {mode}. Nothing was written. Merge in memory (loramerge.merge on the loaded "
            "model) instead."
        )
    missing = [m for m in modules if m not in mode.layers]
    if missing:
        raise AdapterMismatchError(
            f"PEFT's injection into the model config.json builds made no LoRA layer for {missing}; nothing was "
            "written. Use the base checkpoint the adapter was trained on."
        )
    return {tensor: mode.layers[module] for tensor, module in variants.items()}


def peft_merged_weight(
    layer: nn.Module,
    weight: torch.Tensor,
    name: str,
    adapter_names: Sequence[str] | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) PEFT's own LoRA ``layer`` merges its adapters into when its base weight
    is ``weight``: computed on a copy widened to fp32 (fp64 for fp32 weights), rounded once to the
    stored dtypes. Both engines merge a variant layer with it: the checkpoint engine gives a layer
    of PEFT's injection into the weightless model (its base weight a placeholder) the stored weight,
    the in-memory engine gives a live layer its own. The layer itself is left as it was (a
    variant's pending work, such as KaSA's truncation, stays pending). ``bias``: the base bias to
    merge with, when not the layer's own (a checkpoint streams a layer's bias apart from its weight,
    and a weight's merge does not depend on it; the injection's own is a placeholder).

    Raises:
        UnsupportedAdapterError: PEFT itself cannot merge the layer (its reason is given).
    """
    base = cast(nn.Module, cast(Any, layer).get_base_layer())
    own = cast(torch.Tensor | None, getattr(base, "bias", None))
    return _peft_merged(layer, weight, own if bias is None else bias, name, adapter_names)


def peft_merged_bias(
    layer: nn.Module, bias: torch.Tensor, name: str, adapter_names: Sequence[str] | None = None
) -> torch.Tensor:
    """The bias PEFT's own LoRA ``layer`` (with a LoRA bias) merges its adapters into when its base
    bias is ``bias``, as :func:`peft_merged_weight` computes it. A checkpoint streams a layer's bias
    apart from its weight; PEFT's merge adds the bias update whatever the weight (``bias +
    lora_B.bias * scaling``), so the weight here is zeros of its shape."""
    held = cast(torch.Tensor, cast(Any, layer).get_base_layer().weight)
    zeros = torch.zeros(held.shape, dtype=bias.dtype, device=bias.device)
    _, merged = _peft_merged(layer, zeros, bias, name, adapter_names)
    if merged is None:
        raise UnsupportedAdapterError(f"{name}: PEFT's layer merged no bias; nothing was changed.")
    return merged


def _peft_merged(
    layer: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    name: str,
    adapter_names: Sequence[str] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PEFT's merge of ``layer`` with base ``weight`` and ``bias``, on a widened copy, rounded once."""
    wide = torch.float64 if weight.dtype in (torch.float32, torch.float64) else torch.float32
    base = cast(nn.Module, cast(Any, layer).get_base_layer())
    held = base.weight, getattr(base, "bias", None)
    base.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None and held[1] is not None and bias is not held[1]:
        base.bias = nn.Parameter(bias.detach(), requires_grad=False)
    try:
        clone = copy.deepcopy(layer)
    finally:
        base.weight = held[0]
        if held[1] is not None:
            base.bias = held[1]
    zero_row = (
        torch.zeros(1, base.in_features, dtype=weight.dtype, device=weight.device)
        if isinstance(base, nn.Linear)
        else None
    )
    _merge_widened(clone, wide, adapter_names, name, zero_row)
    merged = cast(Any, clone).get_base_layer()
    new = cast(torch.Tensor | None, getattr(merged, "bias", None))
    new_bias = None if new is None or bias is None else new.detach().to(bias.dtype)
    return cast(torch.Tensor, merged.weight).detach().to(weight.dtype), new_bias


def peft_merged_attention(
    module: nn.Module, adapter_names: Sequence[str], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_proj_weight, out_proj.weight)`` as PEFT's own attention layer ``module`` merges
    ``adapter_names``, computed on a copy widened to fp32 (fp64 for fp32 weights), rounded once.

    Raises:
        UnsupportedAdapterError: PEFT itself cannot merge the layer (its reason is given).
    """
    dtype = cast(Any, module).get_base_layer().in_proj_weight.dtype
    wide = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    clone = copy.deepcopy(module)
    _merge_widened(clone, wide, adapter_names, name, None)
    merged = cast(Any, clone).get_base_layer()
    out = cast(torch.Tensor, merged.out_proj.get_base_layer().weight)
    return merged.in_proj_weight.detach().to(dtype), out.detach().to(dtype)


def stored_owner(layer: nn.Module, part: str) -> tuple[Any, str]:
    """The module of PEFT's ``layer`` that holds the base parameter a stored tensor names (``part``,
    relative to the layer: ``weight``, ``bias``, ``in_proj_weight``, ``out_proj.weight``), and the
    parameter's name there (PEFT wraps an attention's ``out_proj`` in a LoRA layer of its own)."""
    base = cast(Any, layer).get_base_layer()
    if part.startswith("out_proj."):
        return base.out_proj.get_base_layer(), part.split(".", 1)[1]
    return base, part


def peft_merged_attention_part(layer: nn.Module, tensor: torch.Tensor, part: str, name: str) -> torch.Tensor:
    """One stored weight of an ``nn.MultiheadAttention`` (``part``: ``"in_proj_weight"`` or
    ``"out_proj.weight"``) as PEFT's own attention ``layer`` merges it when that weight is ``tensor``,
    as :func:`peft_merged_attention` computes it. A checkpoint streams the two weights apart; PEFT
    merges each on its own (the packed projection's update into ``in_proj_weight``, ``out_proj``'s
    through its own LoRA layer), so the other one is zeros here."""
    attention = cast(Any, layer).get_base_layer()
    out_proj = stored_owner(layer, "out_proj.weight")[0]
    held = attention.in_proj_weight, out_proj.weight
    given = {
        "in_proj_weight": tensor if part == "in_proj_weight" else torch.zeros(held[0].shape, dtype=tensor.dtype),
        "out_proj.weight": tensor if part == "out_proj.weight" else torch.zeros(held[1].shape, dtype=tensor.dtype),
    }
    attention.in_proj_weight = nn.Parameter(given["in_proj_weight"].detach(), requires_grad=False)
    out_proj.weight = nn.Parameter(given["out_proj.weight"].detach(), requires_grad=False)
    try:
        merged_in, merged_out = peft_merged_attention(layer, [ADAPTER], name)
    finally:
        attention.in_proj_weight, out_proj.weight = held
    return merged_in if part == "in_proj_weight" else merged_out


def _merge_widened(
    clone: nn.Module, wide: torch.dtype, adapter_names: Sequence[str] | None, name: str, zero_row: torch.Tensor | None
) -> None:
    """Merge PEFT's layer ``clone`` (a copy) in place in the ``wide`` dtype, as PEFT merges it. With
    ``zero_row`` it first runs once in its stored dtype, on that row: what a variant defers to its
    first forward (KaSA truncating the base weight) happens as on a model loaded in that dtype."""
    names = None if adapter_names is None else list(adapter_names)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if zero_row is not None:
                clone(zero_row)
            clone.to(wide)
            cast(Any, clone).merge(safe_merge=True, adapter_names=names)
    except Exception as e:  # PEFT's own refusal or failure
        raise UnsupportedAdapterError(
            f"{name}: PEFT cannot merge this LoRA layer ({type(e).__name__}: {e}); nothing was changed."
        ) from e
