"""The oracle's judgement of a merged ``nn.MultiheadAttention`` in a checkpoint.

PEFT's attention layer from the injection into the weightless model gets the base checkpoint's
weights; seeded sequences run through it in adapter mode (and through its fp64 copy, the
reference), and through a plain ``nn.MultiheadAttention`` holding the merged checkpoint's weights,
judged by the tolerance rule (:class:`~loramerge.proof.attention_checks.AttentionProbe`, the same
check as in memory). The attention's ``out_proj`` LoRA layer is judged with it, never alone: PEFT's
attention layer adds its update its own way (peft PR #3774).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from loramerge.numerics.tolerance import Tolerance
from loramerge.proof.attention_checks import AttentionProbe
from loramerge.proof.reports import LayerCheck

__all__ = ["ADAPTED", "attention_check", "attention_params", "judge_attention"]

ADAPTED = ("in_proj_weight", "out_proj.weight")  # the two weights LoRA on an attention changes


def judge_attention(judge: Any, name: str, layer: nn.Module) -> None:
    """Judge the attention ``name`` for the oracle's ``judge`` (:class:`loramerge.proof.oracle._Judge`):
    its two adapted weights change, every parameter of it is covered, and the check is added."""

    def read(which: str, param: str) -> torch.Tensor | None:
        judge.covered.add(f"{name}.{param}")
        got = cast(torch.Tensor | None, judge.read(getattr(judge, which), f"{name}.{param}", which))
        if got is None or which == "merged":
            return got
        return got.to(judge.dtype) if judge.dtype is not None and got.is_floating_point() else got

    for param in ADAPTED:
        stored = judge.merged.provided(f"{name}.{param}")
        if stored is not None:
            judge.changed.add(stored)
    check = attention_check(name, layer, read, judge.tolerance, judge.seed)
    if check is not None:
        judge.checks.append(check)


def attention_params(layer: nn.Module) -> list[str]:
    """The attention's own parameters, by the names the model stores them under (relative to the
    attention): PEFT's ``out_proj`` wrapper and the LoRA factors left out."""
    names = (n.replace(".base_layer.", ".") for n, _ in cast(Any, layer).get_base_layer().named_parameters())
    return [n for n in names if "lora_" not in n]


def attention_check(
    name: str,
    layer: nn.Module,
    read: Callable[[str, str], torch.Tensor | None],
    tolerance: Tolerance,
    seed: int,
) -> LayerCheck | None:
    """PEFT's attention ``layer`` (named ``name``) holding the base checkpoint's values against a plain
    attention holding the merged checkpoint's; ``read(which, param)`` reads ``param`` (relative to the
    attention) from the ``"base"`` or the ``"merged"`` checkpoint (``None``: absent, already said)."""
    values = {w: {p: read(w, p) for p in attention_params(layer)} for w in ("base", "merged")}
    if any(v is None for side in values.values() for v in side.values()):
        return None
    peft_layer = copy.deepcopy(layer)
    attention = cast(Any, peft_layer).get_base_layer()
    if not attention._qkv_same_embed_dim:
        return None  # PEFT's attention layer packs the projections; it refuses these itself
    for pname, value in values["base"].items():
        owner, attr = _owner(attention, pname)
        setattr(owner, attr, nn.Parameter(cast(torch.Tensor, value).clone(), requires_grad=False))
    probe = AttentionProbe.of(name, peft_layer, seed)
    plain = nn.MultiheadAttention(
        attention.embed_dim,
        attention.num_heads,
        bias=attention.in_proj_bias is not None,
        add_bias_kv=attention.bias_k is not None,
        add_zero_attn=attention.add_zero_attn,
        batch_first=attention.batch_first,
        dtype=attention.in_proj_weight.dtype,
    ).eval()
    with torch.no_grad():
        for pname, value in values["merged"].items():
            plain.get_parameter(pname).copy_(cast(torch.Tensor, value))
    return probe.check(plain, tolerance)


def _owner(attention: Any, pname: str) -> tuple[Any, str]:
    if pname.startswith("out_proj."):
        return attention.out_proj.get_base_layer(), pname.split(".", 1)[1]
    return attention, pname
