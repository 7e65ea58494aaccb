"""The command line's grammar: every subcommand of ``loramerge`` with its arguments and help.
Importing it is cheap (no torch), so ``--help`` and ``--version`` answer at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from loramerge import __version__

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramerge", description="Merge, unmerge and verify LoRA adapters, with numerical proof."
    )
    parser.add_argument("--version", action="version", version=f"loramerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_inspect(sub)
    _add_merge(sub)
    _add_unmerge(sub)
    _add_bench(sub)
    _add_lineage(sub)
    _add_verify(sub)
    _add_push(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run the whole lifecycle on a built-in tiny model (no network)")
    demo.add_argument("--dtype", default="bf16", help="dtype of the tiny model: fp32, bf16 or fp16 (default bf16)")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files here instead of a temporary folder")


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = sub.add_parser(
        "inspect", help="show an adapter's targets, ranks, scales and sizes, or a checkpoint's tensors and quantization"
    )
    inspect.add_argument("adapter", type=Path, help="PEFT adapter directory, or a model checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_merge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    merge = sub.add_parser("merge", help="merge ADAPTER into the checkpoint BASE, streaming, into OUT")
    merge.add_argument("base", type=Path, help="base checkpoint directory (safetensors, single or sharded)")
    merge.add_argument("adapter", type=Path, help="PEFT adapter directory")
    merge.add_argument("-o", "--output", type=Path, required=True, help="output directory (must not exist)")
    merge.add_argument("--dtype", help="convert floating tensors to this dtype (default: keep)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default %(default)s)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.add_argument("--no-verify", action="store_true", help="skip verification")
    merge.add_argument("--verify-model", action="store_true", help="also load both models and check their outputs")
    merge.add_argument(
        "--qlora-base",
        choices=["simulated", "original"],
        help="a QLoRA adapter: merge into the base as bitsandbytes quantized it (simulated) or into the 16-bit "
        "weights (original); the summary says how far the two are apart",
    )
    merge.add_argument(
        "--quant-type", choices=["nf4", "fp4", "int8"], help="with --qlora-base: the quantization trained on (nf4)"
    )
    merge.add_argument("--no-double-quant", action="store_true", help="with --qlora-base: no double quantization")
    merge.add_argument("--blocksize", type=int, help="with --qlora-base: 4-bit block size (default 64)")
    merge.add_argument(
        "--receipt", action="store_true", help="also write the receipt that lets unmerge restore BASE byte for byte"
    )
    merge.add_argument("--base-revision", help="BASE is a Hub repo id: its branch, tag or commit")
    merge.add_argument("--adapter-revision", help="ADAPTER is a Hub repo id: its branch, tag or commit")
    merge.add_argument(
        "--endpoint", help="Hub URL (default HF_ENDPOINT or huggingface.co); the token comes from HF_TOKEN"
    )


def _add_unmerge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    unmerge = sub.add_parser("unmerge", help="remove ADAPTER from the merged checkpoint MERGED, into OUT")
    unmerge.add_argument("merged", type=Path, help="merged checkpoint directory")
    unmerge.add_argument("adapter", type=Path, help="PEFT adapter directory")
    unmerge.add_argument("-o", "--output", type=Path, required=True, help="output directory (must not exist)")
    unmerge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default %(default)s)")
    unmerge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    unmerge.add_argument("--no-verify", action="store_true", help="skip verification")
    unmerge.add_argument("--receipt", type=Path, help="receipt file (default: the one the merge wrote into MERGED)")
    unmerge.add_argument("--no-receipt", action="store_true", help="ignore any receipt (plain unmerge, error bound)")
    unmerge.add_argument("--force", action="store_true", help="unmerge even if ADAPTER is not the last one merged")


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bn = sub.add_parser("bench", help="time base vs adapter mode vs merged: prefill and decode tokens/s, memory")
    bn.add_argument("base", help="base checkpoint directory or Hub repo id")
    bn.add_argument("adapter", help="PEFT adapter directory or Hub repo id")
    bn.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    bn.add_argument("--dtype", default="bf16", help="dtype to load the base in (default %(default)s)")
    bn.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default %(default)s)")
    bn.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default %(default)s)")
    bn.add_argument("--batches", default="1,8", help="batch sizes (default %(default)s)")
    bn.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up (default %(default)s)")
    bn.add_argument("--json", type=Path, help="also write the results as JSON here")


def _add_lineage(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lin = sub.add_parser("lineage", help="show which adapters a merged checkpoint holds, in merge order")
    lin.add_argument("path", type=Path, help="checkpoint directory")
    lin.add_argument("--json", action="store_true", help="print JSON")


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ver = sub.add_parser(
        "verify",
        help="verify that MERGED is BASE with ADAPTER merged in, or (--hub) that a pushed repo is what was verified",
    )
    ver.add_argument("base", type=Path, nargs="?", help="base checkpoint directory")
    ver.add_argument("adapter", type=Path, nargs="?", help="PEFT adapter directory")
    ver.add_argument("merged", type=Path, nargs="?", help="merged checkpoint directory")
    ver.add_argument("--hub", metavar="REPO_ID", help="check a repo pushed by loramerge against its loramerge.json")
    ver.add_argument("--revision", help="with --hub: branch, tag or commit")
    ver.add_argument("--endpoint", help="with --hub: Hub URL (default HF_ENDPOINT or huggingface.co)")
    ver.add_argument("--model", action="store_true", help="also load both models and check their outputs")
    ver.add_argument("--dtype", help="with --model: load both models in this dtype (default: as stored)")
    ver.add_argument("--factor", type=float, default=None, help="tolerance factor (default: Tolerance's, 2)")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_push(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = sub.add_parser(
        "push", help="push a merged checkpoint or an adapter to the Hub with its model card and proof"
    )
    push.add_argument("source", type=Path, help="merged checkpoint or PEFT adapter directory")
    push.add_argument("repo_id", help="namespace/name on the Hub (created if needed)")
    vis = push.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True, help="create it private (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="create it public")
    push.add_argument("--revision", help="branch to commit to (created from main if needed)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help="commit message")
    push.add_argument("--base-model", help="the base model's repo id, for the model card")
    push.add_argument(
        "--endpoint", help="Hub URL (default HF_ENDPOINT or huggingface.co); the token comes from HF_TOKEN"
    )
