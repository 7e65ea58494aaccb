"""Adapter mode or merged? Measure it: base vs PEFT adapter mode vs merged, on your model and hardware.

For each mode the model is built fresh (the base, the base with the adapter attached, the base
with the adapter merged) and timed on random token ids: prefill (one forward over the prompt) and
decode (one token at a time with the KV cache), at each batch size. The first run of each
measurement is reported apart (warm-up: allocation, kernel selection); then ``repeats`` runs give
the median and the spread. Peak memory is the accelerator's allocator peak on CUDA, and the
process's peak resident memory on the CPU (reset before each mode where Linux allows it).
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loramerge.errors import InvalidArgumentError

__all__ = ["BenchReport", "BenchRow", "bench"]

MODES = ("base", "adapter", "merged")


@dataclass(frozen=True)
class BenchRow:
    """One mode at one batch size. Throughputs are tokens per second (median, min, max over repeats)."""

    mode: str
    batch: int
    prefill_tps: float
    prefill_tps_min: float
    prefill_tps_max: float
    decode_tps: float
    decode_tps_min: float
    decode_tps_max: float
    first_prefill_s: float
    first_decode_s: float
    peak_memory_mb: float


@dataclass(frozen=True)
class BenchReport:
    """What :func:`bench` measured."""

    device: str
    dtype: str
    prompt_len: int
    new_tokens: int
    repeats: int
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def ratio(self, mode: str, batch: int, metric: str = "decode_tps") -> float:
        """``mode``'s median throughput over the merged model's, e.g. ``ratio("adapter", 8)``."""
        rows = {(r.mode, r.batch): r for r in self.rows}
        return float(getattr(rows[(mode, batch)], metric) / getattr(rows[("merged", batch)], metric))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "repeats": self.repeats,
            "rows": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [
            f"loramerge bench on {self.device} ({self.dtype}), prompt {self.prompt_len} tokens, "
            f"{self.new_tokens} new tokens, median of {self.repeats} (min-max)",
            f"{'mode':8}{'batch':>6}{'prefill tok/s':>26}{'decode tok/s':>24}{'first prefill':>15}"
            f"{'first decode':>14}{'peak MB':>10}",
        ]
        for r in self.rows:
            prefill = f"{r.prefill_tps:.0f} ({r.prefill_tps_min:.0f}-{r.prefill_tps_max:.0f})"
            decode = f"{r.decode_tps:.1f} ({r.decode_tps_min:.1f}-{r.decode_tps_max:.1f})"
            lines.append(
                f"{r.mode:8}{r.batch:>6}{prefill:>26}{decode:>24}{r.first_prefill_s:>14.3f}s"
                f"{r.first_decode_s:>13.3f}s{r.peak_memory_mb:>10.0f}"
            )
        batches = sorted({r.batch for r in self.rows})
        modes = {r.mode for r in self.rows}
        if {"adapter", "merged"} <= modes:
            for b in batches:
                lines.append(
                    f"adapter mode / merged at batch {b}: prefill {self.ratio('adapter', b, 'prefill_tps'):.2f}x, "
                    f"decode {self.ratio('adapter', b):.2f}x"
                )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the process's peak resident memory (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _measure(
    model: nn.Module, mode: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, vocab: int, seed: int
) -> BenchRow:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    step_ids = torch.randint(0, vocab, (batch, new_tokens), generator=gen).to(device)
    call = cast(Callable[..., Any], model)

    def prefill() -> None:
        call(input_ids=ids, use_cache=False)

    def decode() -> None:
        out = call(input_ids=ids, use_cache=True)
        past = out.past_key_values
        for i in range(new_tokens):
            out = call(input_ids=step_ids[:, i : i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values

    with torch.inference_mode():
        _reset_peak(device)
        first_prefill = _timed(prefill, device)
        prefill_times = [_timed(prefill, device) for _ in range(repeats)]
        first_decode = _timed(decode, device)
        decode_times = [_timed(decode, device) - statistics.median(prefill_times) for _ in range(repeats)]
        peak = _peak_mb(device)
    prefill_tps = [batch * prompt_len / t for t in prefill_times]
    decode_tps = [batch * new_tokens / max(t, 1e-9) for t in decode_times]
    return BenchRow(
        mode,
        batch,
        statistics.median(prefill_tps),
        min(prefill_tps),
        max(prefill_tps),
        statistics.median(decode_tps),
        min(decode_tps),
        max(decode_tps),
        first_prefill,
        first_decode,
        peak,
    )


def bench(
    base: str | Path,
    adapter: str | Path,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "bf16",
    prompt_len: int = 128,
    new_tokens: int = 32,
    batches: Sequence[int] = (1, 8),
    repeats: int = 5,
    modes: Sequence[str] = MODES,
    seed: int = 0,
) -> BenchReport:
    """Time the base, PEFT adapter mode and the merged model: prefill and decode throughput at each
    batch size, warm-up apart, median and spread of ``repeats`` runs, peak memory.

    Args:
        base: Base checkpoint directory or Hub repo id.
        adapter: PEFT adapter directory or Hub repo id.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
        dtype: Dtype to load the base in.
        prompt_len: Prompt tokens (prefill, and the context decode starts from).
        new_tokens: Tokens decoded one at a time with the KV cache (decode time excludes the prefill).
        batches: Batch sizes.
        repeats: Timed runs after the warm-up run.
        modes: Any of ``"base"``, ``"adapter"``, ``"merged"``.
        seed: Seed of the random token ids.

    Example:
        >>> print(bench("base/", "adapter/", device="cuda", batches=(1, 8)))  # doctest: +SKIP
    """
    from loramerge.adapter import load_adapter
    from loramerge.inmemory import merge
    from loramerge.loading import load_base, resolve_dtype
    from loramerge.peft_glue import attach

    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise InvalidArgumentError(f"unknown modes {unknown}; use {list(MODES)}")
    torch_dtype = resolve_dtype(dtype)
    loaded = load_adapter(adapter)
    rows: list[BenchRow] = []
    notes = ["merged model built with loramerge.merge(verify=False); adapter mode is PEFT's LoRA forward"]
    for mode in modes:
        model: nn.Module = load_base(base, dtype=torch_dtype, device=device)
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
        if mode == "adapter":
            model = attach(model, loaded)
        elif mode == "merged":
            model = merge(model, loaded, verify=False).model
        model.eval()
        for batch in batches:
            rows.append(_measure(model, mode, int(batch), prompt_len, new_tokens, repeats, vocab, seed))
        del model
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return BenchReport(
        name,
        str(torch_dtype).replace("torch.", "") if torch_dtype is not None else "as stored",
        prompt_len,
        new_tokens,
        repeats,
        tuple(rows),
        tuple(notes),
    )
