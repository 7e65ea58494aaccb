"""What the checkpoint engine does to each tensor it streams: the plan's action for that name.

:class:`MergeStep` and :class:`UnmergeStep` are called by :mod:`loramerge.engine.checkpoint_stream`
with each stored tensor the plan changes, in its stored dtype, and return the tensor to write. An
adapted weight is merged in fp32 and rounded once (:mod:`loramerge.numerics.delta`, the code the
in-memory merge runs, so both paths agree bit for bit); a trained bias gets its scaled update; a
tensor the adapter replaces (``modules_to_save``, a saved base layer) is replaced; trainable-token
rows are copied in. While a step runs it leaves behind what verification needs: a probe made from
the base tensor before it changed, and the receipt entry that undoes the rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn

from loramerge.engine.checkpoint_stream import _Expectations, _fixed_check, _probe_check
from loramerge.errors import AdapterMismatchError, NonFiniteMergeError, UnmergeImpossibleError
from loramerge.formats.adapter import ATTENTION, Adapter, AdapterModule
from loramerge.formats.receipts import Receipt
from loramerge.formats.receipts import apply as apply_receipt
from loramerge.formats.receipts import encode as encode_receipt
from loramerge.formats.shard_writer import release_pages
from loramerge.formats.shards import TensorInfo
from loramerge.numerics.delta import LoraUpdate, merge_tensor_, unmerge_tensor_
from loramerge.numerics.tolerance import Tolerance
from loramerge.numerics.update_checks import check_updates
from loramerge.plan.checkpoint_plan import AdapterMapping, _updates_for
from loramerge.plan.injection import (
    peft_merged_attention_part,
    peft_merged_bias,
    peft_merged_weight,
    stored_owner,
)
from loramerge.plan.quant_spec import QuantSpec, quantizable, simulate
from loramerge.proof.layer_checks import MAX_PROBE_OUTPUTS, LayerProbe
from loramerge.proof.reports import LayerCheck

__all__ = ["MergeStep", "UnmergeStep", "find_original", "refuse_inexact_unmerge", "variants_not_undone"]


def _factor_tensors(mod: AdapterModule) -> list[torch.Tensor]:
    """A module's factors, whose file pages need not stay resident once it is merged or unmerged (an
    adapter grows with the model; the judgement reads them again if it needs them)."""
    return [t for t in (mod.update.lora_A, mod.update.lora_B, mod.update.magnitude) if t is not None]


def find_original(originals: Mapping[str, torch.Tensor], name: str) -> str | None:
    """The key in ``originals`` that names the stored tensor ``name`` (with or without a head prefix)."""
    return next((k for k in originals if name == k or name.endswith("." + k) or k.endswith("." + name)), None)


_NOT_UNDONE = {
    "KaSA": "KaSA drops part of the base weight's spectrum",
    "BD-LoRA": "loramerge does not subtract BD-LoRA's block-diagonal update",
    "DoRA on an embedding": "DoRA on embeddings needs norms loramerge does not record",
    "DoRA on a convolution": "DoRA on convolutions needs norms loramerge does not record",
    ATTENTION: "PEFT's attention layer adds its out_proj update its own way",
}


def variants_not_undone(adapter: Adapter, modules: list[str]) -> str:
    """Why the weights of variant modules cannot be unmerged from the adapter, and what to pass instead."""
    kinds = sorted({adapter.variant_modules[m] for m in modules})
    why = "; ".join(_NOT_UNDONE.get(k, f"{k} is merged by PEFT's layer only") for k in kinds)
    weights = sorted(w for m in modules for w in adapter.weight_names(m))
    weights += sorted(f"{m}.bias" for m in modules if f"base_model.model.{m}.lora_B.bias" in adapter.tensors)
    return (
        f"modules {modules} ({', '.join(kinds)}) were merged by PEFT's own layer; their base weights cannot be "
        f"recovered from the merged weights and the adapter ({why}). Pass originals= with {weights} (Python API, "
        "read from the base checkpoint), or merge again with receipt=True (CLI: --receipt), which keeps them."
    )


def refuse_inexact_unmerge(
    adapter: Adapter, norms: list[str], originals: list[str], variants: list[str], nothing: str
) -> None:
    """Raise :class:`~loramerge.UnmergeImpossibleError` listing what an exact unmerge lacks (both
    engines refuse with it, before anything changes): the DoRA modules without their norms, the
    replaced tensors without their original values, the variant modules without their base weights.
    ``nothing``: what did not happen ("changed", "written")."""
    lines = []
    if norms:
        lines.append(
            f"DoRA modules {norms}: the merged weight is m * (W + ΔW) / ‖W + ΔW‖ and the norms ‖W + ΔW‖ cannot be "
            "recovered from the merged weight and the adapter. Pass dora_norms= (the merge result's dora_norms), or "
            "merge a checkpoint with receipt=True (--receipt), which keeps them."
        )
    if variants:
        lines.append(variants_not_undone(adapter, variants))
    if originals:
        lines.append(
            f"tensors {originals} were replaced by the adapter (modules_to_save, trained biases, trainable-token "
            "rows), so their original values are neither in the merged weights nor in the adapter. Pass originals= "
            "(read from the base checkpoint), or merge a checkpoint with receipt=True (--receipt), which keeps them."
        )
    if lines:
        raise UnmergeImpossibleError(f"cannot unmerge exactly; nothing was {nothing}:\n  - " + "\n  - ".join(lines))


@dataclass
class MergeStep:
    """Merge one streamed tensor as the plan says. Call it with ``(name, stored tensor)``.

    Attributes:
        mapping: The plan: which stored tensors change and how.
        target: Convert floating tensors to this dtype on the way out (``None``: keep each one's).
        verify: Leave a probe-based check in ``expect`` for every adapted weight.
        spec: With ``qlora_base``: the bitsandbytes format the adapter was trained on.
        qlora_base: ``"simulated"`` merges into the quantized-and-dequantized weights.
        receipt: Filled with what restores each changed tensor bit for bit (``None``: no receipt).
        norms: DoRA weight norms by module name, filled while merging.
        gaps: Per QLoRA layer, how far the simulated and the 16-bit base are apart, relative to ΔW.
        peft_layers: PEFT's own LoRA layer (from its injection into the weightless model) for each
            stored weight of a module only PEFT merges (``mapping.variants``).
    """

    mapping: AdapterMapping
    target: torch.dtype | None
    verify: bool
    tol: Tolerance
    spec: QuantSpec | None = None
    qlora_base: Literal["original", "simulated"] | None = None
    receipt: Receipt | None = None
    expect: _Expectations = field(default_factory=_Expectations)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    gaps: dict[str, float] = field(default_factory=dict)
    peft_layers: Mapping[str, nn.Module] = field(default_factory=dict)

    def passthrough(self, tensors: Mapping[str, TensorInfo]) -> set[str]:
        """The stored tensors this step never needs to see: the writer copies their bytes."""
        return {
            name
            for name, info in tensors.items()
            if name not in self.mapping.changed
            and not (self.target is not None and info.dtype.is_floating_point)
            and not (self.qlora_base == "simulated" and info.dtype.is_floating_point and quantizable(name, info.shape))
        }

    def _out(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.target is None else tensor.to(self.target)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        quantized = self.spec is not None and quantizable(name, tuple(tensor.shape)) and tensor.is_floating_point()
        if name in self.mapping.modules:
            return self._adapted(name, tensor, quantized)
        if name in self.mapping.variants:
            return self._through_peft(name, tensor)
        if name in self.mapping.biases:
            return self._bias(name, tensor)
        if name in self.mapping.replaced:
            if self.receipt is not None:
                self.receipt.originals[name] = self._out(tensor).clone()
            return self.mapping.replaced[name].to(tensor.dtype if self.target is None else self.target)
        if name in self.mapping.token_rows:  # trainable tokens: PEFT's rows replace the base's, in its dtype
            ids, rows = self.mapping.token_rows[name]
            work = self._out(tensor)
            if self.receipt is not None:
                self.receipt.originals[name] = work.clone()
            return work.index_copy(0, ids, rows.to(work.dtype))
        if quantized and self.qlora_base == "simulated":
            assert self.spec is not None
            return simulate(tensor, self.spec).to(tensor.dtype if self.target is None else self.target)
        return tensor  # untouched but converted to ``target`` on the way out

    def _adapted(self, name: str, tensor: torch.Tensor, quantized: bool) -> torch.Tensor:
        mod, kind = self.mapping.modules[name]
        up = _updates_for(mod, kind)
        if name in self.mapping.replaced:  # a saved embedding base: adapter mode applies the delta to it
            tensor = self.mapping.replaced[name].to(tensor.dtype, copy=True)  # merged into in place below
        work = self._out(tensor)
        source, gap = self._qlora_source(tensor, quantized and kind == "linear")
        if self.verify:  # the probe's reference comes from the base tensor, before it is changed
            base_w = work if source is None else source.to(tensor.dtype)  # exact: bitsandbytes' values
            probe = LayerProbe(mod.name, kind, base_w, None, [up], 0, MAX_PROBE_OUTPUTS)
        original = work.clone() if self.receipt is not None else None
        # The output is atomic, so non-finite results need not be found before computing them: the
        # rounding residual is NaN or infinite exactly when a result is non-finite or overflowed.
        # the rounding residual is reported only by the verification
        stats = merge_tensor_(work, [up], source=source, residual=self.verify)
        if gap is not None:
            self.gaps[mod.name] = gap / stats.delta_norm if stats.delta_norm > 0 else math.inf
        if not math.isfinite(stats.residual_norm) or not math.isfinite(stats.delta_norm):
            problems = check_updates([up], self._out(tensor)) or ["non-finite result"]
            raise NonFiniteMergeError(
                f"merging {mod.name} would produce non-finite weights or overflow ({'; '.join(problems)}); "
                "nothing was written. Check the adapter for NaN/Inf, or merge into a wider dtype."
            )
        if self.verify:
            self.expect.checks[name] = _probe_check(probe, self.tol, stats.relative_residual, math.nan, "")
        if "dora_norms" in stats.extras:
            self.norms[mod.name] = stats.extras["dora_norms"].cpu()
        if self.receipt is not None and original is not None:
            self._receipt_entry(name, mod.name, original, work, up)
        release_pages(_factor_tensors(mod))
        return work

    def _through_peft(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A module only PEFT merges: PEFT's own layer, holding this base weight widened, merges it;
        rounded once. No own check is left: PEFT's layer in adapter mode judges every such layer."""
        module = self.mapping.variants[name]
        layer = self.peft_layers[name]
        is_bias = name in self.mapping.variant_biases
        part = self.mapping.attention_parts.get(name, "bias" if is_bias else "weight")
        owner, attr = stored_owner(layer, part)
        held = cast(torch.Tensor, getattr(owner, attr))
        if tuple(tensor.shape) != tuple(held.shape):
            raise AdapterMismatchError(
                f"{name} has shape {tuple(tensor.shape)}, but {module} in the model config.json builds holds "
                f"{tuple(held.shape)}; nothing was written. Use the base checkpoint the adapter was trained on."
            )
        work = self._out(tensor)
        if name in self.mapping.attention_parts:  # an nn.MultiheadAttention's packed projection or out_proj
            merged = peft_merged_attention_part(layer, work, part, module)
        elif is_bias:
            merged = peft_merged_bias(layer, work, module)
        else:  # the layer's bias is streamed apart (and a weight's merge does not depend on it): zeros here
            own = getattr(owner, "bias", None)
            zeros = None if own is None else torch.zeros(own.shape, dtype=work.dtype)
            merged = peft_merged_weight(layer, work, module, bias=zeros)[0]
        if not bool(torch.isfinite(merged).all()):
            raise NonFiniteMergeError(
                f"merging {module} would produce non-finite weights or overflow (PEFT's own merge of this layer); "
                "nothing was written. Check the adapter for NaN/Inf, or merge into a wider dtype."
            )
        if self.receipt is not None:  # not undone from the adapter: the receipt keeps the base tensor
            self.receipt.originals[name] = work.clone()
        return merged

    def _qlora_source(self, tensor: torch.Tensor, quantized_linear: bool) -> tuple[torch.Tensor | None, float | None]:
        """The simulated QLoRA weight to merge into (``None``: the stored one) and its distance from the stored one."""
        if self.spec is None or not quantized_linear:
            return None, None
        simulated = simulate(tensor, self.spec)
        gap = float(torch.linalg.vector_norm(simulated - tensor.float()))
        return (simulated if self.qlora_base == "simulated" else None), gap

    def _receipt_entry(
        self, name: str, module: str, original: torch.Tensor, merged: torch.Tensor, up: LoraUpdate
    ) -> None:
        assert self.receipt is not None
        recovered = merged.clone()
        unmerge_tensor_(recovered, [up], self.norms.get(module), measure=False)
        self.receipt.tensors[name] = encode_receipt(original, recovered)
        if module in self.norms:
            self.receipt.dora_norms[module] = self.norms[module]

    def _bias(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        mod = self.mapping.biases[name]
        assert mod.update.bias is not None
        work = self._out(tensor)
        merged_bias = (work.float() + mod.scale * mod.update.bias.float()).to(work.dtype)
        if self.receipt is not None:
            recovered = (merged_bias.float() - mod.scale * mod.update.bias.float()).to(work.dtype)
            self.receipt.tensors[name] = encode_receipt(work, recovered)
        return merged_bias


@dataclass
class UnmergeStep:
    """Remove the adapter from one streamed tensor of a merged checkpoint. Call it with ``(name, stored tensor)``.

    Attributes:
        mapping: The plan: which stored tensors the merge changed and how.
        norms: DoRA weight norms by module name (from the merge report or the receipt).
        originals: The values of tensors the adapter replaced, by name.
        receipt: Applied after the unmerge: every changed tensor comes back bit for bit.
        verify: Check each restored weight while streaming (re-merge gap, probe outputs).
    """

    mapping: AdapterMapping
    norms: Mapping[str, torch.Tensor]
    originals: Mapping[str, torch.Tensor]
    receipt: Receipt | None
    verify: bool
    tol: Tolerance
    seed: int = 0
    expect: _Expectations = field(default_factory=_Expectations)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in self.mapping.modules:
            return self._adapted(name, tensor)
        if name in self.mapping.biases:
            mod = self.mapping.biases[name]
            assert mod.update.bias is not None
            bias = (tensor.float() - mod.scale * mod.update.bias.float()).to(tensor.dtype)
            return apply_receipt(bias, self.receipt.tensors[name], name) if self.receipt is not None else bias
        key = find_original(self.originals, name)
        assert key is not None, name  # the operation checked that every replaced tensor has its original
        if name in self.mapping.token_rows:  # the original rows
            ids, _ = self.mapping.token_rows[name]
            return tensor.index_copy(0, ids, self.originals[key].to(tensor.dtype).index_select(0, ids))
        assert name in self.mapping.replaced or name in self.mapping.variants  # every other one is copied through
        return self.originals[key].to(tensor.dtype)

    def _adapted(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        mod, kind = self.mapping.modules[name]
        up = _updates_for(mod, kind)
        work = tensor.clone()
        stats = unmerge_tensor_(work, [up], self.norms.get(mod.name), measure=self.verify)
        if self.receipt is not None:
            work = apply_receipt(work, self.receipt.tensors[name], name)
        if self.verify:
            probe = LayerProbe(mod.name, kind, work, None, [up], self.seed, MAX_PROBE_OUTPUTS)
            reason = ""
            if stats.remerge_gap > 1.0 + 1e-6:
                reason = f"re-merging misses the merged tensor by {stats.remerge_gap:.3g}x what rounding allows"
            target = probe.outputs(tensor, None)

            def judged(full: bool) -> LayerCheck:
                storage = math.hypot(probe.storage(tensor, full), probe.storage(work, full))
                return probe.check(target, self.tol, stats.relative_residual, math.nan, reason, storage)

            # the allowance for the rounding a faithful merge may add only widens the limit: it is
            # computed only when the layer fails without it, so the verdict is the full allowance's
            layer = judged(False)
            self.expect.checks[name] = _fixed_check(layer if layer.passed else judged(True))
        release_pages(_factor_tensors(mod))
        return work
