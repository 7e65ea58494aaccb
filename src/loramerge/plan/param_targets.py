"""LoRA on raw parameters: PEFT's ``target_parameters`` (MoE expert stacks stored as 3-D parameters).

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama 4 and most new
MoE models as one parameter per projection, ``experts.gate_up_proj`` of shape
``(experts, d1, d2)``, not as one ``nn.Linear`` per expert. PEFT adapts such a parameter with a
``ParamWrapper`` (nested, one per parameter, when several parameters of one module are targeted):
rank ``r`` per expert, ``lora_A`` of shape ``(r · experts, in)`` and ``lora_B`` of shape
``(out, r · experts)``, where ``in`` is the dimension the projection reads (the last one, unless
the module says ``is_transposed``).

The plan and the merge live here: which parameter each of PEFT's wrappers adapts, each expert's
update as a plain LoRA update of its matrix (:func:`expert_update`), merged and unmerged in place
with the same arithmetic as every other weight (fp32, one rounding), and, for checkpoints that store
the parameter in pieces, each piece's own update (:func:`stored_updates`). The proof is
:mod:`loramerge.proof.param_checks`, which shares no code with this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from loramerge.numerics.delta import LoraUpdate, merge_tensor_, unmerge_tensor_
from loramerge.numerics.update_checks import check_updates
from loramerge.plan.fused import FusedParam

__all__ = ["ParamPlan", "merge_param_"]


@dataclass
class ParamPlan:
    """One targeted parameter: PEFT's wrapper of it and the adapters to merge into it, in order."""

    name: str  # full parameter path, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    wrapper: Any  # PEFT's ParamWrapper that adapts it
    adapters: list[str]
    owner: nn.Module  # the module that owns the parameter, under every nested wrapper (stays after unwrapping)
    path: str = ""  # the wrapper's module path, as adapter files name its tensors

    @property
    def attr(self) -> str:
        return str(self.wrapper.parameter_name)

    @property
    def param(self) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self.owner, self.attr))

    def updates(self) -> list[tuple[str, LoraUpdate]]:
        """Each adapter's factors, as stored (for fingerprints and lineage)."""
        w = self.wrapper
        return [
            (a, LoraUpdate("linear", w.lora_A[a].weight.detach(), w.lora_B[a].weight.detach(), float(w.scaling[a])))
            for a in self.adapters
        ]

    def fingerprinted(self) -> list[tuple[str, LoraUpdate]]:
        """Each adapter's factors with ``lora_alpha / r`` as the scale: what
        :func:`~loramerge.formats.lineage_records.fingerprint_of` records for the same adapter read from its
        file (which cannot know the parameter, nor rsLoRA's scale, before it is planned)."""
        w = self.wrapper
        return [
            (
                a,
                LoraUpdate(
                    "linear", w.lora_A[a].weight.detach(), w.lora_B[a].weight.detach(), w.lora_alpha[a] / w.r[a]
                ),
            )
            for a in self.adapters
        ]

    def reads_last_dim(self) -> bool:
        """Whether the projection reads the parameter's last dimension (``lora_A`` acts on it)."""
        return self.param.dim() == 2 or not bool(getattr(self.owner, "is_transposed", False))


# ---- loramerge's own merge -----------------------------------------------------------------


def expert_update(
    a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, e: int, last: bool, rows: slice = slice(None)
) -> LoraUpdate:
    """Expert ``e``'s update as a plain LoRA update of its 2-D matrix (``rows`` of it, when a checkpoint
    stores the matrix in row blocks). ``lora_A``'s rows are grouped by expert (rows ``e·r … e·r + r − 1``),
    ``lora_B``'s columns interleaved (``e, e + E, e + 2E, …``). A matrix stored ``[in, out]`` (the module
    says ``is_transposed``) is updated as GPT-2's ``Conv1D`` is."""
    r = a.shape[0] // experts
    a_e = a[e * r : (e + 1) * r].detach()
    b_e = b[rows, e::experts].detach().contiguous()
    return LoraUpdate("linear" if last else "conv1d", a_e, b_e, scale)


def _experts(param: torch.Tensor) -> int:
    return int(param.shape[0]) if param.dim() == 3 else 1


def _expert_updates(plan: ParamPlan, e: int) -> list[LoraUpdate]:
    w, experts, last = plan.wrapper, _experts(plan.param), plan.reads_last_dim()
    return [
        expert_update(w.lora_A[n].weight, w.lora_B[n].weight, float(w.scaling[n]), experts, e, last)
        for n in plan.adapters
    ]


def _matrix(param: torch.Tensor, e: int) -> torch.Tensor:
    return param[e] if param.dim() == 3 else param


def param_problems(plan: ParamPlan) -> list[str]:
    """Shape, finiteness and overflow problems of merging ``plan``, found without changing anything."""
    param = plan.param
    if param.dim() not in (2, 3) or not param.is_floating_point():
        return [f"{plan.name}: a {param.dim()}-D {param.dtype} parameter; LoRA adapts 2-D and 3-D float parameters"]
    experts = _experts(param)
    d_out, d_in = (param.shape[-2], param.shape[-1]) if plan.reads_last_dim() else (param.shape[-1], param.shape[-2])
    problems = []
    for a_name in plan.adapters:
        a, b = plan.wrapper.lora_A[a_name].weight, plan.wrapper.lora_B[a_name].weight
        if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1] or a.shape[0] % experts:
            problems.append(
                f"{plan.name}: adapter {a_name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do "
                f"not fit a parameter of shape {tuple(param.shape)}"
            )
    if problems:
        return problems
    for e in range(experts):
        found = check_updates(_expert_updates(plan, e), _matrix(param, e))
        if found:
            return [f"{plan.name} (expert {e}): {m}" for m in found]
    return []


def merge_param_(plan: ParamPlan) -> float:
    """Merge ``plan``'s adapters into its parameter in place, one expert at a time, with the same
    arithmetic as every other weight (:func:`~loramerge.numerics.delta.merge_tensor_`: fp32, one rounding).

    Returns:
        ``‖ΔW‖`` over the whole parameter (fp32, before rounding).
    """
    param = plan.param
    total = 0.0
    with torch.no_grad():
        for e in range(_experts(param)):
            total += merge_tensor_(_matrix(param, e), _expert_updates(plan, e)).delta_norm ** 2
    return math.sqrt(total)


def stored_updates(
    wrapper: Any, adapter: str, fused: FusedParam, shapes: Mapping[str, Sequence[int]]
) -> dict[str, LoraUpdate] | str:
    """For a parameter a checkpoint stores in pieces (:class:`~loramerge.plan.fused.FusedParam`), each
    stored tensor's own update, by stored name; or why that cannot be done."""
    param = wrapper.get_param()
    if fused.unsupported:
        return fused.unsupported
    if param.dim() != 3 or bool(getattr(wrapper.get_base_layer(), "is_transposed", False)):
        return f"a {param.dim()}-D parameter{' stored [experts, in, out]' if param.dim() == 3 else ''}"
    experts, rows, cols = (int(d) for d in param.shape)
    if any(len(names) != experts for names in fused.sources):
        return f"the checkpoint stores {len(fused.sources[0])} experts, the model has {experts}"
    heights = [int(shapes[names[0]][0]) for names in fused.sources]
    if sum(heights) != rows or any(
        tuple(shapes[n]) != (h, cols) for names, h in zip(fused.sources, heights, strict=True) for n in names
    ):
        return f"the stored pieces do not add up to the parameter's shape {tuple(param.shape)}"
    a, b, scale = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, float(wrapper.scaling[adapter])
    if a.shape[0] % experts or a.shape[1] != cols or b.shape[0] != rows:
        return (
            f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit a parameter of shape {tuple(param.shape)}"
        )
    out: dict[str, LoraUpdate] = {}
    start = 0
    for names, height in zip(fused.sources, heights, strict=True):
        for e, name in enumerate(names):
            out[name] = expert_update(a, b, scale, experts, e, True, slice(start, start + height))
        start += height
    return out


# ---- the proof: PEFT's own wrapper in adapter mode -----------------------------------------


def parameter_path(wrapper_path: str, wrapper: Any) -> str:
    """The model's name of the parameter PEFT's wrapper at ``wrapper_path`` adapts (a wrapper nested
    in another sits at ``<module>.base_layer``; all of them adapt a parameter of ``<module>``)."""
    owner = wrapper_path
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    return f"{owner}.{wrapper.parameter_name}"


def param_plans(model: nn.Module, adapter_names: Sequence[str]) -> list[ParamPlan]:
    """One :class:`ParamPlan` per parameter PEFT adapts with ``adapter_names`` (``target_parameters``)."""
    from peft.tuners.lora.layer import ParamWrapper

    plans = []
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        active = [a for a in adapter_names if a in module.lora_A]
        if not active:
            continue
        plans.append(ParamPlan(parameter_path(name, module), module, active, module.get_base_layer(), name))
    return plans


# ---- a saved adapter on a live model: verify and unmerge ------------------------------------

_ATTACHED = "loramerge_0"  # the name peft_glue.adapter_mode gives the (first) adapter it attaches


@contextmanager
def _attached(model: nn.Module, adapter: Any) -> Iterator[list[ParamPlan]]:
    """``adapter``'s parameter plans with the adapter attached to ``model`` by PEFT (taken off after)."""
    from loramerge.plan.peft_glue import adapter_mode

    with adapter_mode(model, [adapter]) as peft_model:
        yield param_plans(cast(nn.Module, cast(Any, peft_model).base_model.model), [_ATTACHED])


@dataclass
class Unmerge:
    """One parameter to unmerge: where it is and each expert's updates."""

    name: str
    owner: nn.Module
    attr: str
    updates: list[list[LoraUpdate]]

    @property
    def param(self) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self.owner, self.attr))


def planned_unmerges(model: nn.Module, adapter: Any) -> list[Unmerge]:
    """What unmerging ``adapter``'s ``target_parameters`` from ``model`` does, planned by PEFT's own
    injection (attached and taken off again; nothing changes)."""
    found = []
    with _attached(model, adapter) as plans:
        for plan in plans:
            updates = [_expert_updates(plan, e) for e in range(_experts(plan.param))]
            found.append(Unmerge(plan.name, plan.owner, plan.attr, updates))
    return found


def unmerge_param_(item: Unmerge) -> None:
    """Subtract each expert's updates in place (fp32, one rounding)."""
    with torch.no_grad():
        for e, updates in enumerate(item.updates):
            unmerge_tensor_(_matrix(item.param, e), updates, measure=False)
