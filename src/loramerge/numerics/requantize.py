"""bitsandbytes layers made and unmade: a dequantized layer as a plain ``Linear``, a merged weight
quantized again, a model's quantization config forgotten, and the CPU weight layout kept as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from loramerge.numerics.quantized import _bnb, dequantize, quant_format, quantized_layers


@contextlib.contextmanager
def exact_forward(model: nn.Module) -> Iterator[None]:
    """Within the block, every bitsandbytes layer computes ``x @ dequantize(layer).T + bias`` in the
    dtype of ``x`` (its stored weight, evaluated exactly by a widened run), not in its compute dtype."""
    patched: list[nn.Module] = []
    try:
        for module in quantized_layers(model).values():

            def forward(x: torch.Tensor, *args: Any, _layer: nn.Module = module, **kwargs: Any) -> torch.Tensor:
                w = dequantize(_layer).to(x.dtype)
                bias = cast(torch.Tensor | None, getattr(_layer, "bias", None))
                return nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

            module.forward = forward
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def dequantized_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (any dtype) and ``layer``'s bias (converted to ``weight``'s dtype)."""
    out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
    bias = cast(torch.Tensor | None, getattr(layer, "bias", None))
    new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return new


def requantize(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A new bitsandbytes layer in ``layer``'s format holding ``weight`` (quantized by bitsandbytes)
    and ``bias`` (default: ``layer``'s)."""
    bnb = _bnb()
    fmt = quant_format(layer)
    old_weight = cast(Any, layer.weight)
    if bias is None:
        bias = cast(torch.Tensor | None, getattr(layer, "bias", None))
    out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
    device = weight.device
    new: nn.Module
    if fmt.method == "bnb-8bit":
        threshold = float(getattr(getattr(layer, "state", None), "threshold", 0.0))
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
        new.weight = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        state = old_weight.quant_state
        dtype = getattr(state, "original_dtype", state.dtype) if fmt.cpu_packed else state.dtype
        storage = getattr(state, "original_storage_type", None) or old_weight.quant_storage
        new = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=bias is not None,
            compute_dtype=getattr(layer, "compute_dtype", None),
            compress_statistics=fmt.double_quant,
            quant_type=fmt.quant_type,
            quant_storage=storage,
        )
        new.weight = bnb.nn.Params4bit(
            weight.to(dtype).cpu(),
            requires_grad=False,
            quant_type=fmt.quant_type,
            blocksize=fmt.blocksize,
            compress_statistics=fmt.double_quant,
            quant_storage=storage,
        )
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
    return new.to(device)


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    except Exception:
        return True
    return True


def forget_quantization(model: nn.Module, dtype: torch.dtype) -> None:
    """Make a fully dequantized transformers model save and load as a plain ``dtype`` model."""
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__:
        model.__dict__["is_quantized"] = False
    conversions = model.__dict__.get("_weight_conversions")
    if isinstance(conversions, list):  # transformers records how it read the quantized tensors; drop those steps
        model.__dict__["_weight_conversions"] = [c for c in conversions if _reversible(c)]
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        for key in ("dtype", "torch_dtype"):
            if key in config.__dict__:
                setattr(config, key, dtype)
