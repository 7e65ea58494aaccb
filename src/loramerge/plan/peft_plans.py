"""What to merge in a live ``PeftModel``: one plan per adapted weight (its layer, its updates,
whether PEFT's own layer must merge it), the trainable-token rows, and untying weights that other
modules share. (:mod:`loramerge.plan.param_targets` plans ``target_parameters``.)"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import TrainableTokensWrapper
from torch import nn

from loramerge.errors import LoraMergeWarning, UnsupportedAdapterError
from loramerge.formats.adapter_config import check_mergeable_settings
from loramerge.numerics.delta import Kind, LoraUpdate
from loramerge.numerics.quantized import is_quantized_layer
from loramerge.plan.attention import PackedProjection
from loramerge.plan.peft_glue import base_layer_of
from loramerge.plan.skeleton import padding_unmergeable

__all__ = ["LayerPlan", "TokenPlan", "collect_plans", "out_proj_multiple"]


@dataclass
class LayerPlan:
    """One weight to merge: where it lives and the updates of each adapter, in merge order."""

    name: str
    kind: Kind
    layer: nn.Module  # the base layer (owns .weight / .bias)
    updates: list[tuple[str, LoraUpdate]]
    quantized: bool = False  # a bitsandbytes base layer: .weight is packed, see loramerge.numerics.quantized
    via_peft: bool = False  # a LoRA variant loramerge does not model: merged by PEFT's own layer
    attention: str | None = None  # part of the nn.MultiheadAttention at this path, which PEFT's layer merges whole

    @property
    def weight(self) -> torch.Tensor:
        """The weight tensor (looked up each time: untying may replace it)."""
        return cast(torch.Tensor, self.layer.weight)


def _attention_plans(name: str, module: Any, active: Sequence[str]) -> list[LayerPlan]:
    """PEFT's LoRA on an ``nn.MultiheadAttention``: its packed projection and its ``out_proj`` (a
    nested LoRA Linear, by PEFT's name ``<name>.base_layer.out_proj``). PEFT's attention layer merges
    them together (:func:`~loramerge.plan.injection.peft_merged_attention`), as its adapter mode computes."""
    attention = cast(nn.MultiheadAttention, module.get_base_layer())
    nested = cast(Any, attention.out_proj)
    if not attention._qkv_same_embed_dim:
        raise UnsupportedAdapterError(
            f"{name}: an attention with separate q/k/v weights; PEFT supports packed ones only."
        )
    packed = [
        (
            a,
            LoraUpdate(
                "linear", module.lora_A[a].weight.detach(), module.lora_B[a].weight.detach(), float(module.scaling[a])
            ),
        )
        for a in active
    ]
    out = [(a, _lora_update(nested, a, "linear", f"{name}.out_proj")) for a in active]
    return [
        LayerPlan(name, "linear", PackedProjection(attention), packed, via_peft=True, attention=name),
        LayerPlan(f"{name}.base_layer.out_proj", "linear", base_layer_of(nested), out, via_peft=True, attention=name),
    ]


def out_proj_multiple(module: nn.Module, adapter_names: Sequence[str], merged_out: torch.Tensor) -> float:
    """How many times PEFT's attention layer ``module`` added its ``out_proj`` update into
    ``merged_out`` (a least-squares multiple of ``ΔW``: 1 as a merge should, 2 in PEFT 0.21, see
    peft PR #3774), for the report."""
    nested = cast(Any, module).get_base_layer().out_proj
    with torch.no_grad():
        delta = sum(nested.get_delta_weight(a).detach().double() for a in adapter_names)
        change = merged_out.double() - cast(torch.Tensor, base_layer_of(nested).weight).detach().double()
        size = float((delta * delta).sum())
        return float((change * delta).sum()) / size if size > 0 else 1.0


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
        if (why := padding_unmergeable(base)) is not None:
            raise UnsupportedAdapterError(f"{name}: {why}; nothing was changed.")
    return LoraUpdate(kind, a.detach(), b.detach(), float(m.scaling[adapter_name]), magnitude=magnitude, bias=bias)


def _needs_peft(module: Any, adapter_names: Sequence[str], kind: Kind, name: str) -> bool:
    """Whether this layer holds state loramerge's own math does not model (a PEFT LoRA variant other
    than DoRA on a linear layer; DoRA on an embedding or a convolution), so that PEFT's own layer
    must merge it. Such a layer is proven against PEFT's own layer on probes, and refused before
    any change where that layer cannot be run on them (see
    :func:`~loramerge.proof.layer_checks.peft_layer_output`)."""
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
        check_mergeable_settings(raw, f"adapter {adapter_name!r}")
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
            continue  # a ParamWrapper (target_parameters) is planned by loramerge.plan.param_targets
        if not isinstance(module, LoraLayer) or any(
            p.attention is not None and name.startswith(f"{p.attention}.base_layer.") for p in plans
        ):
            continue  # an attention's out_proj is planned with the attention
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
            plans += _attention_plans(name, module, active)
            continue
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
        owner = getattr(plan.layer, "owner", plan.layer)  # an attention owns its packed projection
        others = [(m, mod, p) for m, mod, p in users if mod is not owner]
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
