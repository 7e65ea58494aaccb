"""What the public operations return: the merged or unmerged model with its verification report
(in memory), or what was written (on checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramerge.proof.reports import VerificationReport


@dataclass(frozen=True)
class MergeResult:
    """What :func:`~loramerge.merge` returns.

    Attributes:
        model: The plain merged model (the same object that was passed in, unwrapped).
        report: The verification report (``report.passed`` is true unless verification was off).
        adapters: Names of the merged adapters, in merge order.
        dora_norms: For each DoRA-merged module, the norms ``‖W + ΔW‖`` used; pass them to
            :func:`~loramerge.unmerge` to undo a DoRA merge.
        untied: Parameters given their own copy because they shared a merged weight.
        verified: Whether verification ran.
        receipt: With ``receipt=True``: what :func:`~loramerge.unmerge` needs to restore the base
            bit for bit (:class:`~loramerge.Receipt`; save it with ``receipt.save(path)``).
        base_format: For a quantized base, its format and what the merge made of it, e.g.
            ``"bnb-4bit nf4, double quantization, blocks of 64, bfloat16 (14 layers) -> dequantized to bfloat16"``;
            empty otherwise.
    """

    model: nn.Module
    report: VerificationReport
    adapters: tuple[str, ...]
    dora_norms: Mapping[str, torch.Tensor] = field(default_factory=dict)
    untied: tuple[str, ...] = ()
    verified: bool = True
    base_format: str = ""
    receipt: Any = None

    @property
    def passed(self) -> bool:
        """Shortcut for ``report.passed``."""
        return self.report.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (without the model and tensors)."""
        return {
            "adapters": list(self.adapters),
            "dora_modules": sorted(self.dora_norms),
            "untied": list(self.untied),
            "verified": self.verified,
            "base_format": self.base_format,
            "receipt_bytes": self.receipt.nbytes if self.receipt is not None else None,
            "report": self.report.to_dict(),
        }

    def __str__(self) -> str:
        base = f" (base: {self.base_format})" if self.base_format else ""
        return f"merged adapters {list(self.adapters)}{base}\n{self.report}"


@dataclass(frozen=True)
class UnmergeResult:
    """What :func:`~loramerge.unmerge` returns.

    Attributes:
        model: The model with the adapter removed (changed in place).
        report: The verification report.
        restored_exactly: Tensors restored bit for bit (from copies the adapter or caller supplied).
        max_error_bound: Largest elementwise bound on ``|W_recovered - W_base|`` over the
            recovered weights: each element is within ``½ulp(W_merged) + ½ulp(W_recovered)`` of the
            base (one rounding step of the merge plus one of the unmerge), for a base merged by
            loramerge. ``0.0`` when every weight was restored from a stored copy.
        verified: Whether verification ran.
    """

    model: nn.Module
    report: VerificationReport
    restored_exactly: tuple[str, ...] = ()
    max_error_bound: float = 0.0
    verified: bool = True

    @property
    def passed(self) -> bool:
        """Shortcut for ``report.passed``."""
        return self.report.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (without the model)."""
        return {
            "restored_exactly": list(self.restored_exactly),
            "max_error_bound": self.max_error_bound,
            "verified": self.verified,
            "report": self.report.to_dict(),
        }

    def __str__(self) -> str:
        return f"unmerge (every recovered weight within {self.max_error_bound:.3g} of the original)\n{self.report}"


@dataclass(frozen=True)
class CheckpointMergeReport:
    """What :func:`merge_checkpoint` or :func:`unmerge_checkpoint` wrote, and its verification.

    Attributes:
        output: The finished checkpoint directory.
        operation: ``"merge"`` or ``"unmerge"``.
        files: The weight files written (shards and index).
        tensors: Number of tensors written.
        changed: Names of the tensors the adapter changed.
        bytes_written: Bytes of tensor data written.
        seconds: Wall time of the whole operation (verification included).
        verification: The verification report (``None`` with ``verify=False``).
        dora_norms: For DoRA modules merged, the norms an unmerge needs (by module name).
        qlora_base: With ``qlora_base=``: which base the adapter was merged into and the
            quantization simulated, e.g. ``"simulated nf4, double quantization, blocks of 64"``.
        qlora_gap: With ``qlora_base=``: per adapted module, how far the two choices of base are
            apart, ``‖W_simulated − W_original‖ / ‖ΔW‖`` (the quantization error the adapter was
            trained against, as a fraction of the adapter's own update).
        side_files: The base's side files copied into the output (config, tokenizer, ...).
        skipped: Entries of the base directory not copied, each with the reason (subdirectories,
            links out of the directory, files a transformers checkpoint does not need).
    """

    output: Path
    operation: str
    files: tuple[str, ...]
    tensors: int
    changed: tuple[str, ...]
    bytes_written: int
    seconds: float
    verification: VerificationReport | None
    dora_norms: Mapping[str, torch.Tensor] = field(default_factory=dict)
    qlora_base: str = ""
    qlora_gap: Mapping[str, float] = field(default_factory=dict)
    side_files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Whether verification passed (``True`` when it did not run)."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "output": str(self.output),
            "operation": self.operation,
            "files": list(self.files),
            "tensors": self.tensors,
            "changed": list(self.changed),
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "qlora_base": self.qlora_base,
            "qlora_gap": dict(self.qlora_gap),
            "side_files": list(self.side_files),
            "skipped": list(self.skipped),
        }

    def __str__(self) -> str:
        gb = self.bytes_written / 1e9
        lines = [
            f"{self.operation}d checkpoint written to {self.output}: {self.tensors} tensors ({len(self.changed)} changed), "
            f"{gb:.2f} GB in {len(self.files)} file(s), {self.seconds:.1f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s)"
        ]
        if self.qlora_base:
            lines.append(f"QLoRA base: {self.qlora_base}")
        if self.qlora_gap:
            gaps = sorted(self.qlora_gap.items(), key=lambda kv: kv[1])
            median = gaps[len(gaps) // 2][1]
            lines.append(
                f"  simulated vs original base, ‖W_sim − W_orig‖ / ‖ΔW‖ per layer: median {median:.3g}, "
                f"worst {gaps[-1][1]:.3g} ({gaps[-1][0]})"
            )
        if self.skipped:
            lines.append(f"not copied from the base: {', '.join(self.skipped)}")
        lines.append(str(self.verification) if self.verification is not None else "verification off")
        return "\n".join(lines)
