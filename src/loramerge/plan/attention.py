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
def attention_kept(model: nn.Module, values: bool = True) -> Iterator[None]:
    """Give every ``nn.MultiheadAttention`` in ``model`` (wrapped by PEFT or not yet) its own weight
    parameters back afterwards, with their values as they were (``values=False``: as they are then).

    PEFT registers new ``in_proj_weight`` and ``out_proj.weight`` parameters when it wraps an
    attention, and its attention layer computes adapter mode by merging its update into the weights
    before each forward and subtracting it after, which moves them by rounding (``W + ΔW − ΔW``) and
    registers new parameters again. The same parameter objects (so their ``requires_grad`` and
    place among the module's parameters) come back; ``values=False`` carries the values the
    operation left (a merge's) into them."""
    kept: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor | None, list[str]]] = []
    seen: set[int] = set()
    for module in model.modules():
        attention = cast(Any, module).get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(attention, nn.MultiheadAttention) or id(attention) in seen:
            continue
        seen.add(id(attention))
        wrapped: Any = attention.out_proj  # PEFT wraps it too
        out = cast(nn.Module, wrapped.get_base_layer() if hasattr(wrapped, "get_base_layer") else wrapped)
        owners: tuple[tuple[nn.Module, str], ...] = ((attention, "in_proj_weight"), (out, "weight"))
        for owner, pname in owners:
            p = cast(nn.Parameter, getattr(owner, pname))
            kept.append((owner, pname, p, p.detach().clone() if values else None, list(owner._parameters)))
    try:
        yield
    finally:
        for owner, pname, p, value, order in kept:
            current = cast(torch.Tensor, getattr(owner, pname))
            with torch.no_grad():
                p.copy_(value if value is not None else current.detach())
            if owner._parameters.get(pname) is not p:
                if pname in owner._parameters or pname in owner.__dict__:
                    delattr(owner, pname)
                owner.register_parameter(pname, p)
                owner._parameters = {k: owner._parameters[k] for k in order if k in owner._parameters}
