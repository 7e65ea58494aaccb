"""What the in-memory merge and unmerge share: the plan for a quantized base, receipt records,
copies of weights that lie in mapped files, and the per-layer verdicts."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import nn

from loramerge.errors import (
    InvalidArgumentError,
    NonFiniteMergeError,
    VerificationError,
)
from loramerge.formats.loading import resolve_dtype
from loramerge.formats.receipts import Receipt
from loramerge.formats.receipts import encode as encode_receipt
from loramerge.numerics.delta import LoraUpdate, TensorStats, merge_tensor_, unmerge_tensor_
from loramerge.numerics.quantized import check_supported, checked_dequantize, dequantize, quant_format, quantized_layers
from loramerge.numerics.requantize import dequantized_linear, requantize
from loramerge.numerics.tolerance import Tolerance, relative_errors
from loramerge.plan.param_targets import ParamPlan
from loramerge.plan.peft_plans import LayerPlan
from loramerge.proof.layer_checks import (
    LayerProbe,
    bias_of,
    oracle_check,
    oracle_only_check,
)
from loramerge.proof.output_checks import ModelReference
from loramerge.proof.reports import LayerCheck, OutputCheck, VerificationReport
from loramerge.proof.results import MergeResult

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
        unmerge_tensor_(recovered, ups, norms, measure=False)
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


def _requantized_check(plan: LayerPlan, probe: LayerProbe, lost: float, limit: float) -> LayerCheck:
    """A re-quantized layer passes when it is closer to adapter mode than the base without the adapter."""
    out = probe.outputs(dequantize(plan.layer).to(probe.dtype), bias_of(plan.layer))
    err, _ = relative_errors(out, probe.reference)
    a_err, _ = relative_errors(probe.adapter, probe.reference)
    ok = math.isfinite(err) and err < limit
    reason = (
        ""
        if ok
        else (
            f"re-quantized output error {err:.3g} is not below the base's without the adapter ({limit:.3g}): "
            "re-quantizing erased the adapter in this layer"
        )
    )
    dtype = quant_format(plan.layer).quant_type
    return LayerCheck(plan.name, plan.kind, dtype, lost, math.nan, err, a_err, math.nan, limit, ok, reason)


def _merged_check(
    plan: LayerPlan, probe: LayerProbe, oracle: torch.Tensor | None, tol: Tolerance, stats: TensorStats
) -> LayerCheck:
    """One merged layer against loramerge's reference and PEFT's own layer."""
    merged_w = plan.weight.detach()
    out = probe.outputs(merged_w, bias_of(plan.layer))
    # the rounding a faithful merge may add only widens the limit: computed when needed
    check = _layer_verdict(plan.via_peft, probe, out, oracle, tol, stats, probe.storage(merged_w, False))
    if not check.passed:
        check = _layer_verdict(plan.via_peft, probe, out, oracle, tol, stats, probe.storage(merged_w))
    return dataclasses.replace(check, dtype=str(merged_w.dtype).replace("torch.", ""))


def _unverified(
    plans: Sequence[LayerPlan], stats: Mapping[str, TensorStats], lost: Mapping[str, float], params: Sequence[ParamPlan]
) -> list[LayerCheck]:
    """The report rows of a merge with verification off: what was merged, nothing judged."""
    nan = math.nan
    rows = []
    for plan in plans:
        st = stats[plan.name]
        residual = lost.get(plan.name, st.relative_residual) if plan.quantized else st.relative_residual
        dtype = str(plan.weight.dtype).replace("torch.", "")
        rows.append(LayerCheck(plan.name, plan.kind, dtype, residual, st.max_ulp, nan, nan, nan, nan, True, ""))
    for pp in params:
        dtype = str(pp.param.dtype).replace("torch.", "")
        rows.append(LayerCheck(pp.name, "parameter", dtype, nan, nan, nan, nan, nan, nan, True, ""))
    return rows
