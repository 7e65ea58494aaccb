"""Benchmark: adapter mode or merged? ``loramerge.bench`` on a random Qwen2- or Llama-shaped model.

Creates a random bf16 checkpoint of the chosen shape and an r=16 adapter on all seven projections,
then runs :func:`loramerge.bench` (base, PEFT adapter mode, merged, held together, warmed up at
the measured shapes and timed interleaved; prefill and decode tokens/s at each batch size, median
and spread of the repeats, memory) and writes the table and JSON.

Usage::

    python bench/adapter_vs_merged.py [--shape qwen2-0.5b|qwen2-1.5b|llama-8b] [--layers N] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _random_checkpoint import random_qwen2_checkpoint

SHAPES = {
    "qwen2-0.5b": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151936},
    "qwen2-1.5b": {"hidden": 1536, "intermediate": 8960, "layers": 28, "heads": 12, "kv_heads": 2, "vocab": 151936},
    # Llama-3-8B widths, built as a Qwen2-architecture model (the same projections; biases on q/k/v)
    "llama-8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--layers", type=int, help="override the depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "adapter_vs_merged.json")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    import loramerge

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = random_qwen2_checkpoint(Path(tmp), **shape)
        report = loramerge.bench(
            base,
            adapter,
            device=args.device,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            batches=[int(b) for b in args.batches.split(",")],
            repeats=args.repeats,
        )
    print(f"shape {args.shape} ({shape['layers']} layers)")
    print(report)
    report.save(args.json)


if __name__ == "__main__":
    main()
