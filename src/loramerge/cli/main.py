"""The ``loramerge`` command line: ``demo``, ``inspect``, ``merge``, ``unmerge``, ``verify``, ``push``, ``lineage``, ``bench``.

Exit codes: 0 success, 1 a verification failed, 2 bad input (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

from loramerge.cli.lean_imports import without_bitsandbytes
from loramerge.cli.parser import build_parser
from loramerge.errors import LoraMergeError, VerificationError

# Commands import what they use when they run: `loramerge --version`, `--help` and argument errors
# answer without importing torch (seconds).

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    from loramerge.operations.benchmark import bench

    report = bench(
        args.base,
        args.adapter,
        device=args.device,
        dtype=args.dtype,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batches=[int(b) for b in args.batches.split(",")],
        repeats=args.repeats,
    )
    print(report)
    if args.json:
        report.save(args.json)
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from loramerge.formats.lineage_records import lineage

    rounds = lineage(args.path)
    if args.json:
        print(json.dumps(rounds, indent=2))
        return 0
    if not rounds:
        print(f"{args.path}: no lineage recorded (not merged by loramerge, or every round unmerged)")
        return 0
    print(f"{args.path}: {len(rounds)} round(s), oldest first")
    for i, r in enumerate(rounds, start=1):
        v = r.get("verification") or {}
        status = "verified" if v.get("passed") else ("FAILED" if v.get("passed") is False else "not verified")
        receipt = f", receipt {r['receipt']}" if r.get("receipt") else ""
        print(
            f"  {i}. {r['adapter'].get('source')}  sha256 {str(r['adapter'].get('sha256'))[:12]}  {r.get('dtype')}  "
            f"{status}  {r.get('time')}{receipt}"
        )
    return 0


def _push(args: argparse.Namespace) -> int:
    from loramerge.operations.hub import push_to_hub

    info = push_to_hub(
        args.source,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        endpoint=args.endpoint,
        base_model=args.base_model,
    )
    print(f"pushed {args.source} to {args.repo_id}: {info.pr_url or info.commit_url}")
    return 0


def _inspect_checkpoint(root: Path, as_json: bool) -> int:
    from loramerge.formats.io import read_json_object
    from loramerge.formats.shards import CheckpointReader
    from loramerge.plan.quant_spec import describe_checkpoint_quantization

    config = read_json_object(root / "config.json", "config") if (root / "config.json").is_file() else {}
    reader = CheckpointReader(root)
    dtypes: dict[str, int] = {}
    for info in reader.tensors.values():
        key = str(info.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    data = {
        "path": str(root),
        "architectures": config.get("architectures") or [],
        "tensors": len(reader.names),
        "bytes": reader.total_bytes,
        "files": list(reader.files),
        "dtypes": dtypes,
        "quantization": describe_checkpoint_quantization(config),
        "quantization_config": config.get("quantization_config"),
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    archs = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    print(f"checkpoint {root}: {', '.join(archs) or 'unknown architecture'}")
    print(f"  {data['tensors']} tensors, {reader.total_bytes / 1e9:.3f} GB in {len(reader.files)} file(s)")
    print("  dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    print(f"  quantization: {data['quantization']}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    root = Path(args.adapter)
    if (root / "config.json").is_file() and not (root / "adapter_config.json").is_file():
        return _inspect_checkpoint(root, args.json)
    from loramerge.formats.adapter import load_adapter

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
            "merged_by_peft": dict(adapter.variant_modules),
        }
        print(json.dumps(data, indent=2))
    else:
        print(adapter.summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from loramerge.formats.adapter import load_adapter
    from loramerge.formats.loading import load_base, resolve_dtype
    from loramerge.operations.checkpoint_verify import verify_checkpoint
    from loramerge.operations.hub_verify import verify_hub
    from loramerge.operations.verification import verify

    if args.hub:
        if args.base or args.adapter or args.merged:
            raise ValueError("--hub REPO_ID takes no BASE ADAPTER MERGED")
        hub_report = verify_hub(args.hub, revision=args.revision, endpoint=args.endpoint)
        print(json.dumps(hub_report.to_dict(), indent=2) if args.json else hub_report)
        return 0 if hub_report.passed else 1
    if not (args.base and args.adapter and args.merged):
        raise ValueError("verify needs BASE ADAPTER MERGED, or --hub REPO_ID")
    from loramerge.numerics.tolerance import Tolerance

    tolerance = Tolerance(factor=args.factor) if args.factor is not None else Tolerance()
    adapter = load_adapter(args.adapter)
    report = verify_checkpoint(args.base, adapter, args.merged, tolerance=tolerance, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if args.model and report.passed:
        dtype = resolve_dtype(args.dtype)
        full = verify(
            load_base(args.base, dtype=dtype), adapter, load_base(args.merged, dtype=dtype), tolerance=tolerance
        )
        print(json.dumps(full.to_dict(), indent=2) if args.json else full)
        return 0 if full.passed else 1
    return 0 if report.passed else 1


def _stream_command(args: argparse.Namespace) -> int:
    from loramerge.operations.checkpoint import CheckpointMergeReport, merge_checkpoint
    from loramerge.operations.checkpoint_unmerge import unmerge_checkpoint
    from loramerge.plan.quant_spec import QuantSpec

    report: CheckpointMergeReport
    try:
        if args.command == "merge":
            mode: bool | Literal["model"] = False if args.no_verify else ("model" if args.verify_model else True)
            quant = {
                k: v
                for k, v in (
                    ("quant_type", args.quant_type),
                    ("double_quant", False if args.no_double_quant else None),
                    ("blocksize", args.blocksize),
                )
                if v is not None
            }
            if quant and args.qlora_base is None:
                raise ValueError("--quant-type, --no-double-quant and --blocksize need --qlora-base")
            report = merge_checkpoint(
                args.base,
                args.adapter,
                args.output,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                verify=mode,
                qlora_base=args.qlora_base,
                quantization=QuantSpec.of(quant) if args.qlora_base is not None else None,
                base_revision=args.base_revision,
                adapter_revision=args.adapter_revision,
                endpoint=args.endpoint,
                receipt=args.receipt,
            )
        else:
            report = unmerge_checkpoint(
                args.merged,
                args.adapter,
                args.output,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                verify=not args.no_verify,
                receipt=False if args.no_receipt else args.receipt,
                force=args.force,
            )
    except VerificationError as e:
        print(e.report, file=sys.stderr)
        print(f"loramerge {args.command}: verification FAILED; nothing was written to {args.output}", file=sys.stderr)
        return 1
    print(report)
    return 0


def _quiet_transformers() -> None:
    """Errors only from transformers, and no Hub or transformers progress bars (ours stay), without
    importing transformers: it reads both settings when some command first imports it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        cast(Any, hf_logging).set_verbosity_error()
    from huggingface_hub import utils as hub_utils

    cast(Any, hub_utils).disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loramerge`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        _quiet_transformers()
    try:
        if args.command == "demo":
            from loramerge.cli.demo import run_demo
            from loramerge.formats.loading import resolve_dtype

            dtype = resolve_dtype(args.dtype)
            assert dtype is not None
            return 0 if run_demo(args.workdir, dtype=dtype) else 1
        if args.command == "inspect":
            return _inspect(args)
        if args.command in ("merge", "unmerge"):
            with without_bitsandbytes(args):
                return _stream_command(args)
        if args.command == "push":
            return _push(args)
        if args.command == "lineage":
            return _lineage(args)
        if args.command == "bench":
            return _bench(args)
        with without_bitsandbytes(args):
            return _verify(args)
    except (LoraMergeError, ValueError) as e:
        print(f"loramerge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the one error contract: a failed operation exits 2, with the thing and the reason named
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"loramerge {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loramerge {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
