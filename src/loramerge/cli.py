"""The ``loramerge`` command line: ``demo``, ``inspect``, ``verify``.

Exit codes: 0 success, 1 a verification failed, 2 bad input (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramerge import __version__
from loramerge.adapter import load_adapter
from loramerge.errors import LoraMergeError
from loramerge.loading import load_base, resolve_dtype
from loramerge.tolerance import Tolerance
from loramerge.verification import verify

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramerge", description="Merge, unmerge and verify LoRA adapters, with numerical proof."
    )
    parser.add_argument("--version", action="version", version=f"loramerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole lifecycle on a built-in tiny model (no network)")
    demo.add_argument("--dtype", default="bf16", help="dtype of the tiny model: fp32, bf16 or fp16 (default bf16)")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files here instead of a temporary folder")

    inspect = sub.add_parser("inspect", help="show an adapter's targets, ranks, scales and sizes")
    inspect.add_argument("adapter", type=Path, help="PEFT adapter directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ver = sub.add_parser("verify", help="verify that MERGED is BASE with ADAPTER merged in")
    ver.add_argument("base", type=Path, help="base model directory")
    ver.add_argument("adapter", type=Path, help="PEFT adapter directory")
    ver.add_argument("merged", type=Path, help="merged model directory")
    ver.add_argument("--dtype", help="load both models in this dtype (default: as stored)")
    ver.add_argument("--factor", type=float, default=Tolerance.factor, help="tolerance factor (default %(default)s)")
    ver.add_argument("--no-outputs", action="store_true", help="skip the whole-model output check")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _inspect(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.adapter)
    if args.json:
        data = {
            "path": str(adapter.path),
            "base_model": adapter.base_model_name_or_path,
            "parameters": adapter.num_parameters(),
            "modules": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "rank": m.rank,
                    "alpha": m.alpha,
                    "scale": m.scale,
                    "dora": m.use_dora,
                    "lora_A": list(m.update.lora_A.shape),
                    "lora_B": list(m.update.lora_B.shape),
                }
                for m in adapter.modules.values()
            ],
            "replaced": {
                n: {"kind": adapter.replaced_kinds[n], "shape": list(t.shape)} for n, t in adapter.replaced.items()
            },
        }
        print(json.dumps(data, indent=2))
    else:
        print(adapter.summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    dtype = resolve_dtype(args.dtype)
    adapter = load_adapter(args.adapter)
    base = load_base(args.base, dtype=dtype)
    merged = load_base(args.merged, dtype=dtype)
    report = verify(
        base,
        adapter,
        merged,
        tolerance=Tolerance(factor=args.factor),
        check_outputs=False if args.no_outputs else "auto",
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loramerge`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            from transformers.utils import logging as hf_logging

            hf_log: Any = hf_logging
            hf_log.set_verbosity_error()
            hf_log.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    try:
        if args.command == "demo":
            from loramerge.demo import run_demo

            dtype = resolve_dtype(args.dtype)
            assert dtype is not None
            return 0 if run_demo(args.workdir, dtype=dtype) else 1
        if args.command == "inspect":
            return _inspect(args)
        return _verify(args)
    except (LoraMergeError, ValueError) as e:
        print(f"loramerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
