"""Merge lineage: which adapters a model contains, in order, and how each merge was verified.

A lineage is a list of rounds, oldest first. Each round records the adapter's source, a SHA-256
fingerprint of its update (factors and scales), its config and per-module scales, the dtype, the
loramerge version, the time, the verification summary and, when one was written, the receipt
that restores the previous model bit for bit (:mod:`loramerge.formats.receipts`).

Where it lives: on an in-memory model as ``model.config.loramerge_lineage`` (so
``save_pretrained`` writes it into ``config.json``); in a checkpoint written by loramerge, in
``loramerge.json`` and in every shard's safetensors metadata (key ``loramerge_lineage``).
:func:`lineage` reads any of them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramerge.errors import LoraMergeError
from loramerge.formats.adapter_config import pattern_value
from loramerge.formats.adapter_tensors import PEFT_PREFIX
from loramerge.formats.io import read_json_object
from loramerge.numerics.delta import LoraUpdate

__all__ = ["LineageError", "adapter_fingerprint", "lineage", "new_round"]

RECEIPT_JSON = "loramerge.json"
METADATA_KEY = "loramerge_lineage"
CONFIG_KEY = "loramerge_lineage"


class LineageError(LoraMergeError, ValueError):
    """An unmerge that does not follow the recorded lineage (not the last adapter merged), or a lineage
    record that is malformed (not a list of rounds, a round without its adapter, invalid JSON)."""


def adapter_fingerprint(updates: Mapping[str, Sequence[LoraUpdate]]) -> str:
    """SHA-256 over every module's update: name, scale, and the fp32 bytes of A, B, the DoRA
    magnitude and the LoRA bias. The same adapter gives the same fingerprint whether it is read
    from disk or taken from an attached PEFT model."""
    digest = hashlib.sha256()
    for name in sorted(updates):
        for up in updates[name]:
            digest.update(f"{name}|{up.scale!r}|".encode())
            for t in (up.lora_A, up.lora_B, up.magnitude, up.bias):
                if t is None:
                    digest.update(b"-")
                    continue
                data = t.detach().to("cpu", torch.float32).contiguous()
                digest.update(str(tuple(data.shape)).encode())
                digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_of(adapter: Any) -> str:
    """:func:`adapter_fingerprint` of a loaded :class:`~loramerge.Adapter`."""
    updates = {
        name: [LoraUpdate(m.kind, m.update.lora_A, m.update.lora_B, m.scale, m.update.magnitude, m.update.bias)]
        for name, m in adapter.modules.items()
    }
    for name in getattr(adapter, "variant_modules", {}):  # merged by PEFT's layer: its factors, as PEFT holds them
        updates[name] = [_variant_update(adapter, name)]
        if any(k.endswith(f"{name}.base_layer.out_proj.lora_A.weight") for k in adapter.tensors):  # an attention's
            updates[f"{name}.base_layer.out_proj"] = [_variant_update(adapter, name, "base_layer.out_proj.")]
    scale = float(adapter.config.get("lora_alpha", 1)) / float(adapter.config.get("r", 1))
    for name, (a, b) in getattr(adapter, "parameter_factors", {}).items():  # target_parameters wrappers
        updates[name] = [LoraUpdate("linear", a, b, scale)]
    return adapter_fingerprint(updates)


def _variant_update(adapter: Any, name: str, part: str = "") -> LoraUpdate:
    """A variant module's factors, scale, magnitude and LoRA bias, as an attached PEFT layer has them
    (so that the fingerprint of a file and of a live model agree; KaSA's diagonal is not included)."""
    own = f"{name}."
    keys = {k.removeprefix(PEFT_PREFIX): v for k, v in adapter.tensors.items()}
    t = {k.removeprefix(own).removeprefix(part): v for k, v in keys.items() if k.startswith(own + part)}
    a = t.get("lora_A.weight", t.get("lora_embedding_A"))
    b = t.get("lora_B.weight", t.get("lora_embedding_B"))
    config = adapter.config
    rank = float(pattern_value(dict(config.get("rank_pattern") or {}), name, config["r"]))
    alpha = float(pattern_value(dict(config.get("alpha_pattern") or {}), name, config["lora_alpha"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    magnitude = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
    assert a is not None and b is not None  # load_adapter checked both are there
    return LoraUpdate("linear", a, b, scale, magnitude, t.get("lora_B.bias"))


def write_record(root: Path, rounds: list[dict[str, Any]], report: Any = None) -> None:
    """Write ``loramerge.json`` (the lineage, and the last operation's report) into ``root``."""
    data: dict[str, Any] = {"lineage": rounds}
    if report is not None:
        data["report"] = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    (root / RECEIPT_JSON).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def summary(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    outputs = data.get("outputs") or {}
    layers = data.get("layers") or []
    return {
        "passed": data.get("passed"),
        "output_error": outputs.get("merged_error"),
        "output_limit": outputs.get("limit"),
        "layers_checked": len(layers),
        "layers_passed": sum(1 for layer in layers if layer.get("passed")),
    }


def public_name(value: str) -> str:
    """How a record names a source: a repo id or relative name as given, an absolute local path by its
    last component only (records travel with the model: no user names or directory layouts)."""
    text = str(value)
    if text.startswith(("/", "~")) or (len(text) > 2 and text[1] == ":" and text[2] in "\\/"):
        return Path(text.replace("\\", "/")).name or text
    return text


def public_record(value: Any) -> Any:
    """``value`` (a JSON-safe record) with every absolute local path in it replaced by :func:`public_name`."""
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, list):
        return [public_record(v) for v in value]
    if isinstance(value, dict):
        return {k: public_record(v) for k, v in value.items()}
    return value


def new_round(
    *,
    source: str | None,
    fingerprint: str,
    config: Mapping[str, Any] | None,
    scales: Mapping[str, float],
    dtype: str,
    report: Any,
    receipt: str | None = None,
) -> dict[str, Any]:
    """One lineage entry (JSON-safe)."""
    from loramerge import __version__

    safe_config = public_record(json.loads(json.dumps(dict(config or {}), default=str)))
    return {
        "adapter": {
            "source": public_name(source) if source is not None else None,
            "sha256": fingerprint,
            "config": safe_config,
            "scales": dict(scales),
        },
        "dtype": dtype,
        "loramerge_version": __version__,
        "time": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "verification": summary(report),
        "receipt": receipt,
    }


def checked_rounds(value: Any, where: str) -> list[dict[str, Any]]:
    """``value`` as a lineage (a list of rounds, each an object with an ``adapter`` object), or
    :class:`LineageError` naming ``where`` and what is wrong: a lineage is read from files someone
    else may have written."""
    if not isinstance(value, list):
        raise LineageError(
            f"the lineage in {where} is a {type(value).__name__}, not a list of rounds; the record is corrupt."
        )
    rounds = []
    for i, r in enumerate(value, start=1):
        adapter = r.get("adapter") if isinstance(r, dict) else None
        if not isinstance(adapter, dict):
            raise LineageError(
                f"round {i} of the lineage in {where} has no 'adapter' object; the record is corrupt. Remove it or "
                "restore it from the merged model's other copies (shard metadata, config.json)."
            )
        for key in ("sha256", "source"):
            if adapter.get(key) is not None and not isinstance(adapter[key], str):
                raise LineageError(f"round {i} of the lineage in {where}: 'adapter.{key}' must be a string.")
        if r.get("receipt") is not None and not isinstance(r["receipt"], str):
            raise LineageError(f"round {i} of the lineage in {where}: 'receipt' must be a file name.")
        rounds.append(dict(r))
    return rounds


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise LineageError(f"the lineage in {where} is not valid JSON ({e}); the record is corrupt.") from e


def _from_dir(root: Path) -> list[dict[str, Any]]:
    record = root / RECEIPT_JSON
    if record.is_file():
        data = read_json_object(record, "loramerge record")
        if "lineage" in data:
            return checked_rounds(data["lineage"], str(record))
    for shard in sorted(root.glob("*.safetensors")):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(shard), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise LineageError(f"{str(shard)!r} cannot be opened to read its lineage ({e}).") from e
        if METADATA_KEY in meta:
            return checked_rounds(_json(meta[METADATA_KEY], f"the metadata of {str(shard)!r}"), str(shard))
        break
    config = root / "config.json"
    if config.is_file():
        value = read_json_object(config, "config").get(CONFIG_KEY)
        if value is not None:
            return checked_rounds(value, str(config))
    return []


def lineage(source: str | Path | nn.Module) -> list[dict[str, Any]]:
    """The merge lineage of a model or checkpoint directory, oldest round first (empty when none).

    Example:
        >>> [r["adapter"]["source"] for r in lineage("merged/")]  # doctest: +SKIP
        ['adapters/round-1', 'adapters/round-2']
    """
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        value = getattr(config, CONFIG_KEY, None) if config is not None else None
        return checked_rounds(value, "the model's config") if value is not None else []
    return _from_dir(Path(source))


def set_model_lineage(model: nn.Module, rounds: list[dict[str, Any]]) -> None:
    """Store ``rounds`` on ``model.config`` (written to config.json by ``save_pretrained``)."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, rounds)


def drop_round(rounds: Sequence[Mapping[str, Any]], fingerprint: str) -> list[dict[str, Any]]:
    """``rounds`` without the latest round of the adapter with ``fingerprint`` (unchanged if it has none)."""
    out = [dict(r) for r in rounds]
    for i in range(len(out) - 1, -1, -1):
        if out[i]["adapter"].get("sha256") == fingerprint:
            del out[i]
            break
    return out


def check_last(rounds: Sequence[Mapping[str, Any]], fingerprint: str, force: bool) -> list[str]:
    """Refuse to unmerge an adapter that is not the last one merged (unless ``force``); notes otherwise."""
    if not rounds:
        return ["no lineage recorded: the adapter could not be checked against what was merged"]
    last = rounds[-1]["adapter"]
    if last.get("sha256") == fingerprint:
        return []
    merged_before = [i for i, r in enumerate(rounds) if r["adapter"].get("sha256") == fingerprint]
    where = (
        f"it was merged in round {merged_before[-1] + 1} of {len(rounds)}; unmerge the later rounds first"
        if merged_before
        else "it is not in the lineage at all"
    )
    if force:
        return [f"forced: the adapter is not the last one merged ({where})"]
    raise LineageError(
        f"this adapter is not the last one merged into the model ({where}); the last was "
        f"{last.get('source') or 'an adapter'} (sha256 {str(last.get('sha256'))[:12]}...). Unmerging it now would "
        "not give back any model that existed. Pass force=True (--force) to do it anyway."
    )
