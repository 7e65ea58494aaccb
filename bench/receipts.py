"""Benchmark: how large an exact-unmerge receipt is, relative to the base's adapted tensors.

Builds Qwen2-1.5B-shaped projection weights (N(0, 0.02); ``--layers`` layers, seven projections
each) and r=16 LoRA updates whose size is ‖ΔW‖ = ``delta`` × ‖W‖ per tensor, merges each tensor
with loramerge's merge and records the receipt that turns the plain unmerge back into the base.
Reports, per dtype and update size, the receipt's bytes over the bytes of the adapted base tensors
and the fraction of elements a plain unmerge gets wrong.

Usage::

    python bench/receipts.py [--layers 2] [--deltas 0.01,0.02,0.05,0.2,1.0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loramerge.formats.receipts import encode
from loramerge.numerics.delta import LoraUpdate, merge_tensor_, unmerge_tensor_

SHAPES = {  # Qwen2-1.5B: out x in
    "q_proj": (1536, 1536),
    "k_proj": (256, 1536),
    "v_proj": (256, 1536),
    "o_proj": (1536, 1536),
    "gate_proj": (8960, 1536),
    "up_proj": (8960, 1536),
    "down_proj": (1536, 8960),
}


def measure(dtype: torch.dtype, delta: float, layers: int, rank: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    receipt_bytes = 0
    base_bytes = 0
    wrong = 0
    elements = 0
    for _ in range(layers):
        for out_f, in_f in SHAPES.values():
            w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)
            a = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, rank, generator=gen)
            scale = float(delta * w.float().norm() / (b @ a).norm())
            up = LoraUpdate("linear", a, b, scale)
            merged = w.clone()
            merge_tensor_(merged, [up])
            recovered = merged.clone()
            unmerge_tensor_(recovered, [up])
            entry = encode(w, recovered)
            receipt_bytes += entry.nbytes
            base_bytes += w.numel() * w.element_size()
            wrong += int((w.view(torch.uint8) != recovered.view(torch.uint8)).reshape(w.numel(), -1).any(dim=1).sum())
            elements += w.numel()
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "delta": delta,
        "receipt_fraction": receipt_bytes / base_bytes,
        "wrong_fraction": wrong / elements,
        "receipt_mb": receipt_bytes / 1e6,
        "base_mb": base_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--deltas", default="0.01,0.02,0.05,0.2,1.0")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "receipts.json")
    args = parser.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for delta in (float(d) for d in args.deltas.split(",")):
            rows.append(measure(dtype, delta, args.layers, args.rank))
    print(f"Qwen2-1.5B projections, {args.layers} layers, r={args.rank}: receipt size / adapted base tensors")
    print(f"{'dtype':10}{'‖ΔW‖/‖W‖':>10}{'receipt':>10}{'elements a plain unmerge misses':>34}")
    for r in rows:
        print(
            f"{r['dtype']:10}{r['delta']:>10g}{100 * r['receipt_fraction']:>9.2f}%{100 * r['wrong_fraction']:>33.2f}%"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
