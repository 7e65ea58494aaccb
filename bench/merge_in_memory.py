"""Benchmark: loramerge.merge vs PEFT's merge_and_unload on the same model (in memory, CPU by default).

Creates a random Qwen2-shaped bf16 checkpoint and an r=16 adapter on all seven projections, then
times, each run in a fresh process and in alternating order:

* ``peft``: ``PeftModel.from_pretrained`` + ``merge_and_unload()``
* ``loramerge``: ``attach`` + ``merge(verify=False)``
* ``loramerge+verify``: ``attach`` + ``merge()`` at default settings (per-layer and whole-model checks)

Only the merge call is timed, on a model whose weights have all been read once (loading is the same
for all modes). "extra memory" is the peak resident
memory during the merge (the kernel's high-water mark, reset just before) minus the resident memory
just before it.

Usage::

    python bench/merge_in_memory.py [--preset qwen2-0.5b] [--layers N] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _random_checkpoint import random_qwen2_checkpoint

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "qwen2-0.5b": (896, 4864, 24, 14, 2, 151936),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "tiny": (64, 128, 2, 4, 2, 256),
}
MODES = ("peft", "loramerge", "loramerge+verify")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak resident memory of a block, from the kernel's high-water mark (VmHWM).

    Writing 5 to /proc/self/clear_refs resets the mark to the current RSS, so no sampling thread
    is needed (a polling thread on a 2-core machine disturbs torch's worker threads and the timing).
    """

    def __init__(self) -> None:
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status_kib("VmHWM") * 1024


class PeakSampler:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def make_checkpoint(root: Path, preset: str, layers: int | None) -> tuple[Path, Path]:
    hidden, inter, n_layers, heads, kv, vocab = PRESETS[preset]
    return random_qwen2_checkpoint(
        root, hidden=hidden, intermediate=inter, layers=layers or n_layers, heads=heads, kv_heads=kv, vocab=vocab
    )


def run_one(mode: str, base: Path, adapter: Path) -> dict[str, float]:
    """Load, then time one merge in this process."""
    warnings.simplefilter("ignore")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import loramerge as lm

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    # from_pretrained maps the file lazily; read every weight once so that all modes time a merge of a
    # model that is in memory, not page faults (PEFT's merge never reads the embedding, a forward does).
    with torch.no_grad():
        for p in model.parameters():
            p.abs().max()
    if mode == "peft":
        from peft import PeftModel

        prepared = PeftModel.from_pretrained(model, str(adapter))
    else:
        prepared = lm.attach(model, lm.load_adapter(adapter))
    before = _rss()
    try:
        tracker: PeakMemory | PeakSampler = PeakMemory()
        tracker.__enter__()
        tracker.__exit__()
    except OSError:  # clear_refs not writable: fall back to sampling
        tracker = PeakSampler()
    start = time.perf_counter()
    with tracker as sampler:
        if mode == "peft":
            prepared.merge_and_unload()
        else:
            result = lm.merge(prepared, verify=(mode == "loramerge+verify"))
            assert result.passed
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_mib": (sampler.peak - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-0.5b")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench/results/merge_in_memory.json"))
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        mode, base, adapter = args._child
        print(json.dumps(run_one(mode, Path(base), Path(adapter))))
        return

    with tempfile.TemporaryDirectory(prefix="loramerge-bench-") as tmp:
        print(f"building a random {args.preset} checkpoint (bf16) and an r=16 adapter ...", flush=True)
        base, adapter = make_checkpoint(Path(tmp), args.preset, args.layers)
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for i in range(args.repeats):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--_child", mode, str(base), str(adapter)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  run {i + 1} {mode:<17} {runs[mode][-1]['seconds']:.2f} s", flush=True)

    peft_median = statistics.median(r["seconds"] for r in runs["peft"])
    rows = []
    for mode in MODES:
        secs = [r["seconds"] for r in runs[mode]]
        mem = [r["extra_mib"] for r in runs[mode]]
        rows.append(
            {
                "mode": mode,
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "ratio_to_peft": statistics.median(secs) / peft_median,
                "extra_mib_median": statistics.median(mem),
            }
        )
    print(
        f"\n{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, bf16, r=16 on 7 projections, {args.repeats} runs each"
    )
    print(f"{'mode':<18} {'median s':>9} {'min-max s':>13} {'vs PEFT':>8} {'extra MiB':>10}")
    for r in rows:
        print(
            f"{r['mode']:<18} {r['median_s']:>9.2f} {r['min_s']:>6.2f}-{r['max_s']:<6.2f} "
            f"{r['ratio_to_peft']:>7.2f}x {r['extra_mib_median']:>10.0f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    info = {"preset": args.preset, "layers": args.layers, "repeats": args.repeats, "cpus": os.cpu_count()}
    args.json.write_text(json.dumps({"setup": info, "rows": rows, "runs": runs}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
