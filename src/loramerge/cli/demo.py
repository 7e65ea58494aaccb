"""A self-contained demonstration of the lifecycle on a tiny random model (no network)."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from loramerge.formats.adapter import load_adapter
from loramerge.formats.loading import load_base
from loramerge.operations.inmemory import merge
from loramerge.operations.inmemory_unmerge import unmerge
from loramerge.operations.verification import verify
from loramerge.plan.peft_glue import attach

__all__ = ["build_tiny_checkpoint", "run_demo"]


def build_tiny_checkpoint(root: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny random Llama checkpoint and a real PEFT LoRA adapter for it under ``root``.

    The adapter targets all attention and MLP projections with non-zero updates
    (``init_lora_weights=False``), rank 8, rsLoRA off, one ``rank_pattern`` entry.

    Returns:
        ``(base_dir, adapter_dir)``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    base: Any = LlamaForCausalLM(config)
    base = base.to(dtype)
    base_dir, adapter_dir = root / "base", root / "adapter"
    base.save_pretrained(base_dir)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def run_demo(
    workdir: Path | None = None, *, dtype: torch.dtype = torch.bfloat16, echo: Callable[[str], None] = print
) -> bool:
    """Run load → attach → merge → verify → save → reload → unmerge on a tiny model, printing reports.

    Returns:
        Whether every verification passed.
    """
    with tempfile.TemporaryDirectory(prefix="loramerge-demo-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        echo(f"1. building a tiny random Llama ({dtype}) and a real PEFT adapter in {root}")
        base_dir, adapter_dir = build_tiny_checkpoint(root, dtype=dtype)
        adapter = load_adapter(adapter_dir)
        echo("\n2. the adapter (loramerge inspect):")
        echo(adapter.summary())
        echo("\n3. attach (adapter mode) and merge, verified against adapter mode:")
        model = attach(load_base(base_dir), adapter)
        result = merge(model)
        echo(str(result.report))
        echo("\n4. verify the merged model against a freshly loaded base:")
        report = verify(load_base(base_dir), adapter, result.model)
        echo(str(report))
        merged_dir = root / "merged"
        cast(Any, result.model).save_pretrained(merged_dir)
        echo(f"\n5. saved the merged model to {merged_dir}; reloaded it and unmerged the saved adapter:")
        back = unmerge(load_base(merged_dir), adapter)
        echo(str(back))
        base = load_base(base_dir)
        worst = 0.0
        recovered = dict(back.model.named_parameters())
        for name, p in base.named_parameters():
            worst = max(worst, float((recovered[name].detach().float() - p.detach().float()).abs().max()))
        echo(f"\n6. largest difference between the recovered and the original base weights: {worst:.3g}")
        ok = result.passed and report.passed and back.passed and worst <= back.max_error_bound
        echo("\ndemo: all checks passed" if ok else "\ndemo: SOME CHECKS FAILED")
        return ok
