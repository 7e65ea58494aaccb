"""The in-memory unmerge engine: one :class:`UnmergeRun` per :func:`~loramerge.unmerge`, phase by phase.

1. :meth:`UnmergeRun.plan`: the adapter's layers in the merged model, every update checked, and
   refusal of what cannot be undone exactly (DoRA without its norms, replaced tensors without their
   originals) before anything changes.
2. :meth:`UnmergeRun.measure`: while the merged weights still exist, each layer's outputs on probes
   and the model's outputs on a probe batch: what adapter mode on the restored base must reproduce.
3. :meth:`UnmergeRun.apply`: each weight becomes ``round(W_merged - ΔW)`` in fp32
   (:func:`~loramerge.numerics.delta.unmerge_tensor_`), corrected bit for bit by a receipt when
   there is one; expert parameters and replaced tensors come back.
4. :meth:`UnmergeRun.judge`: re-merge gap and probe outputs per layer; PEFT's adapter mode on the
   restored model against the merged model's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from loramerge.engine.checkpoint_steps import refuse_inexact_unmerge
from loramerge.engine.inmemory_common import FileMappings, _raise_problems
from loramerge.errors import AdapterMismatchError, InvalidArgumentError
from loramerge.formats.adapter import Adapter
from loramerge.formats.receipts import Receipt, ReceiptError
from loramerge.formats.receipts import apply as apply_receipt
from loramerge.numerics.delta import Kind, LoraUpdate, TensorStats, unmerge_tensor_
from loramerge.numerics.tolerance import Tolerance, ulp
from loramerge.numerics.update_checks import check_updates
from loramerge.plan.param_targets import Unmerge, planned_unmerges, unmerge_param_
from loramerge.plan.peft_glue import adapter_mode
from loramerge.plan.peft_plans import LayerPlan
from loramerge.proof.layer_checks import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
    bias_of,
    exact_layer_output,
    output_subset,
    probe_inputs,
    restrict_vector,
    restrict_weight,
    storage_rms,
)
from loramerge.proof.model_runs import CheckOutputs, Probes, probe_batch, run_model
from loramerge.proof.output_checks import output_check, reference_outputs, storage_baseline
from loramerge.proof.param_checks import ProbedValues, unmerged_checks
from loramerge.proof.reports import LayerCheck, OutputCheck

__all__ = ["UnmergeRun"]


def _check_exact(
    adapter: Adapter, dora_norms: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor]
) -> None:
    """Refuse, before anything changes, an unmerge that cannot be exact."""
    missing_norms = sorted(n for n, m in adapter.modules.items() if m.use_dora and n not in dora_norms)
    missing_originals = sorted(
        [
            n
            for n, k in adapter.replaced_kinds.items()
            if k in ("modules_to_save", "trained_bias") and n not in originals
        ]
        + [n for n in adapter.token_rows if n not in originals]  # trainable tokens: the replaced rows
    )
    missing_variants = sorted(
        m for m in adapter.variant_modules if any(w not in originals for w in adapter.weight_names(m))
    )
    refuse_inexact_unmerge(adapter, missing_norms, missing_originals, missing_variants, "changed")
    bad_shapes = sorted(
        n for n, t in originals.items() if n in adapter.replaced and tuple(t.shape) != tuple(adapter.replaced[n].shape)
    )
    if bad_shapes:
        raise AdapterMismatchError(f"originals= has wrong shapes for {bad_shapes}")


@dataclass
class UnmergeRun:
    """The state of one in-memory unmerge of ``adapter`` from ``model``, in place."""

    model: nn.Module
    adapter: Adapter
    verify: bool
    tol: Tolerance
    seed: int
    dora_norms: dict[str, torch.Tensor]
    originals: dict[str, torch.Tensor]
    receipt: Receipt | None
    plans: list[LayerPlan]
    experts: list[Unmerge]
    notes: list[str] = field(default_factory=list)
    # gathered by measure()
    experts_merged: dict[str, ProbedValues] = field(default_factory=dict)
    batch: dict[str, torch.Tensor] | None = None
    merged_out: torch.Tensor | None = None
    merged_storage: tuple[float, float] = (0.0, 0.0)
    merged_routes: list[torch.Tensor] = field(default_factory=list)
    target_out: dict[str, torch.Tensor] = field(default_factory=dict)
    storage: dict[str, float] = field(default_factory=dict)
    # gathered by apply()
    stats: dict[str, TensorStats] = field(default_factory=dict)
    exact: list[str] = field(default_factory=list)

    @classmethod
    def plan(
        cls,
        model: nn.Module,
        adapter: Adapter,
        verify: bool,
        tol: Tolerance,
        seed: int,
        dora_norms: dict[str, torch.Tensor],
        originals: dict[str, torch.Tensor],
        receipt: Receipt | None,
        kinds: Mapping[str, Kind],
    ) -> UnmergeRun:
        """The adapter's layers in ``model`` (of the layer ``kinds`` the fit check found), every
        update checked; refusals before any change."""
        _check_exact(adapter, dora_norms, originals)
        plans = []
        for name, mod in adapter.modules.items():
            kind = kinds[name]
            up = LoraUpdate(
                kind, mod.update.lora_A, mod.update.lora_B, mod.scale, mod.update.magnitude, mod.update.bias
            )
            plans.append(LayerPlan(name, kind, model.get_submodule(name), [("adapter", up)]))
        problems = [f"{p.name}: {msg}" for p in plans for msg in check_updates([u for _, u in p.updates], p.weight)]
        experts = planned_unmerges(model, adapter) if adapter.parameter_factors else []
        if experts and receipt is not None:
            raise InvalidArgumentError("receipts do not cover target_parameters; unmerge without receipt=")
        problems += [
            f"{x.name}: {m}" for x in experts for e, ups in enumerate(x.updates) for m in check_updates(ups, x.param[e])
        ]
        _raise_problems(problems, "unmerging")
        return cls(model, adapter, verify, tol, seed, dora_norms, originals, receipt, plans, experts)

    def measure(self, check_outputs: CheckOutputs, probes: Probes | None) -> None:
        """What the merged model computes, measured before it changes."""
        self.experts_merged = {x.name: ProbedValues.of(x.name, x.param, self.seed) for x in self.experts}
        self.batch = probe_batch(self.model, check_outputs, probes, self.seed, self.notes)
        if self.batch is not None:
            self.merged_out = run_model(self.model, self.batch, self.merged_routes)
            # measured now, while the merged weights exist; used only if the rule needs it
            weights = [p.weight for p in self.plans]
            self.merged_storage = storage_baseline(self.model, self.batch, weights, self.seed)
        for plan in self.plans:
            x = probe_inputs(plan.name, plan.kind, plan.weight, self.seed)
            idx = output_subset(plan.name, plan.kind, plan.weight, self.seed, MAX_PROBE_OUTPUTS)
            w_sub = restrict_weight(plan.kind, plan.weight, idx)
            bias = restrict_vector(bias_of(plan.layer), idx)
            self.target_out[plan.name] = exact_layer_output(plan.kind, w_sub, bias, x)
            self.storage[plan.name] = storage_rms(plan.kind, w_sub, x)

    def try_receipt(self) -> None:
        """Every receipt correction must fit before anything changes: each is tried on a copy first."""
        rc = self.receipt
        if rc is None:
            return
        missing = sorted(f"{p.name}.weight" for p in self.plans if f"{p.name}.weight" not in rc.tensors)
        if missing:
            raise ReceiptError(f"the receipt has no entry for {missing}; it was written for another model or merge.")
        for plan in self.plans:
            trial = plan.weight.detach().clone()
            unmerge_tensor_(trial, [plan.updates[0][1]], self.dora_norms.get(plan.name), measure=False)
            apply_receipt(trial, rc.tensors[f"{plan.name}.weight"], f"{plan.name}.weight")

    def apply(self) -> None:
        """Change the weights back: every adapted layer, expert parameter and replaced tensor."""
        mapped = FileMappings()
        for plan in self.plans:
            self._apply_layer(plan, mapped)
        for item in self.experts:
            if mapped.holds(item.param):
                mapped.own_copy(item.param)
            unmerge_param_(item)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for pname, value in self.originals.items():
            target = params[pname]
            with torch.no_grad():
                target.copy_(value.to(target.dtype).to(target.device))
            self.exact.append(pname)

    def _apply_layer(self, plan: LayerPlan, mapped: FileMappings) -> None:
        up = plan.updates[0][1]
        with torch.no_grad():
            if mapped.holds(plan.weight):  # copy-on-write pages of the loaded file (see FileMappings)
                mapped.own_copy(cast(torch.Tensor, plan.layer.weight))
            self.stats[plan.name] = unmerge_tensor_(plan.weight, [up], self.dora_norms.get(plan.name))
            if up.bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_((bias.detach().float() - up.scale * up.bias.detach().float().to(bias.device)).to(bias.dtype))
            if self.receipt is not None:
                for suffix in ("weight", "bias"):
                    entry = self.receipt.tensors.get(f"{plan.name}.{suffix}")
                    target = cast(torch.Tensor | None, getattr(plan.layer, suffix, None))
                    if entry is not None and target is not None:
                        target.copy_(apply_receipt(target.detach(), entry, f"{plan.name}.{suffix}"))
                        self.exact.append(f"{plan.name}.{suffix}")
        if self.receipt is not None:
            return
        saved_base = self.adapter.replaced.get(f"{plan.name}.weight")
        if saved_base is None:
            return
        candidate = saved_base.to(plan.weight.dtype).to(plan.weight.device)
        close = (candidate.float() - plan.weight.detach().float()).abs() <= ulp(candidate.float(), candidate.dtype)
        if bool(close.all()):
            with torch.no_grad():
                plan.weight.copy_(candidate)
            self.exact.append(f"{plan.name}.weight")
        else:
            self.notes.append(
                f"{plan.name}.weight: the adapter's saved base copy differs from the recovered weight; kept the recovered one"
            )

    @property
    def bound(self) -> float:
        """The largest elementwise error bound of the tensors not restored exactly."""
        return max((st.error_bound for n, st in self.stats.items() if f"{n}.weight" not in self.exact), default=0.0)

    def judge(self, layers: list[LayerCheck]) -> OutputCheck | None:
        """Each layer (appended to ``layers`` as judged), then the model: PEFT's adapter mode on the
        restored model must compute what the merged model computed."""
        for plan in self.plans:
            layers.append(self._layer_check(plan))
        if self.experts:
            layers += unmerged_checks(self.model, self.adapter, self.experts_merged, self.tol, self.seed)
        if self.merged_out is None or self.batch is None:
            return None
        with adapter_mode(self.model, [self.adapter]) as peft_model:
            ref = reference_outputs(peft_model, self.batch)
        if ref.note:
            self.notes.append(ref.note)
        storage = self.merged_storage
        return output_check(self.merged_out, ref, self.tol, self.batch, lambda: storage, self.merged_routes)

    def _layer_check(self, plan: LayerPlan) -> LayerCheck:
        up = plan.updates[0][1]
        st = self.stats[plan.name]
        probe_bias = bias_of(plan.layer)
        trained_bias = self.adapter.replaced.get(f"{plan.name}.bias")
        if trained_bias is not None and probe_bias is not None:  # adapter mode runs with the adapter's bias
            probe_bias = trained_bias.to(probe_bias.dtype).to(probe_bias.device)
        probe = LayerProbe(plan.name, plan.kind, plan.weight.detach(), probe_bias, [up], self.seed, MAX_PROBE_OUTPUTS)
        reason = ""
        if st.remerge_gap > 1.0 + 1e-6:
            reason = (
                f"re-merging the recovered weight misses the merged weight by {st.remerge_gap:.3g}x what rounding "
                "allows: the subtraction lost precision"
            )
        both = math.hypot(self.storage[plan.name], probe.storage(plan.weight))
        return probe.check(self.target_out[plan.name], self.tol, st.relative_residual, st.max_ulp, reason, both)
