"""Adapter mode or merged? Measure it: base vs PEFT adapter mode vs merged, on your model and hardware.

The three models (the base, the base with the adapter attached, the base with the adapter merged)
are built once and held together, then timed on the same random token ids: prefill (one forward
over the prompt) and decode (one token at a time with the KV cache), at each batch size. Each mode
is first warmed up at the measured shapes (those first runs are reported apart: allocation, kernel
selection); then the modes are timed interleaved, one run of each in turn per repetition, so that
a slow minute of the machine falls on all of them alike. The report gives the median and the
spread of ``repeats`` runs, and says when base and merged (the same shapes) differ by more than
their spread, or when the model is too small for the numbers to mean anything.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
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


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class _Case:
    """One mode at one batch size: its inputs, timing closures and the times gathered."""

    def __init__(
        self, model: nn.Module, mode: str, batch: int, prompt_len: int, new_tokens: int, vocab: int, seed: int
    ):
        self.model, self.mode, self.batch = model, mode, batch
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        self.device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed + batch)  # the same inputs for every mode
        self.ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(self.device)
        self.step_ids = torch.randint(0, vocab, (batch, new_tokens), generator=gen).to(self.device)
        self.prefill_times: list[float] = []
        self.decode_times: list[float] = []
        self.first_prefill = self.first_decode = math.nan
        self.extra_mb = 0.0

    def prefill(self) -> None:
        cast(Callable[..., Any], self.model)(input_ids=self.ids, use_cache=False)

    def decode(self) -> None:
        call = cast(Callable[..., Any], self.model)
        out = call(input_ids=self.ids, use_cache=True)
        past = out.past_key_values
        for i in range(self.new_tokens):
            out = call(input_ids=self.step_ids[:, i : i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values

    def warm_up(self) -> None:
        _reset_peak(self.device)
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.first_prefill = _timed(self.prefill, self.device)
        self.first_decode = _timed(self.decode, self.device)
        if self.device.type == "cuda":
            self.extra_mb = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20

    def run_once(self) -> None:
        self.prefill_times.append(_timed(self.prefill, self.device))
        self.decode_times.append(_timed(self.decode, self.device))

    def row(self) -> BenchRow:
        prefill_tps = [self.batch * self.prompt_len / t for t in self.prefill_times]
        # decode time excludes the prefill that starts it (the median prefill of the same repetitions)
        prefill_s = statistics.median(self.prefill_times)
        decode_tps = [self.batch * self.new_tokens / max(t - prefill_s, 1e-9) for t in self.decode_times]
        weights_mb = (
            sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers())) / 2**20
        )
        return BenchRow(
            self.mode,
            self.batch,
            statistics.median(prefill_tps),
            min(prefill_tps),
            max(prefill_tps),
            statistics.median(decode_tps),
            min(decode_tps),
            max(decode_tps),
            self.first_prefill,
            self.first_decode,
            weights_mb + self.extra_mb,
        )


def _spread_notes(rows: Sequence[BenchRow], params: int) -> list[str]:
    """Say when the numbers cannot be trusted: base and merged have the same shapes, so a gap between
    them larger than their spread is noise, not a property of the modes."""
    notes = []
    by = {(r.mode, r.batch): r for r in rows}
    for (mode, batch), base in sorted(by.items()):
        merged = by.get(("merged", batch))
        if mode != "base" or merged is None:
            continue
        for metric in ("prefill_tps", "decode_tps"):
            a, b = getattr(base, metric), getattr(merged, metric)
            spread = max(
                getattr(base, metric + "_max") - getattr(base, metric + "_min"),
                getattr(merged, metric + "_max") - getattr(merged, metric + "_min"),
            )
            if abs(a - b) > spread:
                notes.append(
                    f"base and merged {metric.split('_')[0]} at batch {batch} differ by {abs(a - b):.3g} tok/s, more than "
                    f"their spread ({spread:.3g}); they have the same shapes, so this is measurement noise: repeat with "
                    "more repeats or a larger model"
                )
    if params < 50_000_000:
        notes.append(
            f"the model has {params / 1e6:.1f}M parameters: too small for these throughputs to mean anything about "
            "adapter mode vs merged on real models (scheduling and Python overhead dominate)"
        )
    return notes


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
    from loramerge.formats.adapter import load_adapter
    from loramerge.formats.loading import load_base, resolve_dtype
    from loramerge.operations.inmemory import merge
    from loramerge.plan.peft_glue import attach

    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise InvalidArgumentError(f"unknown modes {unknown}; use {list(MODES)}")
    torch_dtype = resolve_dtype(dtype)
    loaded = load_adapter(adapter)
    notes = [
        "merged model built with loramerge.merge(verify=False); adapter mode is PEFT's LoRA forward",
        "modes are held in memory together and timed interleaved (one run of each mode in turn, per repetition), "
        "after a warm-up of each at the measured shapes; peak MB is the model's weights plus, on CUDA, the peak "
        "memory its runs allocate",
    ]
    models: dict[str, nn.Module] = {}
    vocab = 100
    for mode in modes:
        model: nn.Module = load_base(base, dtype=torch_dtype, device=device)
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
        if mode == "adapter":
            model = attach(model, loaded)
        elif mode == "merged":
            model = merge(model, loaded, verify=False).model
        models[mode] = model.eval()
    params = sum(p.numel() for p in next(iter(models.values())).parameters())
    rows: list[BenchRow] = []
    with torch.inference_mode():
        for batch in batches:
            cases = [_Case(models[m], m, int(batch), prompt_len, new_tokens, vocab, seed) for m in modes]
            for case in cases:
                case.warm_up()
            for _ in range(repeats):
                for case in cases:
                    case.run_once()
            rows.extend(case.row() for case in cases)
    rows.sort(key=lambda r: (list(modes).index(r.mode), r.batch))
    notes.extend(_spread_notes(rows, params))
    del models
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
