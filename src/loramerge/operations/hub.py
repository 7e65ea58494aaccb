"""The Hugging Face Hub: download bases and adapters by repo id, push results with their proof.

Everything that talks to the Hub lives here, through the real ``huggingface_hub`` client: the
token comes from the argument, ``HF_TOKEN`` or the stored login (the client's own rules), the
endpoint from the argument or ``HF_ENDPOINT`` (read at call time), the normal HF cache is used.
The token is never printed, logged, or written into a model card or report.

A push writes two files beside the weights: ``README.md`` (a model card whose YAML metadata names
the base model and the relation, and whose body holds the verification summary and the lineage)
and ``loramerge.json`` (machine-readable: the report, the SHA-256 of every tensor, and a probe
fingerprint of the model's outputs). :func:`verify_hub` downloads the repo again and checks both.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from loramerge.errors import InvalidArgumentError, UnsafePathError
from loramerge.formats.confine import confined_file, side_files
from loramerge.formats.hub_download import HubError, _endpoint, hub_errors, hub_path, looks_like_repo_id
from loramerge.formats.io import read_json_object
from loramerge.formats.lineage_records import public_record
from loramerge.operations.hub_verify import RECEIPT, HubVerification, fingerprint, tensor_hashes, verify_hub

__all__ = ["HubError", "HubVerification", "hub_path", "push_to_hub", "verify_hub"]

logger = logging.getLogger(__name__)

# --- model card ---


def _report_summary(report: Mapping[str, Any] | None) -> list[str]:
    if not report:
        return ["This repository was not verified by loramerge when it was pushed."]
    verification = report.get("verification", report.get("report", report))
    if not isinstance(verification, Mapping):
        return ["This repository was not verified by loramerge when it was pushed."]
    passed = verification.get("passed")
    lines = [f"- Verification: **{'PASSED' if passed else 'FAILED'}** ({verification.get('operation', 'merge')})."]
    outputs = verification.get("outputs")
    if isinstance(outputs, Mapping):
        lines.append(
            f"- Model outputs on probe inputs: relative RMS error {outputs.get('merged_error', float('nan')):.3g} "
            f"against adapter mode evaluated in {outputs.get('reference_dtype')} (adapter mode itself: "
            f"{outputs.get('adapter_error', float('nan')):.3g}; limit {outputs.get('limit', float('nan')):.3g})."
        )
    layers = verification.get("layers") or []
    if layers:
        ok = sum(1 for layer in layers if layer.get("passed"))
        worst = max(layers, key=lambda layer: layer.get("probe_error") or 0.0)
        lines.append(
            f"- Layers: {ok}/{len(layers)} within tolerance; worst {worst.get('name')} "
            f"(error {worst.get('probe_error', float('nan')):.3g}, limit {worst.get('limit', float('nan')):.3g})."
        )
    unchanged = verification.get("unchanged_checked")
    if unchanged:
        lines.append(f"- Untouched tensors checked bit-identical: {unchanged}.")
    return lines


def model_card(receipt: Mapping[str, Any], repo_id: str) -> str:
    """README.md for a pushed repo: YAML metadata, then the verification summary and the lineage."""
    kind = receipt["kind"]
    base = receipt.get("base_model")
    meta = ["---"]
    if base:
        meta.append(f"base_model: {base}")
        meta.append(f"base_model_relation: {'adapter' if kind == 'adapter' else 'merge'}")
    meta.append(f"library_name: {'peft' if kind == 'adapter' else 'transformers'}")
    meta.append("tags:")
    for tag in ["loramerge", "lora", *(["merge"] if kind == "merged" else [])]:
        meta.append(f"- {tag}")
    meta.append("---")
    title = repo_id.split("/")[-1]
    what = "a LoRA adapter" if kind == "adapter" else "a model with LoRA adapter(s) merged into its base"
    body = [
        "",
        f"# {title}",
        "",
        f"This is {what}, pushed by [loramerge](https://github.com/loramerge/loramerge) {receipt['loramerge_version']}.",
        "",
        "## Verification",
        "",
        *_report_summary(receipt.get("report")),
        f"- Tensors: {len(receipt.get('tensors', {}))} SHA-256 hashes recorded in `{RECEIPT}`"
        + ("; a probe fingerprint of the outputs too." if receipt.get("probe") else "."),
        "",
        f"Check that the files here are the ones verified: `loramerge verify --hub {repo_id}`.",
        "",
        "## Lineage",
        "",
        f"- Base model: {base or 'unknown'}",
    ]
    for adapter in receipt.get("adapters", []):
        body.append(f"- Adapter: {adapter}")
    body.append(f"- Pushed: {receipt['pushed_at']}")
    return "\n".join(meta + body) + "\n"


def _as_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, Mapping):
        return dict(report)
    to_dict = getattr(report, "to_dict", None)
    if callable(to_dict):
        value = to_dict()
        return dict(value) if isinstance(value, Mapping) else None
    raise InvalidArgumentError(f"report= takes a loramerge report or a dict, not {type(report).__name__}")


def _stage(source: str | Path | nn.Module, staging: Path) -> tuple[Path, str, nn.Module | None]:
    """The directory to upload, ``"merged"`` or ``"adapter"``, and the in-memory model if one was given."""
    if isinstance(source, nn.Module):
        save = getattr(source, "save_pretrained", None)
        if not callable(save):
            raise HubError(f"push_to_hub needs a transformers or PEFT model to save; got {type(source).__name__}")
        save(str(staging))
        kind = "adapter" if (staging / "adapter_config.json").is_file() else "merged"
        return staging, kind, source
    root = Path(source)
    if not root.is_dir():
        raise HubError(
            f"push_to_hub: {str(root)!r} is not a directory; pass a checkpoint or adapter directory, or a model."
        )
    if (root / "adapter_config.json").is_file():
        kind = "adapter"
    elif (root / "config.json").is_file():
        kind = "merged"
    else:
        raise HubError(
            f"push_to_hub: {str(root)!r} holds neither config.json (a checkpoint) nor adapter_config.json (an adapter)."
        )
    if any(root.glob("*.bin")) and not any(root.glob("*.safetensors")):
        raise HubError(f"push_to_hub: {str(root)!r} holds pickle weights only; save them as safetensors first.")
    staging.mkdir(parents=True, exist_ok=True)
    for path in _pushable(root):
        shutil.copyfile(path, staging / path.name)
    return staging, kind, None


def _publicize_config(staging: Path) -> None:
    """Absolute local paths in the staged ``config.json`` (lineage sources, ``_name_or_path``) become
    bare names: what is pushed names sources by repo id or relative name only."""
    path = staging / "config.json"
    if not path.is_file():
        return
    config = read_json_object(path, "config")
    clean = public_record(config)
    if clean != config:
        path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _pushable(root: Path) -> list[Path]:
    """The files of a checkpoint or adapter directory that a push uploads: weights (safetensors and
    their index), the adapter config, loramerge's record and receipts, and the side files a
    transformers checkpoint holds (:func:`~loramerge.formats.confine.side_files`); each a regular file
    directly inside ``root`` (no subdirectories, no links out). Everything else stays local."""
    carried, skipped = side_files(root)
    if (root / "model.safetensors.index.json").exists():  # the index must name plain files of this directory
        from loramerge.formats.shards import CheckpointReader

        CheckpointReader(root)
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith((".safetensors", ".safetensors.index.json")) or entry.name in (
            "adapter_config.json",
            RECEIPT,
        ):
            try:
                carried.append(confined_file(root, entry.name, "push"))
            except UnsafePathError:
                skipped.append(f"{entry.name} (a link out of the directory, or not a regular file)")
    if skipped:
        logger.info("push_to_hub: not uploaded from %s: %s", root, ", ".join(skipped))
    return carried


def _base_model(root: Path, kind: str, receipt_base: str | None) -> str | None:
    if receipt_base:
        return receipt_base
    try:
        if kind == "adapter":
            value = json.loads((root / "adapter_config.json").read_text(encoding="utf-8")).get(
                "base_model_name_or_path"
            )
        else:
            value = json.loads((root / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(value, str) or not value or not looks_like_repo_id(value):
        return None  # a local path means nothing on the Hub
    return value


def push_to_hub(
    source: str | Path | nn.Module,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    report: Any = None,
    base_model: str | None = None,
    adapters: list[str] | None = None,
    probe: bool = True,
) -> Any:
    """Push a merged checkpoint, an adapter, or an in-memory model to the Hub in one commit, with a
    model card and ``loramerge.json`` (the report, tensor hashes, a probe fingerprint).

    Args:
        source: A merged checkpoint directory, a PEFT adapter directory, or a transformers/PEFT
            model (saved to a temporary directory first).
        repo_id: ``namespace/name``; created if needed.
        token: Hub token; default ``HF_TOKEN`` or the stored login. Never printed or written.
        private: Create the repo private (default) or public (an existing repo keeps its visibility).
        revision: Branch to commit to; created from ``main`` if it does not exist.
        commit_message: Default: ``"Upload <merged model|adapter> with loramerge"``.
        create_pr: Open a pull request instead of committing to the branch.
        endpoint: Hub URL; default ``HF_ENDPOINT`` or huggingface.co.
        report: The report to publish (a :class:`~loramerge.MergeResult`,
            :class:`~loramerge.CheckpointMergeReport`, :class:`~loramerge.VerificationReport` or a
            dict); default: the ``loramerge.json`` already in ``source``, if any.
        base_model: The base model's repo id for the card; default: from the config, when it is a repo id.
        adapters: Repo ids or names of the merged adapters, for the lineage.
        probe: Record a probe fingerprint of a merged model's outputs (loads it when ``source`` is
            a directory) so that :func:`verify_hub` can re-run it.

    Returns:
        The client's ``CommitInfo`` (``commit_url``, ``oid``, ``pr_url``).

    Raises:
        HubError: Bad token (401), no permission (403), a missing repo or revision, a server failure
            mid-upload (re-run the same call: what was uploaded is not sent again).

    Example:
        >>> info = push_to_hub("merged/", "me/my-merged-model", report=report)  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    from loramerge import __version__

    api = HfApi(endpoint=_endpoint(endpoint), token=token)
    with tempfile.TemporaryDirectory(prefix="loramerge-push-") as tmp:
        staging, kind, model = _stage(source, Path(tmp) / "upload")
        previous: dict[str, Any] = {}
        if (staging / RECEIPT).is_file():
            previous = read_json_object(staging / RECEIPT, "loramerge record")
        fp = None
        if probe and kind == "merged":
            if model is None:
                from loramerge.formats.loading import load_base

                model = load_base(staging)
            fp = fingerprint(model)
        lineage_rounds = previous.get("lineage")
        if model is not None and lineage_rounds is None:
            from loramerge.formats.lineage_records import lineage as model_lineage

            lineage_rounds = model_lineage(model) or None
        _publicize_config(staging)
        receipt = {
            **previous,
            "lineage": public_record(lineage_rounds or []),
            "loramerge_version": __version__,
            "kind": kind,
            "base_model": _base_model(staging, kind, base_model or previous.get("base_model")),
            "adapters": list(adapters or previous.get("adapters", [])),
            "pushed_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "report": _as_dict(report) if report is not None else previous.get("report"),
            "tensors": tensor_hashes(staging),
            "probe": fp,
        }
        receipt = public_record(receipt)  # no local absolute paths leave the machine
        (staging / RECEIPT).write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(model_card(receipt, repo_id), encoding="utf-8")
        message = commit_message or f"Upload {'adapter' if kind == 'adapter' else 'merged model'} with loramerge"
        with hub_errors("push", repo_id, revision):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != "main" and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=str(staging),
                repo_id=repo_id,
                revision=None if create_pr else revision,
                commit_message=message,
                create_pr=create_pr,
            )
    logger.info("pushed %s to %s", kind, repo_id)
    return info
