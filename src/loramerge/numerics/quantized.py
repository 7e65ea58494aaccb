"""Glue to bitsandbytes: recognising quantized layers, dequantizing them exactly, re-quantizing.

A bitsandbytes layer computes with a weight it rebuilds from its quantized storage. loramerge
merges into *that* weight, so :func:`dequantize` reproduces it bit for bit in every storage format
the layer can be in, and :func:`checked_dequantize` proves it on each layer by running the layer's own
forward on one-hot inputs. In particular, on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit
weight on its first eval-mode forward and from then on computes with ``bf16(bf16(code) *
bf16(absmax))``; :func:`dequantize` reads both layouts, and loramerge's own forward passes never
trigger the conversion (:func:`keep_layout`).

bitsandbytes is optional (``pip install loramerge[bnb]``); nothing here imports it until a
quantized layer is met.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from loramerge.errors import UnsupportedQuantizationError
from loramerge.numerics.tolerance import ulp

__all__ = [
    "QuantFormat",
    "check_supported",
    "checked_dequantize",
    "compute_dtype",
    "dequantize",
    "quant_format",
    "quantized_layers",
]

_UNSUPPORTED_ADVICE = (
    "loramerge merges into bitsandbytes 4-bit/8-bit bases, or into the original 16-bit checkpoint "
    "(loramerge.merge_checkpoint / `loramerge merge`, with qlora_base='original' or 'simulated'). "
    "Load the unquantized base (from_pretrained without quantization_config), attach the adapter and merge that, "
    "then quantize the merged model with your method."
)
_UNSUPPORTED_CLASSES = {
    "QuantLinear": "GPTQ",
    "WQLinear_GEMM": "AWQ",
    "WQLinear_GEMV": "AWQ",
    "WQLinear": "AWQ",
    "HQQLinear": "HQQ",
    "FP8Linear": "fp8",
    "Float8Linear": "fp8",
    "EetqLinear": "EETQ",
    "QuantoLinear": "quanto",
    "QLinear": "quanto",
}


@dataclass(frozen=True)
class QuantFormat:
    """How one bitsandbytes layer stores its weight.

    Attributes:
        method: ``"bnb-4bit"`` or ``"bnb-8bit"``.
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        double_quant: 4-bit only: whether the block scales are themselves quantized.
        blocksize: 4-bit only: elements per block scale (0 for 8-bit, which scales per row).
        dtype: The dtype the layer's dequantized weight has (bitsandbytes' ``quant_state.dtype``).
        compute_dtype: The dtype the layer computes in (``None``: the input's).
        cpu_packed: 4-bit only: the weight is in bitsandbytes' CPU (AVX512-BF16) layout, whose block
            scales are bf16.
    """

    method: Literal["bnb-4bit", "bnb-8bit"]
    quant_type: str
    double_quant: bool
    blocksize: int
    dtype: torch.dtype
    compute_dtype: torch.dtype | None
    cpu_packed: bool = False

    def describe(self) -> str:
        """One line, e.g. ``bnb-4bit nf4, double quantization, blocks of 64, bfloat16``."""
        if self.method == "bnb-8bit":
            return f"bnb-8bit int8 (LLM.int8, per-row scales), {str(self.dtype).replace('torch.', '')}"
        dq = "double quantization" if self.double_quant else "no double quantization"
        return f"bnb-4bit {self.quant_type}, {dq}, blocks of {self.blocksize}, {str(self.dtype).replace('torch.', '')}"


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - only without the extra
        raise UnsupportedQuantizationError(
            "the model has bitsandbytes layers but bitsandbytes cannot be imported; `pip install loramerge[bnb]`."
        ) from e
    return bitsandbytes


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith(
        "bitsandbytes"
    )


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes linear layer of ``model`` by module path (under PEFT wrappers too)."""
    return {name: m for name, m in model.named_modules() if is_quantized_layer(m)}


def check_supported(model: nn.Module) -> None:
    """Raise :class:`~loramerge.UnsupportedQuantizationError` for a base quantized with anything but bitsandbytes."""
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    method = None
    if qconfig is not None:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
        method = getattr(method, "value", method)
    if method is not None and str(method) != "bitsandbytes":
        raise UnsupportedQuantizationError(
            f"the base model is quantized with {method!r}, which loramerge cannot dequantize exactly. "
            + _UNSUPPORTED_ADVICE
        )
    for name, module in model.named_modules():
        kind = _UNSUPPORTED_CLASSES.get(type(module).__name__)
        if kind is None and "torchao" in type(getattr(module, "weight", None)).__module__:
            kind = "torchao"
        if kind is not None:
            raise UnsupportedQuantizationError(
                f"{name} is a {kind} quantized layer ({type(module).__name__}), which loramerge cannot dequantize "
                "exactly. " + _UNSUPPORTED_ADVICE
            )


def quant_format(layer: nn.Module) -> QuantFormat:
    """The storage format of a bitsandbytes layer."""
    weight = cast(Any, layer.weight)
    compute = getattr(layer, "compute_dtype", None)
    if type(layer).__name__ == "Linear8bitLt":
        return QuantFormat("bnb-8bit", "int8", False, 0, torch.float32, compute)
    state = weight.quant_state
    packed = bool(getattr(state, "packing_format_for_cpu", False))
    nested = bool(getattr(state, "original_nested", state.nested) if packed else state.nested)
    return QuantFormat(
        "bnb-4bit", str(state.quant_type), nested, int(state.blocksize), state.dtype, compute, cpu_packed=packed
    )


def _unpack_cpu_layout(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """4-bit codes ``[rows, cols]`` from bitsandbytes' AVX512-BF16 CPU layout (blocks of 32 rows;
    in each 64-byte group the low nibbles hold one row block's even half, the high nibbles the next)."""
    block = 32
    data = packed.reshape(-1, block)
    low, high = data & 0xF, (data >> 4) & 0xF
    codes = torch.cat([low, high], dim=-1)  # [-1, 64]: pairs (k, k+1) for 32 consecutive rows
    codes = codes.reshape(rows // block, cols // 2, block, 2).transpose(1, 2)
    return codes.reshape(rows, cols)


def _unpack_codes(data: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` 4-bit codes of bitsandbytes' standard layout (two per byte, high nibble first)."""
    raw = data.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=-1).reshape(-1)
    return codes[:count].long()


def _block_scales(state: Any) -> torch.Tensor:
    """A 4-bit layer's block scales as fp32: with double quantization, ``code2[q] * absmax2[block] +
    offset``, each step an fp32 operation, as every bitsandbytes backend computes them."""
    absmax = cast(torch.Tensor, state.absmax)
    if not state.nested:
        return absmax.float().reshape(-1)
    inner = state.state2
    codes = absmax.reshape(-1).long()
    scales = cast(torch.Tensor, inner.absmax).float().reshape(-1)
    per_value = scales.repeat_interleave(int(inner.blocksize))[: codes.numel()]
    return cast(torch.Tensor, inner.code).float()[codes] * per_value + cast(torch.Tensor, state.offset).float()


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a bitsandbytes layer dequantizes its weight to and computes in.

    4-bit layers dequantize to the dtype of the (compute-dtype-cast) input: the layer's
    ``compute_dtype`` when set, else the activations' dtype, which is the dtype the weight was
    quantized from (``quant_state.dtype``); in bitsandbytes' AVX512-BF16 CPU layout always bfloat16.
    8-bit layers: fp32 (their weight is ``CB * SCB / 127``; see :func:`dequantize`).
    """
    if type(layer).__name__ == "Linear8bitLt":
        return torch.float32
    state = cast(Any, layer.weight).quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return torch.bfloat16
    dtype = getattr(layer, "compute_dtype", None)
    return cast(torch.dtype, dtype if dtype is not None else state.dtype)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The weight ``layer`` computes with, ``[out, in]``, exactly, as fp32 (every value it can hold
    is representable there).

    Computed by loramerge from the layer's storage, not by bitsandbytes' kernels (those differ by
    CPU; :func:`checked_dequantize` compares the two):

    * 4-bit, standard layout: ``code[q] * scale`` in fp32 over flat blocks of ``blocksize`` values,
      rounded once to :func:`compute_dtype` (what bitsandbytes' CUDA, scalar CPU, AVX-512 CPU and
      pure-PyTorch kernels compute when the blocks do not straddle rows).
    * 4-bit, AVX512-BF16 CPU layout (after an eval-mode forward on such a CPU):
      ``bf16(bf16(code[q]) * bf16(scale))``.
    * 8-bit: ``CB * SCB / 127`` in fp32.
    """
    weight = cast(Any, layer.weight)
    if type(layer).__name__ == "Linear8bitLt":
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(layer.state, "SCB", None)
        if scb is None or weight.dtype != torch.int8:
            return cast(torch.Tensor, weight.detach().float())  # not quantized yet (has_fp16_weights)
        return cast(torch.Tensor, _bnb().functional.int8_vectorwise_dequant(weight.data, scb).float())
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        rows, cols = (int(s) for s in state.shape)
        table = cast(torch.Tensor, state.code).float().to(weight.device)
        codes = _unpack_cpu_layout(weight.data.view(torch.uint8), rows, cols).long()
        scales = cast(torch.Tensor, state.absmax).T.float().repeat_interleave(int(state.blocksize), dim=1)
        return (table.to(torch.bfloat16).float()[codes] * scales).to(torch.bfloat16).float()
    return _dequantize_standard(weight.data, state, compute_dtype(layer))


def _dequantize_standard(data: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """``code[q] * scale`` in fp32 over flat blocks, rounded once to ``dtype``, as fp32 ``[rows, cols]``."""
    rows, cols = (int(s) for s in state.shape)
    count = rows * cols
    values = cast(torch.Tensor, state.code).float().to(data.device)[_unpack_codes(data, count)]
    scales = _block_scales(state).to(values.device).repeat_interleave(int(state.blocksize))[:count]
    return (values * scales).to(dtype).reshape(rows, cols).float()


def _kernel_dequantize(layer: nn.Module) -> torch.Tensor | None:
    """What bitsandbytes' own dequantization kernel returns for a 4-bit layer on this machine, in
    :func:`compute_dtype` (for error messages only); ``None`` when it cannot be asked."""
    state = cast(Any, layer.weight).quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return None
    try:
        scales = _block_scales(state)
        out = torch.ops.bitsandbytes.dequantize_4bit.default(
            cast(torch.Tensor, layer.weight).data,
            scales,
            int(state.blocksize),
            str(state.quant_type),
            list(state.shape),
            compute_dtype(layer),
        )
    except Exception:  # pragma: no cover - only for a better message
        return None
    return cast(torch.Tensor, out).float()


@contextlib.contextmanager
def _forward_untouched(layer: nn.Module) -> Iterator[None]:
    """Within the block, a forward of ``layer`` leaves no trace: bitsandbytes' Linear4bit fixes its
    compute dtype on the first call and converts its bias to it in place; both are put back."""
    saved: dict[str, Any] = {
        k: layer.__dict__[k] for k in ("compute_dtype", "compute_type_is_set") if k in layer.__dict__
    }
    bias = getattr(layer, "bias", None)
    bias_data = bias.data if isinstance(bias, torch.Tensor) else None
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad(), keep_layout(layer):
            yield
    finally:
        layer.train(was_training)
        layer.__dict__.update(saved)
        if bias_data is not None and isinstance(bias, torch.Tensor):
            bias.data = bias_data


def _mismatch_advice(layer: nn.Module, got: torch.Tensor, cols: torch.Tensor) -> str:
    """Why the layer's forward differs from :func:`dequantize`, as precisely as can be told."""
    state = getattr(cast(Any, layer.weight), "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return (
            "this bitsandbytes version or storage format is not understood, so merging would silently change the "
            "model. Please report it with your bitsandbytes version."
        )
    in_features, blocksize = int(cast(Any, layer).in_features), int(state.blocksize)
    kernel = _kernel_dequantize(layer)
    if in_features % blocksize and kernel is not None:
        bias = getattr(layer, "bias", None)
        want = kernel[:, cols.to(kernel.device)].T.to(got.dtype)
        if bias is not None:
            want = want + bias.detach().to(got.dtype)
        if torch.equal(want.float(), got.float()):
            return (
                f"in_features ({in_features}) is not a multiple of the quantization blocksize ({blocksize}), and "
                "bitsandbytes' CPU kernel on this machine (its AVX-512 path) then reads each row's block scales as if "
                "blocks started at every row, so this layer computes with a different weight than on CUDA or on a CPU "
                "without AVX-512. Merging would bake this CPU's reading into the model. Merge on a machine without "
                "AVX-512 or with CUDA, or merge the original checkpoint with loramerge.merge_checkpoint("
                "qlora_base='simulated')."
            )
    return (
        "this bitsandbytes version, kernel path or storage format is not understood, so merging would silently "
        "change the model. Please report it with your bitsandbytes version and CPU."
    )


def checked_dequantize(
    layer: nn.Module, name: str, columns: int = 8, seed: int = 0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`dequantize`, proven: the layer's own forward (in eval mode, as inference runs it) on
    ``columns`` one-hot inputs in its :func:`compute_dtype` must return exactly those columns of the
    dequantized weight (and its bias); 8-bit layers, which also quantize their input, to within 2
    fp16 ulps.

    The forward leaves the layer as it was: no storage-layout conversion (:func:`keep_layout`), and
    the compute dtype and bias dtype bitsandbytes sets on a first call are put back. ``weight``
    replaces the dequantized weight in the comparison (for tests). Raises
    :class:`~loramerge.UnsupportedQuantizationError` on any difference, saying why when it can.
    """
    in_features = int(cast(Any, layer).in_features)
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randperm(in_features, generator=gen)[: min(columns, in_features)]
    device = cast(torch.Tensor, layer.weight).device
    four_bit = type(layer).__name__ == "Linear4bit"
    dtype = compute_dtype(layer) if four_bit else torch.float32
    x = torch.zeros(len(cols), in_features, dtype=dtype, device=device)
    x[torch.arange(len(cols)), cols.to(device)] = 1.0
    bias = getattr(layer, "bias", None)
    bias_value = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    with _forward_untouched(layer):
        got = cast(torch.Tensor, layer(x))
    if weight is None:
        weight = dequantize(layer)
    want = weight[:, cols.to(device)].T
    if four_bit:
        # one non-zero input: the layer returns its weight (and bias) exactly, rounded through the compute
        # dtype it was configured with (the AVX512-BF16 kernel computes in bf16 and converts back to that)
        through = getattr(layer, "compute_dtype", None) or got.dtype
        want = want.to(through)
        if bias_value is not None:
            want = want + bias_value.to(through)
        want, got = want.to(got.dtype).float(), got.float()
        slack = torch.zeros_like(want)
    else:  # LLM.int8 quantizes its input too and computes through fp16: allow 2 fp16 ulps of a row's largest value
        got = got.float()
        if bias_value is not None:
            want = want + bias_value.float()
        row_max = weight.abs().amax(dim=1).to(device)
        slack = 2 * ulp(want.abs() + row_max, torch.float16)
    bad = (got - want).abs() > slack
    if bool(bad.any()):
        worst = float((got - want).abs().max())
        raise UnsupportedQuantizationError(
            f"{name}: the weight loramerge dequantized differs from what the {type(layer).__name__} layer computes "
            f"with (by up to {worst:.3g}); " + _mismatch_advice(layer, got, cols)
        )
    return weight


@contextlib.contextmanager
def keep_layout(model: nn.Module) -> Iterator[None]:
    """Within the block, bitsandbytes 4-bit layers of ``model`` keep their storage layout.

    On CPUs with AVX512-BF16, bitsandbytes converts a 4-bit weight to its CPU layout on the first
    eval-mode forward, and converts it back (re-quantizing the block scales) whenever a state dict
    is taken; each conversion changes the weight the layer computes with by up to about one bf16
    step. loramerge's own forward passes must not do that to the caller's model, so they run with
    the conversion switched off: the model keeps computing with the weight it had.
    """
    switched: list[Any] = []
    try:
        for layer in quantized_layers(model).values():
            if getattr(layer, "support_avx512bf16_for_cpu", False):
                cast(Any, layer).support_avx512bf16_for_cpu = False
                switched.append(layer)
        yield
    finally:
        for layer in switched:
            layer.support_avx512bf16_for_cpu = True
