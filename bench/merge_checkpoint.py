"""Benchmark: merging a LoRA adapter into a checkpoint on disk, several ways, each in its own process.

Creates a random Qwen2-1.5B-shaped bf16 checkpoint saved in 1 GB shards and an r=16 adapter on all
seven projections, then runs, alternating the order between repetitions:

* ``cp``: ``cp`` of the shard files, then ``sync`` (the physical floor: one read, one write)
* ``copy``: a plain safetensors read + write copy of the shards
* ``peft``: from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
* ``mergekit``: ``mergekit-yaml`` with a ``passthrough`` merge of the model ``BASE+ADAPTER`` (its
  LoRA syntax), when ``mergekit-yaml`` is on the PATH or named by ``$MERGEKIT_YAML`` (skipped with
  a note otherwise: mergekit pins its own dependencies, so it belongs in its own environment)
* ``loramerge``: ``loramerge merge`` (the command line, streaming, default verification included)
* ``loramerge-noverify``: the same with ``--no-verify`` (what verification costs)
* ``unmerge`` and ``unmerge-noverify`` (only when asked for with ``--modes``): ``loramerge unmerge``
  of the adapter from a merged copy of the checkpoint (merged once, untimed), with and without
  verification

and reports wall time and peak resident memory of each child process (from ``wait4``). ``--layers``
overrides the depth (e.g. double it to see that loramerge's peak memory does not grow).

Usage::

    python bench/merge_checkpoint.py [--layers 56] [--repeats 2] [--modes cp,copy,loramerge,loramerge-noverify]

Peak memory is the child process's own high-water mark (for ``cp`` and ``mergekit``, which run
in grandchild processes, the largest of those).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _random_checkpoint import random_qwen2_checkpoint

QWEN2_15B = {"hidden": 1536, "inter": 8960, "layers": 28, "heads": 12, "kv": 2, "vocab": 151936}


def make_checkpoint(root: Path, layers: int) -> tuple[Path, Path]:
    c = QWEN2_15B
    return random_qwen2_checkpoint(
        root,
        hidden=c["hidden"],
        intermediate=c["inter"],
        layers=layers,
        heads=c["heads"],
        kv_heads=c["kv"],
        vocab=c["vocab"],
        max_shard_size="1GB",
    )


def _mergekit() -> str | None:
    """The ``mergekit-yaml`` command to run, if there is one."""
    return os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")


def _children_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9


def _peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM; a fresh count since exec, unlike wait4's ru_maxrss,
    which includes the forked parent's memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def child(mode: str, base: Path, adapter: Path, out: Path) -> None:
    try:
        _child(mode, base, adapter, out)
    finally:
        print(json.dumps({"peak_rss_gb": max(_peak_rss_gb(), _children_peak_rss_gb())}))


def _child(mode: str, base: Path, adapter: Path, out: Path) -> None:
    warnings.simplefilter("ignore")
    if mode == "cp":
        out.mkdir()
        for path in sorted(base.glob("*.safetensors")):
            subprocess.run(["cp", str(path), str(out / path.name)], check=True)
        subprocess.run(["sync"], check=True)
        return
    if mode == "mergekit":
        config = out.parent / f"{out.name}.yml"
        spec = f"{base}+{adapter}"
        config.write_text(f"merge_method: passthrough\ndtype: bfloat16\nmodels:\n  - model: {spec}\n")
        cache = out.parent / f"{out.name}-lora-cache"  # mergekit merges the LoRA into a copy there first
        command = [str(_mergekit()), str(config), str(out), "--out-shard-size", "500M", "--no-copy-tokenizer"]
        subprocess.run([*command, "--lora-merge-cache", str(cache)], check=True, capture_output=True)
        config.unlink()
        shutil.rmtree(cache)
        subprocess.run(["sync"], check=True)
        return
    if mode == "copy":
        from safetensors.torch import load_file, save_file

        out.mkdir()
        for shard in sorted(base.glob("*.safetensors")):
            save_file(load_file(str(shard)), str(out / shard.name), metadata={"format": "pt"})
        return
    if mode == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(out), max_shard_size="1GB")
        return
    from loramerge.cli.main import main as loramerge_cli

    # The command line, as a user runs it (``loramerge merge BASE ADAPTER -o OUT``), in this process.
    command = ["unmerge"] if mode.startswith("unmerge") else ["merge"]  # ``base`` is then the merged checkpoint
    command += [str(base), str(adapter), "-o", str(out), "--max-shard-size", "1GB"]
    if mode.endswith("-noverify"):
        command.append("--no-verify")
    assert loramerge_cli(command) == 0, f"loramerge {' '.join(command)} failed"


def run(mode: str, base: Path, adapter: Path, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", mode, str(base), str(adapter), str(out)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-2000:]}")
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"seconds": seconds, "peak_rss_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN2_15B["layers"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="cp,copy,peft,mergekit,loramerge,loramerge-noverify")
    parser.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/merge_checkpoint.json"))
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        mode, base, adapter, out = args._child
        child(mode, Path(base), Path(adapter), Path(out))
        return

    modes = args.modes.split(",")
    if "mergekit" in modes and _mergekit() is None:
        modes.remove("mergekit")
        print("mergekit: skipped (no mergekit-yaml on the PATH, nor $MERGEKIT_YAML)", flush=True)
    with tempfile.TemporaryDirectory(prefix="loramerge-ckpt-bench-", dir=args.workdir) as tmp:
        root = Path(tmp)
        print(f"building a random Qwen2-1.5B-shaped bf16 checkpoint with {args.layers} layers ...", flush=True)
        base, adapter = make_checkpoint(root, args.layers)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(f"  {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards", flush=True)
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        merged = root / "merged"  # what the unmerge modes start from, merged once, untimed
        if any(m.startswith("unmerge") for m in modes):
            child_run = [
                sys.executable,
                __file__,
                "--_child",
                "loramerge-noverify",
                str(base),
                str(adapter),
                str(merged),
            ]
            subprocess.run(child_run, check=True, capture_output=True)
        for i in range(args.repeats):
            for mode in modes if i % 2 == 0 else list(reversed(modes)):
                source = merged if mode.startswith("unmerge") else base
                runs[mode].append(run(mode, source, adapter, root / f"out-{mode}"))
                print(
                    f"  run {i + 1} {mode:<18} {runs[mode][-1]['seconds']:.1f} s, {runs[mode][-1]['peak_rss_gb']:.2f} GB",
                    flush=True,
                )

    rows = []
    for mode in modes:
        secs = [r["seconds"] for r in runs[mode]]
        rss = [r["peak_rss_gb"] for r in runs[mode]]
        rows.append(
            {
                "mode": mode,
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "peak_rss_gb": max(rss),
            }
        )
    by = {r["mode"]: r for r in rows}
    print(
        f"\nQwen2-1.5B-shaped, {args.layers} layers, bf16, {size / 1e9:.2f} GB, r=16 on 7 projections, {args.repeats} runs each"
    )
    floor = "cp" if "cp" in by else "copy"  # ratios against the physical floor when it was measured
    print(f"{'mode':<18} {'median s':>9} {'min-max s':>12} {'peak RSS GB':>12} {'vs ' + floor:>8} {'vs peft':>8}")
    for r in rows:
        r["vs_floor"] = r["median_s"] / by[floor]["median_s"] if floor in by else float("nan")
        vs_peft = by["peft"]["median_s"] / r["median_s"] if "peft" in by else float("nan")
        print(
            f"{r['mode']:<18} {r['median_s']:>9.1f} {r['min_s']:>5.1f}-{r['max_s']:<6.1f} {r['peak_rss_gb']:>12.2f} {r['vs_floor']:>7.2f}x {vs_peft:>7.2f}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    setup = {"layers": args.layers, "bytes": size, "repeats": args.repeats, "cpus": os.cpu_count(), "floor": floor}
    args.json.write_text(json.dumps({"setup": setup, "rows": rows, "runs": runs}, indent=2))
    print(f"(vs peft: how many times faster than PEFT)\nwrote {args.json}")


if __name__ == "__main__":
    main()
