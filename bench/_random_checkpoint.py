"""Shared by the benchmarks: a random Qwen2-shaped bf16 checkpoint and an r=16 all-projection PEFT adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_qwen2_checkpoint(
    root: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    max_shard_size: str = "5GB",
) -> tuple[Path, Path]:
    """Write ``root/base`` (random weights, N(0, 0.02), tied embeddings) and ``root/adapter``
    (r=16, alpha=32, non-zero updates on all seven projections). Returns both paths."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(root / "base", max_shard_size=max_shard_size)
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=PROJECTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"
