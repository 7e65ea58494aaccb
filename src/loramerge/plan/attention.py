"""PEFT's LoRA on an ``nn.MultiheadAttention``: its packed projection seen as a linear layer, and
the weights PEFT's attention layer moves while it runs, kept as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

__all__ = ["PackedProjection", "attention_kept"]


class PackedProjection(nn.Module):
    """The packed query/key/value projection of an ``nn.MultiheadAttention`` seen as one linear
    layer: ``weight`` is its ``in_proj_weight`` (``[3 E, E]``, as a Linear stores it), ``bias`` its
    ``in_proj_bias``. Looked up each time (PEFT re-registers them); ``owner`` is the attention."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        object.__setattr__(self, "owner", attention)  # not a submodule: the model holds it

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, cast(Any, self).owner.in_proj_weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return cast(torch.Tensor | None, cast(Any, self).owner.in_proj_bias)


@contextlib.contextmanager
def attention_kept(model: nn.Module) -> Iterator[None]:
    """Keep the weights of every ``nn.MultiheadAttention`` PEFT wraps in ``model`` as they are.

    PEFT's attention layer computes adapter mode by merging its update into the weights before the
    forward and subtracting it after, which moves them by rounding (``W + ΔW − ΔW``) and registers
    new parameters: afterwards the same parameters, with the same values, are put back."""
    from peft.tuners.lora import layer as lora_layer

    kept: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor, list[str]]] = []
    for module in model.modules():
        if isinstance(module, lora_layer.MultiheadAttention):
            attention = module.get_base_layer()
            out = cast(nn.Module, cast(Any, attention.out_proj).get_base_layer())  # PEFT wraps it too
            for owner, pname in ((attention, "in_proj_weight"), (out, "weight")):
                p = cast(nn.Parameter, getattr(owner, pname))
                kept.append((owner, pname, p, p.detach().clone(), list(owner._parameters)))
    try:
        yield
    finally:
        for owner, pname, p, value, order in kept:
            if owner._parameters.get(pname) is not p:
                if pname in owner._parameters or pname in owner.__dict__:
                    delattr(owner, pname)
                owner.register_parameter(pname, p)
                owner._parameters = {k: owner._parameters[k] for k in order if k in owner._parameters}
            with torch.no_grad():
                p.copy_(value)
