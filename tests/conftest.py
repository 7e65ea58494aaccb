"""Tiny random models built from configs, and real PEFT adapters for them (no network)."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

from loramerge.numerics.tolerance import ulp

hf_logging.set_verbosity_error()
# the same examples on every run, so that CI cannot fail by the draw (an example that once failed is
# kept with @example in the test itself)
settings.register_profile("loramerge", derandomize=True)
settings.load_profile("loramerge")
hf_logging.disable_progress_bar()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(tie: bool = False) -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
        )
    )


def tiny_qwen2() -> nn.Module:
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    )


def tiny_bert() -> nn.Module:
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
        )
    )


def tiny_vit() -> nn.Module:
    return ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
        )
    )


@dataclass(frozen=True)
class Case:
    """One architecture + LoRA variant: how to build the base and the adapter(s)."""

    id: str
    build: Callable[[], nn.Module]
    lora: dict[str, Any]
    extra_adapters: tuple[dict[str, Any], ...] = ()
    perturb: tuple[str, ...] = ()  # substrings of adapter-replaced params to change ("training")
    needs_originals: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)


CASES: list[Case] = [
    Case(
        "llama-linear-patterns",
        tiny_llama,
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": LLAMA_PROJ,
            "rank_pattern": {"down_proj": 4},
            "alpha_pattern": {"v_proj": 4},
        },
    ),
    Case(
        "qwen2-rslora-lorabias",
        tiny_qwen2,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj"],
            "use_rslora": True,
            "lora_bias": True,
        },
    ),
    Case(
        "gpt2-conv1d-biasloraonly",
        tiny_gpt2,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
            "fan_in_fan_out": True,
            "bias": "lora_only",
        },
        perturb=(".bias",),
        needs_originals=True,
    ),
    Case(
        "bert-seqcls-modules-to-save",
        tiny_bert,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
            "task_type": "SEQ_CLS",
        },
        perturb=("classifier",),
        needs_originals=True,
    ),
    Case(
        "llama-tied-embedding",
        lambda: tiny_llama(tie=True),
        {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
        tags=frozenset({"tied"}),
    ),
    Case("vit-conv2d", tiny_vit, {"r": 4, "lora_alpha": 8, "target_modules": ["projection", "query", "value"]}),
    Case(
        "llama-dora",
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
    ),
    Case(
        "qwen2-bias-all",
        tiny_qwen2,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"], "bias": "all"},
        perturb=(".bias",),
        needs_originals=True,
    ),
    Case(
        "llama-two-adapters",
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        extra_adapters=({"r": 2, "lora_alpha": 4, "target_modules": ["v_proj", "down_proj"]},),
    ),
]
CASE_IDS = [c.id for c in CASES]


def make_base(case: Case, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build().to(dtype)
    model.eval()
    return model


def save_adapter(
    base: nn.Module, lora: dict[str, Any], out: Path, *, seed: int = 1, perturb: tuple[str, ...] = ()
) -> Path:
    """Make a real PEFT adapter with non-zero deltas on a copy of ``base`` and save it to ``out``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**{"init_lora_weights": False, **lora}))
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    # a trained magnitude differs from the initial ‖W + ΔW‖
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen).to(p.dtype))
                elif "lora_" in name and not p.any():  # a factor some variant starts at zero whatever
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))  # init_lora_weights says (BD-LoRA's B)
                if p.requires_grad and "lora_" not in name and any(s in name for s in perturb):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
        peft_model.save_pretrained(out)
    return out


def peft_merge(base: nn.Module, adapter_dirs: list[Path]) -> nn.Module:
    """PEFT's own merge_and_unload of the adapters, in order, on a copy of ``base``."""
    from peft import PeftModel

    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name="a0")
        for i, d in enumerate(adapter_dirs[1:], start=1):
            pm.load_adapter(str(d), adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(adapter_dirs))]
        return pm.merge_and_unload(adapter_names=names)


def within_ulp(
    actual: torch.Tensor, expected: torch.Tensor, n_ulp: float, dtype: torch.dtype, slack: float = 0.0
) -> bool:
    """Elementwise |actual - expected| <= n_ulp * ulp(expected in dtype) + slack."""
    a, e = actual.detach().double(), expected.detach().double()
    return bool(((a - e).abs() <= n_ulp * ulp(e, dtype).double() + slack).all())


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]
