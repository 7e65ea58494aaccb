"""Quantization settings a checkpoint merge simulates or reads from a config: bitsandbytes' 4-bit
and 8-bit formats as a :class:`QuantSpec`, which tensors they quantize, and simulating them
exactly. (:mod:`loramerge.numerics.quantized` handles quantized layers of a live model.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch

from loramerge.errors import InvalidArgumentError
from loramerge.numerics.quantized import _UNSUPPORTED_ADVICE, _bnb, _dequantize_standard

__all__ = [
    "QuantSpec",
    "bnb_config",
    "checkpoint_quantization",
    "describe_checkpoint_quantization",
    "quantizable",
    "simulate",
]


@dataclass(frozen=True)
class QuantSpec:
    """The bitsandbytes quantization a QLoRA adapter was trained on (for ``qlora_base="simulated"``).

    Defaults are the QLoRA paper's and the usual ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``.

    Attributes:
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"`` (LLM.int8, ``load_in_8bit``).
        double_quant: 4-bit only: quantize the block scales too.
        blocksize: 4-bit only: elements per block scale.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4", "int8"):
            raise InvalidArgumentError(f"quant_type {self.quant_type!r}: use 'nf4', 'fp4' or 'int8'")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise InvalidArgumentError(
                f"blocksize {self.blocksize}: bitsandbytes supports powers of two from 32 to 4096"
            )

    @classmethod
    def of(cls, value: Any) -> QuantSpec:
        """A spec from ``None`` (defaults), a spec, a quant type (``"nf4"``), a dict of this class's
        fields, or a transformers ``BitsAndBytesConfig``."""
        if value is None:
            return cls()
        if isinstance(value, QuantSpec):
            return value
        if isinstance(value, str):
            return cls(quant_type=value)
        if isinstance(value, dict):
            return cls(**value)
        if hasattr(value, "load_in_8bit") or hasattr(value, "bnb_4bit_quant_type"):
            if getattr(value, "load_in_8bit", False):
                return cls(quant_type="int8", double_quant=False)
            return cls(quant_type=str(value.bnb_4bit_quant_type), double_quant=bool(value.bnb_4bit_use_double_quant))
        raise InvalidArgumentError(f"cannot read a quantization spec from {type(value).__name__}")

    def describe(self) -> str:
        """E.g. ``nf4, double quantization, blocks of 64``."""
        if self.quant_type == "int8":
            return "int8 (LLM.int8)"
        dq = "double quantization" if self.double_quant else "no double quantization"
        return f"{self.quant_type}, {dq}, blocks of {self.blocksize}"


_NOT_QUANTIZED = ("embed", "wte", "wpe", "lm_head", "word_embeddings", "position_embeddings", "score", "classifier")


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether transformers' bitsandbytes integration quantizes this checkpoint tensor: the 2-D
    weight of a linear layer, except embeddings and output heads (``lm_head``, classifiers)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    return not any(key in name for key in _NOT_QUANTIZED)


def simulate(tensor: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """What a bitsandbytes layer loaded from ``tensor`` with ``spec`` computes with (quantized by
    bitsandbytes itself, dequantized as every backend computes it, in ``tensor``'s dtype), as fp32."""
    functional = _bnb().functional
    if spec.quant_type == "int8":
        codes, scales, _ = functional.int8_vectorwise_quant(tensor.detach().to(torch.float16).contiguous())
        return cast(torch.Tensor, functional.int8_vectorwise_dequant(codes, scales).float())
    packed, state = functional.quantize_4bit(
        tensor.detach().contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
    )
    return _dequantize_standard(packed, state, tensor.dtype).reshape(tensor.shape)


def bnb_config(spec: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The transformers ``BitsAndBytesConfig`` that loads a model quantized as ``spec``."""
    import transformers

    config_cls: Any = transformers.BitsAndBytesConfig
    if spec.quant_type == "int8":
        return config_cls(load_in_8bit=True)
    return config_cls(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """The ``quant_method`` of a checkpoint's ``config.json`` (``None`` when not quantized)."""
    qconfig = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not isinstance(qconfig, dict):
        return None
    return str(qconfig.get("quant_method", "unknown"))


def describe_checkpoint_quantization(config: dict[str, Any]) -> str:
    """One line about a checkpoint's quantization, e.g. ``bitsandbytes 4-bit nf4, double quantization``."""
    method = checkpoint_quantization(config)
    if method is None:
        return "not quantized"
    qconfig = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config") or {}
    if method != "bitsandbytes":
        return f"{method} (not supported: {_UNSUPPORTED_ADVICE})"
    if qconfig.get("load_in_8bit"):
        return "bitsandbytes 8-bit (LLM.int8)"
    dq = "double quantization" if qconfig.get("bnb_4bit_use_double_quant") else "no double quantization"
    return f"bitsandbytes 4-bit {qconfig.get('bnb_4bit_quant_type', 'fp4')}, {dq}"
