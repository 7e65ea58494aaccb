"""The loramerge lifecycle on a tiny random model, end to end (CPU, no network, a few seconds).

Run: ``python examples/quickstart.py``. Notebooks will live next to this script.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loramerge as lm


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="loramerge-example-"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "base")

    # A "trained" adapter: PEFT with non-zero updates (init_lora_weights=False).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        get_peft_model(lm.load_base(root / "base"), lora).save_pretrained(root / "adapter")

    adapter = lm.load_adapter(root / "adapter")
    print(adapter.summary())

    result = lm.merge(lm.load_base(root / "base"), adapter)  # attach + merge + verify
    print(result.report)
    result.model.save_pretrained(root / "merged")

    report = lm.verify(lm.load_base(root / "base"), adapter, lm.load_base(root / "merged"))
    print(report)

    back = lm.unmerge(lm.load_base(root / "merged"), adapter)
    print(back)
    assert result.passed and report.passed and back.passed
    print(f"\nall checks passed; files in {root}")


if __name__ == "__main__":
    main()
