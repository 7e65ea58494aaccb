"""Validating an adapter's ``adapter_config.json``: which PEFT settings and LoRA variants loramerge
merges, what the numbers must be, and rank/alpha patterns matched as PEFT matches them, under a
time limit (patterns come from a file someone else wrote)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import regex

from loramerge.errors import AdapterConfigError, UnsupportedAdapterError

__all__ = ["pattern_value"]


# Config entries that change what the adapter computes in ways loramerge does not merge.
_UNSUPPORTED_SETTINGS: dict[str, str] = {
    "layer_replication": "layer replication duplicates base layers; PEFT cannot merge it either",
    "use_qalora": "QA-LoRA pools inputs and cannot be expressed as a weight delta here",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after invocation tokens; it has no weight delta",
    "arrow_config": "Arrow routing mixes adapters per token",
}


# Initialisations that also rewrite the base weights: the adapter is only valid on that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


PATTERN_TIMEOUT = 1.0


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern that matches ``module_name``, as PEFT resolves rank/alpha patterns.

    A pattern ``key`` matches when ``module_name`` matches the regex ``(.*\\.)?(key)$``.

    Patterns come from a file someone else wrote: each match runs under a time limit
    (:data:`PATTERN_TIMEOUT` seconds) and a pattern that exceeds it is an
    :class:`~loramerge.AdapterConfigError`, not a hang.

    Example:
        >>> pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8)
        2
        >>> pattern_value({"v_proj": 2}, "model.layers.0.self_attn.q_proj", 8)
        8
    """
    for key, value in patterns.items():
        try:
            found = regex.match(rf"(.*\.)?({key})$", module_name, timeout=PATTERN_TIMEOUT)
        except TimeoutError as e:
            raise AdapterConfigError(
                f"the rank/alpha pattern {key!r} did not finish matching {module_name!r} within {PATTERN_TIMEOUT} s "
                "(catastrophic backtracking); the adapter config is malformed or hostile. Use a plain module name "
                "or a simple regular expression."
            ) from e
        except regex.error as e:
            raise AdapterConfigError(f"the rank/alpha pattern {key!r} is not a valid regular expression ({e}).") from e
        if found:
            return value
    return default


# Variants whose layer holds more than A, B and a scale: loramerge merges every module of such an
# adapter through PEFT's own layer (built with its base weight widened, rounded once) and proves the
# result against that layer in adapter mode.
PEFT_MERGED_VARIANTS = {"use_bdlora": "BD-LoRA", "kasa_config": "KaSA"}


def check_mergeable_settings(raw: Mapping[str, Any], where: str) -> None:
    """Raise :class:`~loramerge.UnsupportedAdapterError` when an adapter config (a dict, as in
    ``adapter_config.json``) uses a PEFT feature or LoRA variant loramerge does not merge."""
    peft_type = raw.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type is {peft_type!r}; loramerge merges LoRA adapters only (peft_type 'LORA')."
        )
    for key, why in _UNSUPPORTED_SETTINGS.items():
        value = raw.get(key)
        if value:  # None, False and empty containers mean "not used"
            raise UnsupportedAdapterError(
                f"{where}: {key}={value!r} is set: {why}. Nothing was changed. Merge it with PEFT's "
                "merge_and_unload(), or retrain without it."
            )


def _validate_config(raw: Mapping[str, Any], where: str) -> None:
    problems: list[str] = []
    check_mergeable_settings(raw, where)
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} also rewrites the base weights, so this adapter is only valid on that "
            "rewritten base. Convert it to a plain LoRA adapter first (PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...)), then merge the converted adapter."
        )
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"'r' must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"'lora_alpha' must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            problems.append(f"'{key}' must be a mapping of module pattern to number, got {type(value).__name__}")
            continue
        for pattern, number in value.items():
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"'{key}' pattern {pattern!r} is not a valid regex ({e})")
            if not isinstance(number, (int, float)) or isinstance(number, bool) or number <= 0:
                problems.append(f"'{key}'[{pattern!r}] must be a positive number, got {number!r}")
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        problems.append(f"'bias' must be 'none', 'all' or 'lora_only', got {raw.get('bias')!r}")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(raw.get(key, False), bool):
            problems.append(f"'{key}' must be true or false, got {raw.get(key)!r}")
    if problems:
        raise AdapterConfigError(
            f"{where} is invalid:\n  - " + "\n  - ".join(problems) + "\nFix the file or re-save the adapter with PEFT."
        )
