"""Checking a pushed model: the record that travels with it (SHA-256 of every tensor, a probe
fingerprint of its outputs) and :func:`verify_hub`, which downloads the repo again and checks both."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramerge.formats.hub_download import HubError, hub_path, looks_like_repo_id
from loramerge.formats.io import read_json_object

__all__ = ["PROBE_LIMIT", "RECEIPT", "HubVerification", "fingerprint", "tensor_hashes", "verify_hub"]

RECEIPT = "loramerge.json"
PROBE_LIMIT = 1e-4
"""Largest relative RMS difference of the probe fingerprint accepted by :func:`verify_hub`: the
fingerprint is computed in the wide reference dtype, so only summation order can differ."""


def fingerprint(model: nn.Module, seed: int = 0, width: int = 8) -> dict[str, Any]:
    """The model's main output on seeded probes, computed in the wide reference dtype, projected onto
    ``width`` seeded random directions (a few hundred numbers instead of the whole output)."""
    from loramerge.numerics.tolerance import reference_dtype
    from loramerge.proof.model_runs import make_probes, model_dtype
    from loramerge.proof.widened_runs import run_widened

    probes = make_probes(model, seed=seed)
    dtype = model_dtype(model)
    ref = reference_dtype(dtype)
    out = run_widened(model, probes, ref).double()
    flat = out.reshape(-1, out.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(out.shape[-1], width, generator=gen, dtype=torch.float64)
    projected = flat @ directions
    return {
        "seed": seed,
        "probe_shape": list(next(iter(probes.values())).shape),
        "dtype": str(dtype).replace("torch.", ""),
        "reference_dtype": str(ref).replace("torch.", ""),
        "width": width,
        "projection": [[float(v) for v in row] for row in projected.tolist()],
    }


def _fingerprint_distance(recorded: Mapping[str, Any], measured: Mapping[str, Any]) -> float:
    a = torch.tensor(recorded["projection"], dtype=torch.float64)
    b = torch.tensor(measured["projection"], dtype=torch.float64)
    if a.shape != b.shape:
        return math.inf
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def tensor_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every tensor of the safetensors checkpoint or adapter in ``root``."""
    from loramerge.formats.shard_writer import tensor_digest

    out: dict[str, str] = {}
    from safetensors import safe_open

    for path in sorted(root.glob("*.safetensors")):
        if path.name.startswith("loramerge-receipt"):
            continue  # receipts are not model tensors
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = tensor_digest(handle.get_tensor(name))
    return out


@dataclass(frozen=True)
class HubVerification:
    """What :func:`verify_hub` found.

    Attributes:
        repo_id: The repository.
        revision: The revision checked (``None``: main).
        passed: Whether every recorded tensor hash matched and the probe (when recorded) agreed.
        tensors_checked: Number of tensors whose SHA-256 was compared.
        mismatched: Tensors whose bytes differ from the ones verified (or that are missing / extra).
        probe_error: Relative RMS difference of the probe fingerprint (NaN when none was recorded).
        probe_limit: The largest ``probe_error`` accepted.
        report_passed: Whether the published report says the merge passed (``None``: no report).
        notes: Remarks.
    """

    repo_id: str
    revision: str | None
    passed: bool
    tensors_checked: int
    mismatched: tuple[str, ...]
    probe_error: float
    probe_limit: float
    report_passed: bool | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "passed": self.passed,
            "tensors_checked": self.tensors_checked,
            "mismatched": list(self.mismatched),
            "probe_error": self.probe_error,
            "probe_limit": self.probe_limit,
            "report_passed": self.report_passed,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [
            f"loramerge hub verification of {self.repo_id}@{self.revision or 'main'}: {'PASSED' if self.passed else 'FAILED'}",
            f"  tensors: {self.tensors_checked - len(self.mismatched)}/{self.tensors_checked} with the recorded SHA-256",
        ]
        if self.mismatched:
            lines.append("  differ: " + ", ".join(self.mismatched[:10]) + (" ..." if len(self.mismatched) > 10 else ""))
        if not math.isnan(self.probe_error):
            lines.append(
                f"  probe fingerprint: relative difference {self.probe_error:.3g} (limit {self.probe_limit:g})"
            )
        if self.report_passed is not None:
            lines.append(f"  published report: {'passed' if self.report_passed else 'FAILED'}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def verify_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> HubVerification:
    """Download ``repo_id`` and check that it is what loramerge verified when it was pushed: every
    tensor's SHA-256 against ``loramerge.json``, and (for a merged model) the recorded probe
    fingerprint re-run on the downloaded model.

    Raises:
        HubError: The repo, revision or its ``loramerge.json`` cannot be fetched.

    Example:
        >>> verify_hub("me/merged-model").passed  # doctest: +SKIP
        True
    """
    root = hub_path(repo_id, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    if not looks_like_repo_id(repo_id) and not root.is_dir():
        raise HubError(f"verify_hub: {repo_id!r} is not a repo id")
    receipt_path = root / RECEIPT
    if not receipt_path.is_file():
        raise HubError(
            f"verify_hub: {repo_id!r} has no {RECEIPT}; it was not pushed by loramerge, so there is nothing to check against."
        )
    receipt = read_json_object(receipt_path, f"the record of {repo_id!r}")
    recorded = receipt.get("tensors", {})
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise HubError(
            f"verify_hub: the 'tensors' entry of {repo_id!r}'s {RECEIPT} is not an object of tensor names to SHA-256 "
            "digests; the record is corrupt, so there is nothing to check against."
        )
    found = tensor_hashes(root)
    mismatched = sorted(n for n in set(recorded) | set(found) if recorded.get(n) != found.get(n))
    notes: list[str] = []
    probe_error = math.nan
    ok = not mismatched and bool(recorded)
    if not recorded:
        notes.append("no tensor hashes were recorded")
    if receipt.get("probe") and not mismatched:
        from loramerge.formats.loading import load_base

        measured = fingerprint(
            load_base(root), seed=int(receipt["probe"]["seed"]), width=int(receipt["probe"]["width"])
        )
        probe_error = _fingerprint_distance(receipt["probe"], measured)
        ok = ok and probe_error <= PROBE_LIMIT
    elif receipt.get("probe"):
        notes.append("probe not re-run: the tensors already differ")
    report = receipt.get("report")
    report_passed = None
    if isinstance(report, Mapping):
        inner = report.get("verification", report.get("report", report))
        if isinstance(inner, Mapping) and "passed" in inner:
            report_passed = bool(inner["passed"])
    return HubVerification(
        repo_id,
        revision,
        ok,
        len(set(recorded) | set(found)),
        tuple(mismatched),
        probe_error,
        PROBE_LIMIT,
        report_passed,
        tuple(notes),
    )
