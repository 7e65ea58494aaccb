"""The in-memory merge engine: one :class:`MergeRun` per :func:`~loramerge.merge`, phase by phase.

1. :meth:`MergeRun.prepare`: every check that can be made before a weight changes (finite updates,
   no overflow, PEFT's own merge of variants computed on a widened copy, every quantized layer
   dequantized exactly), and the per-layer probes, with PEFT's own layer run on them as the
   independent reference.
2. :meth:`MergeRun.reference`: adapter mode's outputs on a probe batch (the whole-model reference).
3. :meth:`MergeRun.apply`: the weights change: each in fp32 with one rounding
   (:func:`~loramerge.numerics.delta.merge_tensor_`, the code the checkpoint engine runs), quantized
   layers dequantized or re-quantized, expert parameters, trainable-token rows.
4. :meth:`MergeRun.finish`: the PEFT wrappers come off; a dequantized base becomes a plain model.
5. :meth:`MergeRun.judge`: each layer against its probes, the model against adapter mode.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import peft
import torch
from peft import PeftModel
from torch import nn

from loramerge.engine.inmemory_common import (
    FileMappings,
    _merge_quantized,
    _merged_bias,
    _merged_check,
    _QuantPlan,
    _raise_problems,
    _receipt_originals,
    _record_receipt,
    _replace_module,
    _requantized_check,
    _requantized_output_check,
    _token_check,
)
from loramerge.errors import InvalidArgumentError, LoraMergeError, UnsupportedAdapterError
from loramerge.formats.receipts import Receipt
from loramerge.numerics.delta import TensorStats, merge_tensor_
from loramerge.numerics.quantized import checked_dequantize, compute_dtype, keep_layout, quantized_layers
from loramerge.numerics.requantize import dequantized_linear, forget_quantization
from loramerge.numerics.tolerance import Tolerance, relative_errors
from loramerge.numerics.update_checks import check_updates
from loramerge.plan.attention import attention_kept
from loramerge.plan.injection import peft_merged_attention, peft_merged_weight
from loramerge.plan.param_targets import ParamPlan, merge_param_, param_plans, param_problems
from loramerge.plan.peft_glue import unwrap
from loramerge.plan.peft_plans import (
    LayerPlan,
    TokenPlan,
    collect_plans,
    out_proj_multiple,
    untie_shared,
)
from loramerge.preserve import ModuleFlags
from loramerge.proof.attention_checks import AttentionProbe
from loramerge.proof.layer_checks import MAX_PROBE_OUTPUTS, LayerProbe, bias_of, loses_precision, peft_layer_output
from loramerge.proof.model_runs import CheckOutputs, Probes, probe_batch, run_model
from loramerge.proof.output_checks import ModelReference, output_check, reference_outputs, storage_baseline
from loramerge.proof.param_checks import ParamOracle, check_param
from loramerge.proof.reports import LayerCheck, OutputCheck

__all__ = ["MergeRun"]

logger = logging.getLogger(__name__)


@dataclass
class MergeRun:
    """The state of one in-memory merge of the adapters ``names`` of ``peft_model``, in place."""

    peft_model: PeftModel
    flags: ModuleFlags
    names: list[str]
    verify: bool
    tol: Tolerance
    seed: int
    qplan: _QuantPlan | None
    plans: list[LayerPlan]
    saved: dict[str, str]  # module copies to keep (modules_to_save), as collect_plans gives them
    tokens: list[TokenPlan]
    params: list[ParamPlan]
    receipt: Receipt | None = None
    notes: list[str] = field(default_factory=list)
    # gathered by prepare()
    probes: list[LayerProbe] = field(default_factory=list)
    oracles: dict[str, torch.Tensor | None] = field(default_factory=dict)
    param_oracles: dict[str, ParamOracle] = field(default_factory=dict)
    attention_plans: list[LayerPlan] = field(default_factory=list)
    attention_probes: list[AttentionProbe] = field(default_factory=list)
    attention_results: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    base_errors: dict[str, float] = field(default_factory=dict)
    # gathered by reference()
    model_ref: ModelReference | None = None
    batch: dict[str, torch.Tensor] | None = None
    base_out: torch.Tensor | None = None
    # gathered by apply() and finish()
    untied: list[str] = field(default_factory=list)
    stats: dict[str, TensorStats] = field(default_factory=dict)
    lost: dict[str, float] = field(default_factory=dict)
    dora_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    token_checks: list[LayerCheck] = field(default_factory=list)
    narrowed: list[torch.Tensor] = field(default_factory=list)
    base_format: str = ""

    @classmethod
    def plan(
        cls,
        peft_model: PeftModel,
        flags: ModuleFlags,
        names: list[str],
        verify: bool,
        tol: Tolerance,
        seed: int,
        qplan: _QuantPlan | None,
    ) -> MergeRun:
        """Read PEFT's layers for ``names`` from the model; refuse what cannot be merged yet."""
        plans, saved, tokens = collect_plans(peft_model, names)
        params = param_plans(cast(nn.Module, peft_model.base_model.model), names)
        dora_quantized = sorted(
            p.name for p in plans if p.quantized and any(u.magnitude is not None for _, u in p.updates)
        )
        if dora_quantized:
            raise UnsupportedAdapterError(
                f"DoRA on quantized layers is not supported yet: {dora_quantized}. Merge into the 16-bit base "
                "(loramerge.merge_checkpoint with qlora_base='original' or 'simulated')."
            )
        own = [p for p in plans if p.attention is None]
        run = cls(peft_model, flags, names, verify, tol, seed, qplan, own, saved, tokens, params)
        run.attention_plans = [p for p in plans if p.attention is not None]  # PEFT's attention layer merges them
        return run

    @property
    def inner(self) -> nn.Module:
        return cast(nn.Module, self.peft_model.base_model.model)

    def keep_receipt(self, fingerprint: str) -> None:
        """Record what restores the base bit for bit (one adapter, a non-quantized base, plain LoRA)."""
        if self.tokens:
            raise InvalidArgumentError(
                f"receipt=True cannot record trainable tokens yet ({[t.name for t in self.tokens]}); merge without a "
                "receipt"
            )
        if (
            len(self.names) != 1
            or any(p.quantized or p.via_peft for p in self.plans)
            or self.attention_plans
            or self.params
        ):
            raise InvalidArgumentError(
                "receipt=True needs exactly one adapter merged into a non-quantized base, without LoRA variants that "
                "PEFT's own layer merges and without target_parameters (merge adapters one at a time)"
            )
        self.receipt = Receipt(fingerprint)
        for module_name in self.saved:
            wrapper = cast(Any, self.inner.get_submodule(module_name))
            for pname, p in wrapper.original_module.named_parameters():
                self.receipt.originals[f"{module_name}.{pname}"] = p.detach().cpu().clone()

    def prepare(self) -> None:
        """Every check that can be made before a weight changes; the per-layer probes and references."""
        problems: list[str] = []
        for plan in self.plans:
            problems += self._prepare_layer(plan, problems)
        problems += [m for pp in self.params for m in param_problems(pp)]
        if self.verify and not problems:
            self.param_oracles = {pp.name: ParamOracle.of(pp, self.seed) for pp in self.params}
        problems += self._prepare_attention()
        _raise_problems(problems, "merging")
        if self.qplan is not None and self.qplan.mode == "dequantize":  # every layer it dequantizes, proven now
            planned = {id(p.layer) for p in self.plans}
            for qname, qlayer in quantized_layers(self.inner).items():
                if id(qlayer) not in planned:
                    checked_dequantize(qlayer, qname, seed=self.seed)

    def _prepare_attention(self) -> list[str]:
        """Each attention merged by PEFT's own layer now, on a widened copy; probed whole (PEFT's
        attention layer cannot run a linear layer's probes)."""
        problems: list[str] = []
        for plan in self.attention_plans:
            name = plan.name
            if plan.attention != name:  # its out_proj: merged with the attention, below
                continue
            module = self.inner.get_submodule(name)
            adapters = [a for a, _ in plan.updates]  # those of the adapters merged that adapt it
            packed, out = peft_merged_attention(module, adapters, name)
            self.attention_results.update({name: packed, f"{name}.base_layer.out_proj": out})
            times = out_proj_multiple(module, adapters, out)
            if abs(times - 1) > 0.25:
                self.notes.append(
                    f"{name}: PEFT {peft.__version__}'s attention layer adds its out_proj update {times:.2g} times, in "
                    "adapter mode and in its own merge (peft PR #3774); this merge reproduces adapter mode with this "
                    "PEFT"
                )
            if not (bool(torch.isfinite(packed).all()) and bool(torch.isfinite(out).all())):
                problems.append(f"{name}: PEFT's merge of this attention is not finite")
            elif self.verify:
                self.attention_probes.append(AttentionProbe.of(name, module, self.seed))
        return problems

    def _prepare_layer(self, plan: LayerPlan, earlier: list[str]) -> list[str]:
        ups = [u for _, u in plan.updates]
        weight = plan.weight
        problems: list[str] = []
        if plan.via_peft:  # merged by PEFT's own layer, now, on a widened copy: refused before any change
            module = self.inner.get_submodule(plan.name)
            names = [a for a, _ in plan.updates]
            self.peft_results[plan.name] = peft_merged_weight(module, weight, plan.name, names)
            if not all(bool(torch.isfinite(t).all()) for t in self.peft_results[plan.name] if t is not None):
                problems.append(f"{plan.name}: PEFT's merge of this layer is not finite")
        elif plan.quantized:
            assert self.qplan is not None
            exact = checked_dequantize(plan.layer, plan.name, seed=self.seed)
            weight = exact.to(compute_dtype(plan.layer))  # exact: the layer computes in that dtype
            stored = exact.to(self.qplan.store_dtype(plan.layer))
            problems += [f"{plan.name}: {m}" for m in check_updates(ups, stored)]
        else:
            problems += [f"{plan.name}: {m}" for m in check_updates(ups, weight)]
        if not self.verify or problems or earlier:
            return problems
        own = [] if plan.via_peft else ups  # loramerge's own math does not model a variant
        probe = LayerProbe(plan.name, plan.kind, weight, bias_of(plan.layer), own, self.seed, MAX_PROBE_OUTPUTS)
        self.probes.append(probe)
        if not plan.quantized:  # PEFT's own layer, as adapter mode runs it: the independent reference
            self.oracles[plan.name] = peft_layer_output(self.inner.get_submodule(plan.name), probe)
        if plan.via_peft and self.oracles[plan.name] is None:
            problems.append(f"{plan.name}: PEFT's layer cannot be run on probes to prove its merge")
        if plan.quantized and self.qplan is not None and self.qplan.mode == "requantize":
            self.base_errors[plan.name] = relative_errors(probe.outputs(weight, bias_of(plan.layer)), probe.reference)[
                0
            ]
        return problems

    def reference(self, check_outputs: CheckOutputs, probes: Probes | None) -> None:
        """Adapter mode's outputs on the probe batch: the reference of the whole-model check."""
        self.batch = probe_batch(self.inner, check_outputs, probes, self.seed, self.notes)
        if self.batch is None:
            return
        try:
            with attention_kept(self.inner):  # PEFT's attention layers move their weights while they run
                self.model_ref = reference_outputs(self.peft_model, self.batch)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise LoraMergeError(
                f"the probe inputs could not run the model in adapter mode ({type(e).__name__}: {e}); nothing "
                "was changed. Pass probes= that the model accepts, or check_outputs=False to rely on the "
                "per-layer checks."
            ) from e
        if self.model_ref.note:
            self.notes.append(self.model_ref.note)
        if self.qplan is not None and self.qplan.mode == "requantize":
            with self.peft_model.disable_adapter():
                self.base_out = run_model(self.peft_model, self.batch)
        elif self.qplan is not None:
            self.model_ref = dataclasses.replace(self.model_ref, dtype=self.qplan.target)

    def apply(self) -> None:
        """Change the weights: every adapted layer, expert parameter and trainable-token row."""
        self.untied = untie_shared(self.inner, self.plans)
        if self.untied:
            self.notes.append(f"untied {self.untied} (they shared a merged weight; adapter mode does not change them)")
        mapped = FileMappings()
        for i, plan in enumerate(self.plans):
            self.plans[i] = self._apply_layer(plan, mapped)
        for plan in self.attention_plans:
            new_weight = self.attention_results.pop(plan.name)
            with torch.no_grad():
                before = plan.weight.detach().float()
                if mapped.holds(plan.weight):
                    mapped.own_copy(plan.weight)
                plan.weight.copy_(new_weight)
            self.stats[plan.name] = TensorStats(delta_norm=float((new_weight.float() - before).norm()))
        for pp in self.params:
            if mapped.holds(pp.param):
                mapped.own_copy(pp.param)
            logger.debug("merged %s (|dW| %.3g)", pp.name, merge_param_(pp))
        for token_plan in self.tokens:  # PEFT's rows replace the base's, as its own merge writes them
            ids, rows = token_plan.rows()
            with torch.no_grad():  # the reference: the whole weight as PEFT's own layer computes it
                expected = token_plan.layer.get_merged_weights([token_plan.adapter]).detach().clone()
                token_plan.weight.index_copy_(0, ids, rows)
            exact = bool(torch.equal(token_plan.weight, expected))
            self.token_checks.append(_token_check(token_plan.name, token_plan.weight, exact))

    def _apply_layer(self, plan: LayerPlan, mapped: FileMappings) -> LayerPlan:
        ups = [u for _, u in plan.updates]
        if plan.quantized:
            assert self.qplan is not None
            new_layer, self.stats[plan.name], self.lost[plan.name] = _merge_quantized(plan, self.qplan, self.seed)
            self.flags.carry(plan.layer, new_layer)
            cast(Any, self.inner.get_submodule(plan.name)).base_layer = new_layer
            return dataclasses.replace(plan, layer=new_layer, quantized=self.qplan.mode == "requantize")
        if plan.via_peft:
            new_weight, peft_bias = self.peft_results.pop(plan.name)
            with torch.no_grad():
                before = plan.weight.detach().float()
                plan.weight.copy_(new_weight)
                if peft_bias is not None:
                    cast(torch.Tensor, plan.layer.bias).copy_(peft_bias)
            self.stats[plan.name] = TensorStats(delta_norm=float((new_weight.float() - before).norm()))
            return plan
        new_bias = _merged_bias(plan.layer, ups)
        originals = _receipt_originals(plan, new_bias) if self.receipt is not None else {}
        with torch.no_grad():
            if mapped.holds(plan.weight):  # copy-on-write pages of the loaded file: write into own memory
                mapped.own_copy(cast(torch.Tensor, plan.layer.weight))
            self.stats[plan.name] = merge_tensor_(plan.weight, ups)
            if new_bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_(new_bias.to(bias.dtype))
        if "dora_norms" in self.stats[plan.name].extras:
            self.dora_norms[plan.name] = self.stats[plan.name].extras["dora_norms"].detach().cpu()
        if self.receipt is not None:
            _record_receipt(self.receipt, plan, originals, self.dora_norms.get(plan.name))
        return plan

    def finish(self) -> nn.Module:
        """Take the PEFT wrappers off; a dequantized base becomes a plain model in the target dtype."""
        plain = unwrap(self.peft_model, self.saved)
        qplan = self.qplan
        if qplan is not None and qplan.mode == "dequantize":
            for name, layer in quantized_layers(plain).items():  # the layers no adapter touched
                exact = checked_dequantize(layer, name, seed=self.seed)
                new_layer = dequantized_linear(layer, exact.to(qplan.target))
                self.flags.carry(layer, new_layer)
                _replace_module(plain, name, new_layer)
                if loses_precision(exact, qplan.target):
                    self.narrowed.append(new_layer.weight)
            for p in plain.parameters():
                if p.is_floating_point() and p.dtype != qplan.target:
                    if loses_precision(p.data, qplan.target):
                        self.narrowed.append(p)
                    p.data = p.data.to(qplan.target)
            forget_quantization(plain, qplan.target)
            target = str(qplan.target).replace("torch.", "")
            self.base_format = f"{qplan.describe} ({qplan.layers} layers) -> dequantized to {target}"
        elif qplan is not None:
            self.base_format = f"{qplan.describe} ({qplan.layers} layers) -> re-quantized"
            self.notes.append(
                "re-quantized: rounding to the 4/8-bit grid again cannot meet the tolerance rule; each layer and the "
                "model pass when closer to adapter mode than the base without the adapter (that error is the "
                "'limit'); 'residual' is the fraction of ΔW that re-quantization lost, ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖"
            )
        if qplan is not None:
            self.notes.append(f"quantized base: {self.base_format}")
        logger.info("merged %s into %d weights", self.names, len(self.plans))
        return plain

    def judge(self, plain: nn.Module, layers: list[LayerCheck]) -> OutputCheck | None:
        """Each layer against its probes (appended to ``layers`` as judged), the model against adapter mode."""
        for plan, probe in zip(self.plans, self.probes, strict=True):
            if plan.quantized:  # re-quantized: judged against the base without the adapter
                layers.append(_requantized_check(plan, probe, self.lost[plan.name], self.base_errors[plan.name]))
            else:
                oracle = self.oracles.get(plan.name)
                layers.append(_merged_check(plan, probe, oracle, self.tol, self.stats[plan.name]))
        layers += [check_param(pp, self.param_oracles[pp.name], self.tol) for pp in self.params]
        layers += [probe.check(plain.get_submodule(probe.name), self.tol) for probe in self.attention_probes]
        if self.model_ref is None or self.batch is None:
            return None
        batch = self.batch
        routes: list[torch.Tensor] = []
        with keep_layout(plain):  # re-quantized layers too
            merged_out = run_model(plain, batch, routes)
        if self.base_out is not None:
            return _requantized_output_check(merged_out, self.model_ref, self.base_out)
        weights: Sequence[torch.Tensor] = [p.weight for p in [*self.plans, *self.attention_plans]] + [
            pp.param for pp in self.params
        ]
        weights = [*weights, *self.narrowed]
        return output_check(
            merged_out,
            self.model_ref,
            self.tol,
            batch,
            lambda: storage_baseline(plain, batch, weights, self.seed),
            routes,
        )
