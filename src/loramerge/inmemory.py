"""In-memory merge and unmerge on ``nn.Module``\\ s, each verified by default.

``merge`` folds the LoRA updates of a ``PeftModel`` into its base weights in place and returns the
plain model; ``unmerge`` removes a *saved* adapter's updates from a merged model, in any process.
Both only change weights after every check that can be made beforehand has passed (shapes,
finiteness, overflow, recoverability), and both verify the result against adapter mode.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import PeftModel
from torch import nn

from loramerge.adapter import Adapter
from loramerge.delta import LoraUpdate, TensorStats, check_updates, merge_tensor_, unmerge_tensor_
from loramerge.errors import (
    AdapterMismatchError,
    InvalidArgumentError,
    LoraMergeError,
    NonFiniteMergeError,
    UnmergeImpossibleError,
    UnsupportedAdapterError,
    VerificationError,
)
from loramerge.layer_checks import (
    MAX_PROBE_OUTPUTS,
    LayerProbe,
    bias_of,
    exact_layer_output,
    loses_precision,
    oracle_check,
    oracle_only_check,
    output_subset,
    peft_layer_output,
    probe_inputs,
    restrict_vector,
    restrict_weight,
    storage_rms,
)
from loramerge.lineage_records import (
    adapter_fingerprint,
    check_last,
    drop_round,
    fingerprint_of,
    lineage,
    new_round,
    set_model_lineage,
)
from loramerge.loading import resolve_dtype
from loramerge.model_runs import CheckOutputs, Probes, probe_batch, run_model
from loramerge.output_checks import ModelReference, output_check, reference_outputs, storage_baseline
from loramerge.param_targets import ParamOracle, ParamPlan, check_param, merge_param_, param_plans, param_problems
from loramerge.peft_glue import (
    LayerPlan,
    adapter_mode,
    attach,
    check_compatible,
    collect_plans,
    peft_merged,
    untie_shared,
    unwrap,
)
from loramerge.preserve import ModuleFlags, preserved
from loramerge.quantized import (
    check_supported,
    checked_dequantize,
    compute_dtype,
    dequantize,
    dequantized_linear,
    forget_quantization,
    keep_layout,
    quant_format,
    quantized_layers,
    requantize,
)
from loramerge.receipts import Receipt, ReceiptError, as_receipt
from loramerge.receipts import apply as apply_receipt
from loramerge.receipts import encode as encode_receipt
from loramerge.reports import LayerCheck, MergeResult, OutputCheck, UnmergeResult, VerificationReport
from loramerge.tolerance import Tolerance, relative_errors, ulp

__all__ = ["merge", "unmerge"]

logger = logging.getLogger(__name__)


def _merged_bias(layer: nn.Module, updates: Sequence[LoraUpdate]) -> torch.Tensor | None:
    """``round(b + Σ scale * lora_B.bias)`` computed in fp32, or ``None`` when no update has a bias."""
    with_bias = [up for up in updates if up.bias is not None]
    if not with_bias:
        return None
    bias = cast(torch.Tensor, layer.bias)
    total = bias.detach().to(torch.float32 if bias.dtype != torch.float64 else torch.float64)
    for up in with_bias:
        assert up.bias is not None
        total = total + up.scale * up.bias.detach().to(total.dtype).to(total.device)
    return total


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        problems.sort()
        raise NonFiniteMergeError(
            f"{what} would produce non-finite weights or overflow; nothing was changed. {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
            + "\nCheck the adapter for NaN/Inf (a diverged training run), or merge into a wider dtype "
            "(e.g. dtype=torch.bfloat16 or float32 instead of float16)."
        )


QuantizedMode = Literal["dequantize", "requantize"]


@dataclasses.dataclass
class _QuantPlan:
    """How a merge treats a bitsandbytes base: the target dtype, or re-quantization."""

    mode: QuantizedMode
    target: torch.dtype  # dtype of merged weights before (re-)quantization
    describe: str
    layers: int

    def store_dtype(self, layer: nn.Module) -> torch.dtype:
        """The dtype a merged weight is rounded to: the target, or the layer's own when re-quantizing."""
        if self.mode == "dequantize":
            return self.target
        state = getattr(cast(Any, layer.weight), "quant_state", None)
        if state is None:
            return torch.float16  # LLM.int8 quantizes from fp16
        return cast(torch.dtype, getattr(state, "original_dtype", state.dtype))


def _quant_plan(inner: nn.Module, dtype: str | torch.dtype | None, mode: str) -> _QuantPlan | None:
    check_supported(inner)
    layers = quantized_layers(inner)
    wanted = resolve_dtype(dtype)
    if mode not in ("dequantize", "requantize"):
        raise InvalidArgumentError(f"quantized={mode!r}: use 'dequantize' (default) or 'requantize'")
    if not layers:
        if wanted is not None:
            raise InvalidArgumentError(
                "dtype= sets the dtype of a dequantized (bitsandbytes) base; this model is not quantized. "
                "Convert it with model.to(dtype) before merging instead."
            )
        return None
    if mode == "requantize" and wanted is not None:
        raise InvalidArgumentError("dtype= does not apply with quantized='requantize' (the base's own format is kept)")
    formats = sorted({quant_format(m).describe() for m in layers.values()})
    target = wanted or torch.bfloat16
    return _QuantPlan(cast(QuantizedMode, mode), target, "; ".join(formats), len(layers))


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _merge_quantized(plan: LayerPlan, qplan: _QuantPlan, seed: int) -> tuple[nn.Module, Any, float]:
    """Merge into a bitsandbytes layer: dequantize (exactly, checked), add ΔW in fp32, round once to
    the store dtype; re-quantize when asked. Returns the new layer, the merge stats and, when
    re-quantizing, ‖dequant(Q(W')) − (W + ΔW)‖ / ‖ΔW‖ (NaN otherwise)."""
    ups = [u for _, u in plan.updates]
    # dequantized again rather than kept from the checks before the merge: one fp32 layer at a time
    source = checked_dequantize(plan.layer, plan.name, seed=seed)
    merged = torch.empty(source.shape, dtype=qplan.store_dtype(plan.layer), device=source.device)
    new_bias = _merged_bias(plan.layer, ups)
    with torch.no_grad():
        stats = merge_tensor_(merged, ups, source=source)
    new: nn.Module = dequantized_linear(plan.layer, merged)
    if new_bias is not None:
        cast(torch.Tensor, new.bias).data = new_bias.to(merged.dtype)
    lost = math.nan
    if qplan.mode == "requantize":
        new = requantize(plan.layer, merged, cast(torch.Tensor | None, getattr(new, "bias", None)))
        exact = source.double() + sum((u.delta(source.shape, torch.float64) for u in ups), torch.zeros(()))
        lost = float(torch.linalg.vector_norm(dequantize(new).double() - exact)) / max(stats.delta_norm, 1e-300)
    return new, stats, lost


def _receipt_originals(plan: LayerPlan, new_bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Copies of the tensors a merge is about to change (weight, and bias when a LoRA bias is merged)."""
    out = {"weight": plan.weight.detach().clone()}
    if new_bias is not None:
        out["bias"] = cast(torch.Tensor, plan.layer.bias).detach().clone()
    return out


def _record_receipt(
    receipt: Receipt, plan: LayerPlan, originals: Mapping[str, torch.Tensor], norms: torch.Tensor | None
) -> None:
    """Compute the plain unmerge of the merged tensors, as :func:`unmerge` will, and record the
    correction back to ``originals``."""
    ups = [u for _, u in plan.updates]
    with torch.no_grad():
        recovered = plan.weight.detach().clone()
        unmerge_tensor_(recovered, ups, norms)
        receipt.tensors[f"{plan.name}.weight"] = encode_receipt(originals["weight"], recovered)
        if "bias" in originals:
            merged_b = cast(torch.Tensor, plan.layer.bias).detach()
            back = merged_b.float() - sum(u.scale * u.bias.detach().float() for u in ups if u.bias is not None)
            receipt.tensors[f"{plan.name}.bias"] = encode_receipt(originals["bias"], back.to(merged_b.dtype))
    if norms is not None:
        receipt.dora_norms[plan.name] = norms


def _requantized_output_check(merged: torch.Tensor, ref: ModelReference, base_out: torch.Tensor) -> OutputCheck:
    """Whole-model check of a re-quantized merge: no tolerance rule can hold (re-quantization
    rounds to a 4/8-bit grid), so the merged model passes when it is closer to adapter mode than
    the base without the adapter is, i.e. re-quantizing did not erase the adapter."""
    m_rms, m_max = relative_errors(merged, ref.reference)
    a_rms, a_max = relative_errors(ref.adapter, ref.reference)
    b_rms, _ = relative_errors(base_out, ref.reference)
    return OutputCheck(
        dtype=str(ref.dtype).replace("torch.", ""),
        reference_dtype=str(ref.reference_dtype).replace("torch.", ""),
        probe_shape=tuple(int(s) for s in ref.reference.shape[:2]),
        merged_error=m_rms,
        adapter_error=a_rms,
        storage_error=math.nan,
        limit=b_rms,
        merged_max_error=m_max,
        adapter_max_error=a_max,
        storage_max_error=math.nan,
        max_abs_diff=float((merged.double() - ref.adapter.double()).abs().max()),
        output_scale=float(ref.reference.abs().max()),
        passed=math.isfinite(m_rms) and m_rms < b_rms,
    )


class FileMappings:
    """The address ranges of this process that map files (Linux ``/proc/self/maps``; none elsewhere).

    transformers loads safetensors weights as private mappings of the file: the first write to each
    page copies it (a page fault per 4 KiB). Merging into such a weight in place took 2.55 s for
    Qwen2-0.5B's 168 adapted weights against 0.66 s into the same weights in the process's own
    memory, so a mapped weight is first copied (its parameter keeps its identity, its ``.data`` is
    the copy), as PEFT's merge does by assigning new tensors."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                        start, end = (int(v, 16) for v in parts[0].split("-"))
                        self.ranges.append((start, end))
        except OSError:
            pass

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s data lies in a mapped file."""
        if tensor.device.type != "cpu" or not self.ranges:
            return False
        at = tensor.data_ptr()
        return any(start <= at < end for start, end in self.ranges)

    def own_copy(self, param: torch.Tensor) -> None:
        """Give ``param`` (a parameter whose data lies in a mapped file) a copy in the process's own
        memory, and let the kernel drop the file pages it leaves (``MADV_DONTNEED`` on the whole
        pages of its old range: nothing was written there, so a later read would find the file's
        bytes again), so that resident memory does not hold both."""
        old = param.data
        start, size = old.data_ptr(), old.numel() * old.element_size()
        param.data = old.detach().clone()
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        first, last = -(-start // page) * page, (start + size) // page * page
        if last > first:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
            except (OSError, AttributeError):  # not Linux: the pages stay until the mapping goes
                pass


def _layer_verdict(
    via_peft: bool,
    probe: LayerProbe,
    out: torch.Tensor,
    oracle: torch.Tensor | None,
    tol: Tolerance,
    stats: TensorStats,
    storage: float,
) -> LayerCheck:
    """One merged layer's check: against PEFT's own layer alone for a layer PEFT merged, else
    loramerge's reference and then PEFT's own layer, under the limit ``storage`` gives."""
    if via_peft and oracle is not None:
        return oracle_only_check(probe, out, oracle, tol, storage)
    own = probe.check(out, tol, stats.relative_residual, stats.max_ulp, "", storage)
    return oracle_check(own, out, oracle)


def _token_check(name: str, weight: torch.Tensor, exact: bool) -> LayerCheck:
    """The check of an embedding with trainable tokens: the whole weight must be what PEFT's own
    trainable-tokens layer computes (its rows where the tokens are, the base's elsewhere)."""
    dtype = str(weight.dtype).replace("torch.", "")
    reason = "" if exact else "the embedding differs from what PEFT's trainable-tokens layer computes"
    err = 0.0 if exact else math.inf
    return LayerCheck(f"{name} (trainable tokens)", "embedding", dtype, 0.0, err, err, 0.0, 0.0, 0.0, exact, reason)


def _verification_crashed(
    error: Exception,
    plain: nn.Module,
    names: Sequence[str],
    tol: Tolerance,
    layers: Sequence[LayerCheck],
    notes: Sequence[str],
    dora_norms: dict[str, torch.Tensor],
    untied: Sequence[str],
    base_format: str,
) -> VerificationError:
    """The error for a verification that could not run after the merge changed the weights."""
    why = f"verification could not run after the merge: {type(error).__name__}: {error}"
    report = VerificationReport("merge", False, tol, tuple(layers), None, notes=(*notes, why))
    result = MergeResult(plain, report, tuple(names), dora_norms, tuple(untied), base_format=base_format)
    return VerificationError(
        f"{why}\nThe model HAS been merged in place (PEFT wrappers removed); error.result holds it, unverified. "
        "Pass probes= that the model accepts, or check_outputs=False to rely on the per-layer checks, and verify "
        "it with loramerge.verify(base, adapter, merged).",
        report,
        result,
    )


def merge(
    model: nn.Module,
    adapters: Adapter | Sequence[Adapter] | None = None,
    *,
    adapter_names: Sequence[str] | None = None,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    probes: Probes | None = None,
    check_outputs: CheckOutputs = "auto",
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    quantized: QuantizedMode = "dequantize",
    receipt: bool = False,
) -> MergeResult:
    """Merge LoRA adapters into the base weights, in place, and verify the result.

    Each weight becomes ``round(W + ΔW₁ + ΔW₂ + ...)``: the updates are computed and summed in
    fp32 and rounded once to the weight's dtype (DoRA: ``round(m ⊙ (W + ΔW) / ‖W + ΔW‖)``). Large
    weights are processed in row chunks, so no second copy of the model is made. Non-finite results
    and overflow of the dtype are detected for every layer before any weight is changed.

    A bitsandbytes 4-bit (nf4/fp4, with or without double quantization) or 8-bit base (QLoRA) is
    dequantized exactly (each layer's dequantized weight is checked against the layer's own
    forward) and the result is a plain ``dtype`` model (default bfloat16) whose outputs match the
    QLoRA model's adapter mode under the tolerance rule. ``quantized="requantize"`` instead puts
    each merged weight back into its layer's bitsandbytes format and reports what that cost; see
    :doc:`/qlora`.

    Args:
        model: A ``PeftModel`` (from :func:`~loramerge.attach`, PEFT's ``get_peft_model`` or
            ``PeftModel.from_pretrained``), or a plain model together with ``adapters``.
        adapters: Adapters to attach first (in order) when ``model`` is a plain model.
        adapter_names: Which attached adapters to merge, in order; default: the active ones.
        verify: Verify the merge (default). Costs a few forward passes; see ``check_outputs``.
        tolerance: Settings of the tolerance rule; defaults when omitted.
        probes: Inputs for the whole-model check (``model(**probes)``); seeded random otherwise.
        check_outputs: ``"auto"`` (default) runs the whole-model check when the wide-dtype copy of
            the largest module fits in a quarter of RAM (the reference widens one module at a time);
            per-layer checks always run when ``verify``.
        seed: Seed of the random probes.
        dtype: Quantized bases only: the dtype of the dequantized merged model (default bfloat16).
        quantized: Quantized bases only: ``"dequantize"`` (default) or ``"requantize"``.
        receipt: Also return (``result.receipt``) what :func:`~loramerge.unmerge` needs to restore
            the base bit for bit (one adapter at a time; costs one extra unmerge per tensor).

    The merge is recorded in the model's lineage (``model.config.loramerge_lineage``, written to
    ``config.json`` by ``save_pretrained``; read it with :func:`~loramerge.lineage`).

    Returns:
        The plain merged model (the same object, PEFT wrappers removed) and the report.

    Raises:
        NonFiniteMergeError: Some merged weight would be non-finite or overflow (nothing changed).
        AdapterMismatchError: ``adapters`` do not fit ``model``.
        UnsupportedAdapterError: An adapter uses a feature that cannot be merged exactly.
        UnsupportedQuantizationError: The base is quantized with a method other than bitsandbytes.
        VerificationError: The merged model is out of tolerance. The model has been changed;
            ``error.result`` holds it with the report.

    Example:
        >>> result = merge(model, load_adapter(adapter_dir))  # doctest: +SKIP
        >>> result.report.passed  # doctest: +SKIP
        True
    """
    was_plain = not isinstance(model, PeftModel)
    inner = cast(nn.Module, model.base_model.model) if isinstance(model, PeftModel) else model
    with preserved(inner) as flags:
        peft_model, attached = _attach_all(model, adapters)
        sources = {n: str(a.path) for n, a in attached.items() if a.path is not None}
        try:
            with keep_layout(peft_model):
                return _merge(
                    peft_model,
                    flags,
                    adapter_names,
                    verify,
                    tolerance or Tolerance(),
                    probes,
                    check_outputs,
                    seed,
                    dtype,
                    quantized,
                    receipt,
                    sources,
                )
        except Exception as e:
            if attached and was_plain and not isinstance(e, VerificationError):
                unwrap(peft_model)  # refused before any change: take off the adapters attached here, too
            raise


def _updates_by_name(
    plans: Sequence[LayerPlan], params: Sequence[ParamPlan], adapter: str | None = None
) -> dict[str, list[LoraUpdate]]:
    """Every adapted weight's and parameter's updates (of one ``adapter``, or all), by name."""
    found = {p.name: [u for a, u in p.updates if adapter in (None, a)] for p in plans}
    found.update({pp.name: [u for a, u in pp.updates() if adapter in (None, a)] for pp in params})
    return {name: ups for name, ups in found.items() if ups}


def _merge_params(params: Sequence[ParamPlan], mapped: FileMappings) -> dict[str, float]:
    """Merge every targeted parameter (``target_parameters``) in place; ``‖ΔW‖`` of each."""
    norms = {}
    for pp in params:
        if mapped.holds(pp.param):
            mapped.own_copy(pp.param)
        norms[pp.name] = merge_param_(pp)
    return norms


def _attach_all(model: nn.Module, adapters: Adapter | Sequence[Adapter] | None) -> tuple[PeftModel, dict[str, Adapter]]:
    """``model`` with ``adapters`` attached in order (a ``PeftModel``), and the adapters by their names there."""
    attached: dict[str, Adapter] = {}
    if adapters is not None:
        for i, adapter in enumerate([adapters] if isinstance(adapters, Adapter) else list(adapters)):
            taken = set(model.peft_config) if isinstance(model, PeftModel) else set()
            name = "default" if "default" not in taken else f"adapter_{i}"
            while name in taken:
                name += "_"
            model = attach(model, adapter, name=name)
            attached[name] = adapter
    if not isinstance(model, PeftModel):
        raise AdapterMismatchError(
            f"merge() needs a PeftModel or adapters to attach; got a plain {type(model).__name__} and no adapters."
        )
    return model, attached


def _merge(
    peft_model: PeftModel,
    flags: ModuleFlags,
    adapter_names: Sequence[str] | None,
    verify: bool,
    tol: Tolerance,
    probes: Probes | None,
    check_outputs: CheckOutputs,
    seed: int,
    dtype: str | torch.dtype | None,
    quantized: QuantizedMode,
    want_receipt: bool,
    sources: Mapping[str, str],
) -> MergeResult:
    tuner = cast(Any, peft_model.base_model)
    names = list(adapter_names) if adapter_names is not None else list(peft_model.active_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise AdapterMismatchError(f"no adapter named {unknown} is attached; attached: {list(peft_model.peft_config)}")
    inner = cast(nn.Module, peft_model.base_model.model)
    qplan = _quant_plan(inner, dtype, quantized)
    plans, saved, tokens = collect_plans(peft_model, names)
    params = param_plans(inner, names)
    dora_quantized = sorted(p.name for p in plans if p.quantized and any(u.magnitude is not None for _, u in p.updates))
    if dora_quantized:
        raise UnsupportedAdapterError(
            f"DoRA on quantized layers is not supported yet: {dora_quantized}. Merge into the 16-bit base "
            "(loramerge.merge_checkpoint with qlora_base='original' or 'simulated')."
        )

    fingerprint = adapter_fingerprint(_updates_by_name(plans, params))
    receipt: Receipt | None = None
    if want_receipt:
        if tokens:
            raise InvalidArgumentError(
                f"receipt=True cannot record trainable tokens yet ({[t.name for t in tokens]}); merge without a receipt"
            )
        if len(names) != 1 or any(p.quantized or p.via_peft for p in plans) or params:
            raise InvalidArgumentError(
                "receipt=True needs exactly one adapter merged into a non-quantized base, without LoRA variants that "
                "PEFT's own layer merges and without target_parameters (merge adapters one at a time)"
            )
        receipt = Receipt(fingerprint)
        for module_name in saved:
            wrapper = cast(Any, inner.get_submodule(module_name))
            for pname, p in wrapper.original_module.named_parameters():
                receipt.originals[f"{module_name}.{pname}"] = p.detach().cpu().clone()
    notes: list[str] = []
    layer_probes: list[LayerProbe] = []
    oracles: dict[str, torch.Tensor | None] = {}
    peft_results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    base_errors: dict[str, float] = {}
    problems: list[str] = []
    if verify:
        previous = list(peft_model.active_adapters)
        tuner.set_adapter(names)
    for plan in plans:
        ups = [u for _, u in plan.updates]
        weight = plan.weight
        if plan.via_peft:  # merged by PEFT's own layer, now, on a widened copy: refused before any change
            module = inner.get_submodule(plan.name)
            peft_results[plan.name] = peft_merged(module, [a for a, _ in plan.updates], weight.dtype, plan.name)
            if not all(bool(torch.isfinite(t).all()) for t in peft_results[plan.name] if t is not None):
                problems.append(f"{plan.name}: PEFT's merge of this layer is not finite")
        elif plan.quantized:
            assert qplan is not None
            exact = checked_dequantize(plan.layer, plan.name, seed=seed)
            weight = exact.to(compute_dtype(plan.layer))  # exact: the layer computes in that dtype
            problems += [f"{plan.name}: {m}" for m in check_updates(ups, exact.to(qplan.store_dtype(plan.layer)))]
        else:
            problems += [f"{plan.name}: {m}" for m in check_updates(ups, weight)]
        if verify and not problems:
            own = [] if plan.via_peft else ups  # loramerge's own math does not model a variant
            probe = LayerProbe(plan.name, plan.kind, weight, bias_of(plan.layer), own, seed, MAX_PROBE_OUTPUTS)
            layer_probes.append(probe)
            if not plan.quantized:  # PEFT's own layer, as adapter mode runs it: the independent reference
                oracles[plan.name] = peft_layer_output(inner.get_submodule(plan.name), probe)
            if plan.via_peft and oracles[plan.name] is None:
                problems.append(f"{plan.name}: PEFT's layer cannot be run on probes to prove its merge")
            if plan.quantized and qplan is not None and qplan.mode == "requantize":
                base_errors[plan.name] = relative_errors(probe.outputs(weight, bias_of(plan.layer)), probe.reference)[0]
    problems += [m for pp in params for m in param_problems(pp)]
    param_oracles = {pp.name: ParamOracle.of(pp, seed) for pp in params} if verify and not problems else {}
    _raise_problems(problems, "merging")
    if qplan is not None and qplan.mode == "dequantize":  # every layer the merge dequantizes, proven before any change
        planned = {id(p.layer) for p in plans}
        for qname, qlayer in quantized_layers(inner).items():
            if id(qlayer) not in planned:
                checked_dequantize(qlayer, qname, seed=seed)

    model_ref: ModelReference | None = None
    batch: dict[str, torch.Tensor] | None = None
    base_out: torch.Tensor | None = None
    if verify:
        batch = probe_batch(inner, check_outputs, probes, seed, notes)
        if batch is not None:
            try:
                model_ref = reference_outputs(peft_model, batch)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise LoraMergeError(
                    f"the probe inputs could not run the model in adapter mode ({type(e).__name__}: {e}); nothing "
                    "was changed. Pass probes= that the model accepts, or check_outputs=False to rely on the "
                    "per-layer checks."
                ) from e
            if model_ref.note:
                notes.append(model_ref.note)
            if qplan is not None and qplan.mode == "requantize":
                with peft_model.disable_adapter():
                    base_out = run_model(peft_model, batch)
            elif qplan is not None:
                model_ref = dataclasses.replace(model_ref, dtype=qplan.target)
        tuner.set_adapter(previous)

    untied = untie_shared(inner, plans)
    mapped = FileMappings()
    if untied:
        notes.append(f"untied {untied} (they shared a merged weight; adapter mode does not change them)")
    stats = {}
    lost: dict[str, float] = {}
    dora_norms: dict[str, torch.Tensor] = {}
    for i, plan in enumerate(plans):
        ups = [u for _, u in plan.updates]
        if plan.quantized:
            assert qplan is not None
            new_layer, stats[plan.name], lost[plan.name] = _merge_quantized(plan, qplan, seed)
            flags.carry(plan.layer, new_layer)
            cast(Any, inner.get_submodule(plan.name)).base_layer = new_layer
            plans[i] = dataclasses.replace(plan, layer=new_layer, quantized=qplan.mode == "requantize")
            continue
        if plan.via_peft:
            new_weight, peft_bias = peft_results.pop(plan.name)
            with torch.no_grad():
                before = plan.weight.detach().float()
                plan.weight.copy_(new_weight)
                if peft_bias is not None:
                    cast(torch.Tensor, plan.layer.bias).copy_(peft_bias)
            stats[plan.name] = TensorStats(delta_norm=float((new_weight.float() - before).norm()))
            continue
        new_bias = _merged_bias(plan.layer, ups)
        originals = _receipt_originals(plan, new_bias) if receipt is not None else {}
        with torch.no_grad():
            if mapped.holds(plan.weight):  # copy-on-write pages of the loaded file: write into own memory
                mapped.own_copy(cast(torch.Tensor, plan.layer.weight))
            stats[plan.name] = merge_tensor_(plan.weight, ups)
            if new_bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_(new_bias.to(bias.dtype))
        if "dora_norms" in stats[plan.name].extras:
            dora_norms[plan.name] = stats[plan.name].extras["dora_norms"].detach().cpu()
        if receipt is not None:
            _record_receipt(receipt, plan, originals, dora_norms.get(plan.name))
    param_norms = _merge_params(params, mapped)
    layers_extra: list[LayerCheck] = []
    for token_plan in tokens:  # PEFT's rows replace the base's, as its own merge writes them
        ids, rows = token_plan.rows()
        with torch.no_grad():  # the reference: the whole weight as PEFT's own layer computes it
            expected = token_plan.layer.get_merged_weights([token_plan.adapter]).detach().clone()
            token_plan.weight.index_copy_(0, ids, rows)
        rows_exact = bool(torch.equal(token_plan.weight, expected))
        layers_extra.append(_token_check(token_plan.name, token_plan.weight, rows_exact))
    plain = unwrap(peft_model, saved)
    narrowed: list[torch.Tensor] = []
    base_format = ""
    if qplan is not None and qplan.mode == "dequantize":
        for name, layer in quantized_layers(plain).items():  # the layers no adapter touched
            exact = checked_dequantize(layer, name, seed=seed)
            new_layer = dequantized_linear(layer, exact.to(qplan.target))
            flags.carry(layer, new_layer)
            _replace_module(plain, name, new_layer)
            if loses_precision(exact, qplan.target):
                narrowed.append(new_layer.weight)
        for p in plain.parameters():
            if p.is_floating_point() and p.dtype != qplan.target:
                if loses_precision(p.data, qplan.target):
                    narrowed.append(p)
                p.data = p.data.to(qplan.target)
        forget_quantization(plain, qplan.target)
        base_format = (
            f"{qplan.describe} ({qplan.layers} layers) -> dequantized to {str(qplan.target).replace('torch.', '')}"
        )
    elif qplan is not None:
        base_format = f"{qplan.describe} ({qplan.layers} layers) -> re-quantized"
        notes.append(
            "re-quantized: rounding to the 4/8-bit grid again cannot meet the tolerance rule; each layer and the model "
            "pass when closer to adapter mode than the base without the adapter (that error is the 'limit'); "
            "'residual' is the fraction of ΔW that re-quantization lost, ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖"
        )
    if qplan is not None:
        notes.append(f"quantized base: {base_format}")
    logger.info("merged %s into %d weights", names, len(plans))

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        try:
            for plan, probe in zip(plans, layer_probes, strict=True):
                st = stats[plan.name]
                if plan.quantized:  # re-quantized: judged against the base without the adapter
                    merged_w = dequantize(plan.layer).to(probe.dtype)
                    out = probe.outputs(merged_w, bias_of(plan.layer))
                    err, _ = relative_errors(out, probe.reference)
                    a_err, _ = relative_errors(probe.adapter, probe.reference)
                    limit = base_errors[plan.name]
                    ok = math.isfinite(err) and err < limit
                    reason = (
                        ""
                        if ok
                        else (
                            f"re-quantized output error {err:.3g} is not below the base's without the adapter ({limit:.3g}): "
                            "re-quantizing erased the adapter in this layer"
                        )
                    )
                    layers.append(
                        LayerCheck(
                            plan.name,
                            plan.kind,
                            quant_format(plan.layer).quant_type,
                            lost[plan.name],
                            math.nan,
                            err,
                            a_err,
                            math.nan,
                            limit,
                            ok,
                            reason,
                        )
                    )
                    continue
                merged_w = plan.weight.detach()
                out = probe.outputs(merged_w, bias_of(plan.layer))
                oracle = oracles.get(plan.name)
                # the rounding a faithful merge may add only widens the limit: computed when needed
                check = _layer_verdict(plan.via_peft, probe, out, oracle, tol, st, probe.storage(merged_w, False))
                if not check.passed:
                    check = _layer_verdict(plan.via_peft, probe, out, oracle, tol, st, probe.storage(merged_w))
                layers.append(dataclasses.replace(check, dtype=str(merged_w.dtype).replace("torch.", "")))
            layers += [check_param(pp, param_oracles[pp.name], tol) for pp in params]
            if model_ref is not None and batch is not None:
                routes: list[torch.Tensor] = []
                with keep_layout(plain):  # re-quantized layers too
                    merged_out = run_model(plain, batch, routes)
                if base_out is not None:
                    outputs = _requantized_output_check(merged_out, model_ref, base_out)
                else:
                    weights = [p.weight for p in plans] + [pp.param for pp in params] + narrowed
                    outputs = output_check(
                        merged_out, model_ref, tol, batch, lambda: storage_baseline(plain, batch, weights, seed), routes
                    )
        except Exception as e:  # verification must not crash after the weights changed
            raise _verification_crashed(e, plain, names, tol, layers, notes, dora_norms, untied, base_format) from e
    else:
        notes.append("verification off (verify=False)")
        for plan in plans:
            st = stats[plan.name]
            layers.append(
                LayerCheck(
                    plan.name,
                    plan.kind,
                    str(plan.weight.dtype).replace("torch.", ""),
                    lost.get(plan.name, st.relative_residual) if plan.quantized else st.relative_residual,
                    st.max_ulp,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    True,
                    "",
                )
            )
        for pp in params:
            dtype_name = str(pp.param.dtype).replace("torch.", "")
            nan = math.nan
            layers.append(LayerCheck(pp.name, "parameter", dtype_name, nan, nan, nan, nan, nan, nan, True, ""))
            logger.debug("merged %s (|dW| %.3g)", pp.name, param_norms[pp.name])
    layers += layers_extra
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("merge", passed, tol, tuple(layers), outputs, notes=tuple(notes))
    entries = [  # one round per adapter, in merge order (they can be unmerged one at a time, in reverse)
        new_round(
            source=sources.get(n, f"attached adapter {n!r}"),
            fingerprint=adapter_fingerprint(_updates_by_name(plans, params, n)),
            config=peft_model.peft_config[n].to_dict(),
            scales={name: u.scale for name, ups in _updates_by_name(plans, params, n).items() for u in ups},
            dtype=str(next((p.weight.dtype for p in plans), next((pp.param.dtype for pp in params), ""))).replace(
                "torch.", ""
            ),
            report=report if verify else None,
        )
        for n in names
    ]
    set_model_lineage(plain, [*lineage(plain), *entries])
    result = MergeResult(
        plain,
        report,
        tuple(names),
        dora_norms,
        tuple(untied),
        verified=verify,
        base_format=base_format,
        receipt=receipt,
    )
    if not passed:
        raise VerificationError(
            "the merged model is out of tolerance (the model HAS been changed in place; error.result holds it):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result


def unmerge(
    model: nn.Module,
    adapter: Adapter,
    *,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    probes: Probes | None = None,
    check_outputs: CheckOutputs = "auto",
    dora_norms: Mapping[str, torch.Tensor] | None = None,
    originals: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    receipt: Receipt | str | Path | None = None,
    force: bool = False,
) -> UnmergeResult:
    """Remove a saved adapter's updates from a merged model, in place, and verify the result.

    Works in any process (PEFT can only unmerge in the session that merged): each weight becomes
    ``round(W_merged - ΔW)``, computed in fp32. For a weight that loramerge merged, the recovered
    value is within ``0.5 ulp(W_merged) + 0.5 ulp(W_recovered)`` of the original (about one
    rounding step; reported as ``max_error_bound_ulp``).

    Verification: the recovered base *with the adapter attached* must reproduce the merged model
    within the tolerance rule, per layer and (when affordable) for the whole model; and re-merging
    must land on the merged weights.

    Args:
        model: The plain merged model.
        adapter: The adapter that was merged (from :func:`~loramerge.load_adapter`).
        verify: Verify the result (default).
        tolerance: Settings of the tolerance rule.
        probes: Inputs for the whole-model check.
        check_outputs: As in :func:`~loramerge.merge`.
        dora_norms: For DoRA modules, the norms ``‖W + ΔW‖`` recorded at merge time
            (:attr:`MergeResult.dora_norms`): without them a DoRA merge cannot be undone.
        originals: Original values of tensors the adapter *replaced* (``modules_to_save``
            modules, trained biases), by parameter name: the adapter does not contain them.
        seed: Seed of the random probes.
        receipt: The receipt of the merge (:attr:`MergeResult.receipt` or a path to a saved one):
            every adapted tensor then comes back byte-identical to the base (checked by SHA-256),
            and DoRA norms and replaced originals come from it.
        force: Unmerge even when the model's lineage says this adapter is not the last one merged.

    Raises:
        LineageError: The lineage says another adapter was merged after this one (nothing changed).
        ReceiptError: The receipt belongs to another merge, or is corrupt.
        UnmergeImpossibleError: Exact recovery is impossible without ``dora_norms`` or
            ``originals``; the message lists what is missing. Nothing was changed.
        AdapterMismatchError: The adapter does not fit the model.
        VerificationError: The result is out of tolerance (the model has been changed).

    Example:
        >>> merged = load_base(merged_dir)  # doctest: +SKIP
        >>> result = unmerge(merged, load_adapter(adapter_dir))  # doctest: +SKIP
    """
    with preserved(model):
        return _unmerge(
            model,
            adapter,
            verify,
            tolerance or Tolerance(),
            probes,
            check_outputs,
            dora_norms,
            originals,
            seed,
            receipt,
            force,
        )


def _unmerge(
    model: nn.Module,
    adapter: Adapter,
    verify: bool,
    tol: Tolerance,
    probes: Probes | None,
    check_outputs: CheckOutputs,
    dora_norms: Mapping[str, torch.Tensor] | None,
    originals: Mapping[str, torch.Tensor] | None,
    seed: int,
    receipt: Receipt | str | Path | None,
    force: bool,
) -> UnmergeResult:
    if isinstance(model, PeftModel):
        raise AdapterMismatchError(
            "unmerge() takes the plain merged model, not a PeftModel; for an adapter still attached in this session "
            "use PEFT's unmerge_adapter(), or merge() and then unmerge()."
        )
    kinds = check_compatible(model, adapter)
    fingerprint = fingerprint_of(adapter)
    rounds = lineage(model)
    lineage_notes = check_last(rounds, fingerprint, force)
    rc = as_receipt(receipt) if receipt is not None else None
    if rc is not None:
        rc.check_adapter(fingerprint)
    dora_norms = {**(rc.dora_norms if rc is not None else {}), **dict(dora_norms or {})}
    originals = {**(rc.originals if rc is not None else {}), **dict(originals or {})}
    missing_norms = sorted(n for n, m in adapter.modules.items() if m.use_dora and n not in dora_norms)
    missing_originals = sorted(
        [
            n
            for n, k in adapter.replaced_kinds.items()
            if k in ("modules_to_save", "trained_bias") and n not in originals
        ]
        + [n for n in adapter.token_rows if n not in originals]  # trainable tokens: the replaced rows
    )
    if missing_norms or missing_originals:
        lines = []
        if missing_norms:
            lines.append(
                f"DoRA modules {missing_norms}: the merged weight is m * (W + ΔW) / ‖W + ΔW‖ and the norms ‖W + ΔW‖ cannot "
                "be recovered from the merged weight and the adapter. Pass dora_norms= (MergeResult.dora_norms from the merge)."
            )
        if missing_originals:
            lines.append(
                f"tensors {missing_originals} were replaced by the adapter (modules_to_save, trained biases, trainable-token "
                "rows), so their original values are not in the merged model nor in the adapter. Pass "
                "originals={name: tensor}, "
                "e.g. read from the base checkpoint with safetensors."
            )
        raise UnmergeImpossibleError("cannot unmerge exactly; nothing was changed:\n  - " + "\n  - ".join(lines))
    bad_shapes = sorted(
        n for n, t in originals.items() if n in adapter.replaced and tuple(t.shape) != tuple(adapter.replaced[n].shape)
    )
    if bad_shapes:
        raise AdapterMismatchError(f"originals= has wrong shapes for {bad_shapes}")

    params = dict(model.named_parameters(remove_duplicate=False))
    plans = []
    for name, mod in adapter.modules.items():
        kind = kinds[name]
        up = LoraUpdate(kind, mod.update.lora_A, mod.update.lora_B, mod.scale, mod.update.magnitude, mod.update.bias)
        layer = model.get_submodule(name)
        plans.append(LayerPlan(name, kind, layer, [("adapter", up)]))
    problems = [f"{p.name}: {msg}" for p in plans for msg in check_updates([u for _, u in p.updates], p.weight)]
    _raise_problems(problems, "unmerging")

    notes: list[str] = []
    merged_model_out: torch.Tensor | None = None
    merged_storage = (0.0, 0.0)
    merged_routes: list[torch.Tensor] = []
    batch: dict[str, torch.Tensor] | None = None
    target_out: dict[str, torch.Tensor] = {}
    storage: dict[str, float] = {}
    if verify:
        batch = probe_batch(model, check_outputs, probes, seed, notes)
        if batch is not None:
            merged_model_out = run_model(model, batch, merged_routes)
            # measured now, while the merged weights exist; used only if the rule needs it
            merged_storage = storage_baseline(model, batch, [p.weight for p in plans], seed)
        for plan in plans:
            x = probe_inputs(plan.name, plan.kind, plan.weight, seed)
            idx = output_subset(plan.name, plan.kind, plan.weight, seed, MAX_PROBE_OUTPUTS)
            w_sub = restrict_weight(plan.kind, plan.weight, idx)
            target_out[plan.name] = exact_layer_output(plan.kind, w_sub, restrict_vector(bias_of(plan.layer), idx), x)
            storage[plan.name] = storage_rms(plan.kind, w_sub, x)

    stats = {}
    exact: list[str] = []
    if rc is not None:  # every correction must fit before anything changes: try each on a copy first
        missing = sorted(f"{p.name}.weight" for p in plans if f"{p.name}.weight" not in rc.tensors)
        if missing:
            raise ReceiptError(f"the receipt has no entry for {missing}; it was written for another model or merge.")
        for plan in plans:
            trial = plan.weight.detach().clone()
            unmerge_tensor_(trial, [plan.updates[0][1]], dora_norms.get(plan.name))
            apply_receipt(trial, rc.tensors[f"{plan.name}.weight"], f"{plan.name}.weight")
    mapped = FileMappings()
    for plan in plans:
        up = plan.updates[0][1]
        with torch.no_grad():
            if mapped.holds(plan.weight):  # copy-on-write pages of the loaded file (see FileMappings)
                mapped.own_copy(cast(torch.Tensor, plan.layer.weight))
            stats[plan.name] = unmerge_tensor_(plan.weight, [up], dora_norms.get(plan.name))
            if up.bias is not None:
                bias = cast(torch.Tensor, plan.layer.bias)
                bias.copy_((bias.detach().float() - up.scale * up.bias.detach().float().to(bias.device)).to(bias.dtype))
            if rc is not None:
                for suffix in ("weight", "bias"):
                    entry = rc.tensors.get(f"{plan.name}.{suffix}")
                    target = cast(torch.Tensor | None, getattr(plan.layer, suffix, None))
                    if entry is not None and target is not None:
                        target.copy_(apply_receipt(target.detach(), entry, f"{plan.name}.{suffix}"))
                        exact.append(f"{plan.name}.{suffix}")
        if rc is not None:
            continue
        saved_base = adapter.replaced.get(f"{plan.name}.weight")
        if saved_base is not None:
            candidate = saved_base.to(plan.weight.dtype).to(plan.weight.device)
            close = (candidate.float() - plan.weight.detach().float()).abs() <= ulp(candidate.float(), candidate.dtype)
            if bool(close.all()):
                with torch.no_grad():
                    plan.weight.copy_(candidate)
                exact.append(f"{plan.name}.weight")
            else:
                notes.append(
                    f"{plan.name}.weight: the adapter's saved base copy differs from the recovered weight; kept the recovered one"
                )
    bound = max((st.error_bound for n, st in stats.items() if f"{n}.weight" not in exact), default=0.0)
    notes_lineage = lineage_notes
    for pname, value in originals.items():
        target = params[pname]
        with torch.no_grad():
            target.copy_(value.to(target.dtype).to(target.device))
        exact.append(pname)

    layers: list[LayerCheck] = []
    outputs = None
    if verify:
        try:
            for plan in plans:
                up = plan.updates[0][1]
                st = stats[plan.name]
                probe_bias = bias_of(plan.layer)
                trained_bias = adapter.replaced.get(f"{plan.name}.bias")
                if trained_bias is not None and probe_bias is not None:  # adapter mode runs with the adapter's bias
                    probe_bias = trained_bias.to(probe_bias.dtype).to(probe_bias.device)
                probe = LayerProbe(
                    plan.name, plan.kind, plan.weight.detach(), probe_bias, [up], seed, MAX_PROBE_OUTPUTS
                )
                reason = ""
                if st.remerge_gap > 1.0 + 1e-6:
                    reason = (
                        f"re-merging the recovered weight misses the merged weight by {st.remerge_gap:.3g}x what rounding "
                        "allows: the subtraction lost precision"
                    )
                both = math.hypot(storage[plan.name], probe.storage(plan.weight))
                layers.append(probe.check(target_out[plan.name], tol, st.relative_residual, st.max_ulp, reason, both))
            if merged_model_out is not None and batch is not None:
                with adapter_mode(model, [adapter]) as peft_model:
                    ref = reference_outputs(peft_model, batch)
                if ref.note:
                    notes.append(ref.note)
                outputs = output_check(merged_model_out, ref, tol, batch, lambda: merged_storage, merged_routes)
        except Exception as e:  # verification must not crash after the weights changed
            why = f"verification could not run after the unmerge: {type(e).__name__}: {e}"
            report = VerificationReport("unmerge", False, tol, tuple(layers), None, notes=(*notes, why))
            raise VerificationError(
                f"{why}\nThe model HAS been unmerged in place; error.result holds it, unverified.",
                report,
                UnmergeResult(model, report, tuple(sorted(exact)), bound, verified=False),
            ) from e
    else:
        notes.append("verification off (verify=False)")
    notes.extend(notes_lineage)
    if rc is not None:
        notes.append(f"receipt applied: {len(exact)} tensors restored byte-identical to the base (SHA-256 checked)")
    if rounds:
        set_model_lineage(model, drop_round(rounds, fingerprint))
    passed = all(c.passed for c in layers) and (outputs is None or outputs.passed)
    report = VerificationReport("unmerge", passed, tol, tuple(layers), outputs, notes=tuple(notes))
    result = UnmergeResult(model, report, tuple(sorted(exact)), bound, verified=verify)
    if not passed:
        raise VerificationError(
            "the unmerged model is out of tolerance (the model HAS been changed in place):\n"
            + "\n".join(report.failures),
            report,
            result,
        )
    return result
