"""Benchmark: what each way of merging a QLoRA adapter costs, measured against the QLoRA model itself.

Builds a random Qwen2-shaped bf16 base (weights N(0, 0.02)) and an r=16 adapter on all seven
projections whose update is scaled to a realistic size (``--delta``: ‖ΔW‖ / ‖W‖ per layer, 2 % by
default; fine-tuned adapters are typically a few percent). For each quantization format it loads
the base with bitsandbytes, attaches the adapter (the QLoRA model), and compares on probe inputs
(relative RMS error of the logits against the QLoRA model's adapter mode evaluated exactly):

* ``adapter mode``: the QLoRA model itself, run in its compute dtype (the floor any merge is judged by)
* ``dequantize``: ``loramerge.merge`` default, a bf16 model
* ``requantize``: ``loramerge.merge(quantized="requantize")``, the base's 4/8-bit format again
* ``original``: the adapter merged into the original 16-bit weights (what Unsloth-style merges do)
* ``no adapter``: the quantized base without the adapter (how large the adapter's effect is)

and, per layer, ``‖W_simulated − W_original‖ / ‖ΔW‖`` (from ``merge_checkpoint(qlora_base=...)``).

Usage::

    python bench/qlora.py [--shape tiny|qwen2-1.5b] [--layers 2] [--formats nf4,fp4,int8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

SHAPES = {
    "tiny": {"hidden": 256, "inter": 704, "heads": 4, "kv": 2, "vocab": 4096},
    "qwen2-1.5b": {"hidden": 1536, "inter": 8960, "heads": 12, "kv": 2, "vocab": 151936},
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORMATS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
    "int8": {"load_in_8bit": True},
}


def build(root: Path, shape: dict[str, int], layers: int, delta: float) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(root / "base")
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=PROJECTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, lora)
    with torch.no_grad():  # scale each update to ‖ΔW‖ = delta * ‖W‖
        for module in pm.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                w = module.base_layer.weight.float()
                dw = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                module.lora_B["default"].weight.mul_(delta * w.norm() / dw.norm())
    pm.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def measure(base: Path, adapter_dir: Path, fmt: str, device: str, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import loramerge
    from loramerge.numerics.tolerance import relative_errors
    from loramerge.proof.model_runs import make_probes, run_model
    from loramerge.proof.output_checks import reference_outputs

    adapter = loramerge.load_adapter(adapter_dir)
    config = BitsAndBytesConfig(**FORMATS[fmt], bnb_4bit_compute_dtype=torch.bfloat16)

    def qlora_model() -> Any:
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map=device, dtype="auto")
        return loramerge.attach(model, adapter)

    pm = qlora_model()
    probes = {k: v.to(device) for k, v in make_probes(pm, seed=0).items()}
    ref = reference_outputs(pm, probes)
    row: dict[str, Any] = {"format": fmt, "adapter mode": relative_errors(ref.adapter, ref.reference)[0]}
    with pm.disable_adapter():
        row["no adapter"] = relative_errors(run_model(pm, probes), ref.reference)[0]

    for mode in ("dequantize", "requantize"):
        model = qlora_model()
        started = time.perf_counter()
        try:
            result = loramerge.merge(model, quantized=mode, probes=probes)  # type: ignore[arg-type]
        except loramerge.VerificationError as e:  # reported, with the model it made
            result = e.result
        row[f"{mode} s"] = time.perf_counter() - started
        row[mode] = relative_errors(run_model(result.model, probes), ref.reference)[0]
        row[f"{mode} passed"] = result.passed
        del model, result

    original = loramerge.load_base(base, device=device)
    merged = loramerge.merge(original, adapter, check_outputs=False).model
    row["original"] = relative_errors(run_model(merged, probes), ref.reference)[0]
    del original, merged

    spec = {"nf4": "nf4", "fp4": {"quant_type": "fp4", "double_quant": False}, "int8": "int8"}[fmt]
    report = loramerge.merge_checkpoint(
        base, adapter_dir, out / f"orig-{fmt}", qlora_base="original", quantization=spec, verify=False, progress=False
    )
    gaps = list(report.qlora_gap.values())
    row["gap median"] = statistics.median(gaps)
    row["gap max"] = max(gaps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--delta", type=float, default=0.02, help="‖ΔW‖ / ‖W‖ of each adapted layer")
    parser.add_argument("--formats", default="nf4,fp4,int8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qlora.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = build(root, SHAPES[args.shape], args.layers, args.delta)
        for fmt in args.formats.split(","):
            rows.append(measure(base, adapter, fmt, args.device, root))
            print(f"measured {fmt}", file=sys.stderr)
    cols = ["adapter mode", "dequantize", "requantize", "original", "no adapter", "gap median", "gap max"]
    print(f"shape {args.shape}, {args.layers} layers, ‖ΔW‖/‖W‖ = {args.delta}, device {args.device}")
    print("relative RMS error of the logits against the QLoRA model's adapter mode (exact):")
    print(f"{'format':8}" + "".join(f"{c:>14}" for c in cols) + f"{'dequant s':>11}{'requant s':>11}")
    for r in rows:
        print(
            f"{r['format']:8}"
            + "".join(f"{r[c]:>14.3g}" for c in cols)
            + f"{r['dequantize s']:>11.2f}{r['requantize s']:>11.2f}"
            + ("" if r["requantize passed"] else "  (requantize FAILED its check: adapter erased)")
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": args.shape, "layers": args.layers, "delta": args.delta, "device": args.device}
    args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
