"""The tensors of a PEFT adapter file sorted by what they are, as untrusted data: LoRA factors by
module, full tensors the adapter replaces (``modules_to_save`` copies, trained biases, saved base
layers), trainable-token rows, and the factors of ``target_parameters`` wrappers. Every name and
shape is checked; what does not fit is collected as a problem, never guessed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PEFT_PREFIX", "TRAINING_STATE", "SortedTensors", "sort_tensors", "split_parameter_factors", "token_rows"]

PEFT_PREFIX = "base_model.model."

# Variants that compute plain LoRA at inference and merge as plain LoRA (PEFT's own merge is
# ``W + s B A`` for them): VeLoRA compresses activations for the backward pass only, MonteCLoRA
# samples A only in training, MiCA only chooses how B is initialized (from the base's minor singular
# vectors, leaving the base as it is). Their saved training state is not part of the merge.
TRAINING_STATE = re.compile(r"\.(lora_velora_embed|lora_monteclora_sampler\.[A-Za-z_]+)$")

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?|lora_diag)$"
)


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


@dataclass
class SortedTensors:
    """An adapter file's tensors by role (names without PEFT's ``base_model.model.`` prefix)."""

    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> lora_A, lora_B, ...
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> full tensor
    replaced_kinds: dict[str, str] = field(default_factory=dict)  # modules_to_save, trained_bias, saved_base
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # embedding module -> trainable rows
    problems: list[str] = field(default_factory=list)


def _replaced_kind(name: str, modules_to_save: set[str]) -> tuple[str, str]:
    """The base parameter a full tensor replaces, and why the adapter holds it."""
    if ".base_layer." in name:
        param = name.replace(".base_layer.", ".")
        return param, "trained_bias" if param.endswith(".bias") else "saved_base"
    module = name.rsplit(".", 1)[0]
    if any(module == m or module.endswith("." + m) for m in modules_to_save):
        return name, "modules_to_save"
    return name, "trained_bias" if name.endswith(".bias") else "modules_to_save"


def sort_tensors(tensors: Mapping[str, torch.Tensor], modules_to_save: set[str]) -> SortedTensors:
    """Sort ``tensors`` (keys as PEFT saves them) by role; unknown or malformed ones become problems."""
    out = SortedTensors()
    for key in sorted(tensors):
        name = _strip_prefix(key)
        if name.endswith(".token_adapter.trainable_tokens_delta"):
            out.tokens[name.removesuffix(".token_adapter.trainable_tokens_delta")] = tensors[key]
            continue
        if ".token_adapter." in name or "trainable_tokens" in name:
            out.problems.append(f"{key}: a trainable-tokens tensor loramerge does not know")
            continue
        if TRAINING_STATE.search(name):  # VeLoRA's or MonteCLoRA's training state: not part of the merge
            continue
        match = _LORA_KEY.match(name)
        if match and not tensors[key].is_floating_point():
            dtype = str(tensors[key].dtype).replace("torch.", "")
            out.problems.append(f"{key}: stored as {dtype}; LoRA weights are floating point")
        elif match and any(d == 0 for d in tensors[key].shape):
            out.problems.append(f"{key}: has an empty shape {tuple(tensors[key].shape)}")
        elif match:
            part = match["part"].split(".")[0] + ("_bias" if match["part"] == "lora_B.bias" else "")
            out.parts.setdefault(match["module"], {})[part] = tensors[key]
        elif "lora_" in name:
            out.problems.append(f"{key}: not a LoRA tensor name loramerge knows")
        else:
            param, kind = _replaced_kind(name, modules_to_save)
            out.replaced[param] = tensors[key]
            out.replaced_kinds[param] = kind
    return out


def split_parameter_factors(
    parts: dict[str, dict[str, torch.Tensor]], target_parameters: list[str], problems: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Take the ``target_parameters`` wrappers' factors out of ``parts``: (lora_A, lora_B) by wrapper path."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    owners = [t.rpartition(".")[0] for t in target_parameters]
    for module_name in sorted(parts):
        plain = module_name.replace(".base_layer", "")
        if not any(plain == o or plain.endswith("." + o) for o in owners if o):
            continue
        p = parts.pop(module_name)
        if set(p) != {"lora_A", "lora_B"} or p["lora_A"].dim() != 2 or p["lora_A"].shape[0] != p["lora_B"].shape[1]:
            problems.append(
                f"{module_name}: a target_parameters wrapper needs matching lora_A and lora_B matrices only"
            )
            continue
        found[module_name] = (p["lora_A"], p["lora_B"])
    return found


def token_rows(
    indices: Any, found: Mapping[str, torch.Tensor], lora_modules: set[str], problems: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's trainable tokens: ``trainable_token_indices`` (a list for the input embedding, or a
    dict by module name) joined with each ``token_adapter.trainable_tokens_delta`` tensor."""
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if indices and not found:
        problems.append("trainable_token_indices is set but the file holds no trainable-tokens rows")
    if found and not indices:
        problems.append(f"trainable-tokens rows for {sorted(found)} but no trainable_token_indices in the config")
        return rows
    for module, values in sorted(found.items()):
        if isinstance(indices, dict):
            keys = [k for k in indices if module == k or module.endswith("." + str(k))]
            ids = indices[keys[0]] if len(keys) == 1 else None
        else:
            ids = indices if len(found) == 1 else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            problems.append(f"{module}: trainable_token_indices gives no list of token ids for it")
            continue
        if len(set(ids)) != len(ids):
            problems.append(f"{module}: trainable_token_indices repeats a token id")
            continue
        if not values.is_floating_point() or values.dim() != 2 or values.shape[0] != len(ids):
            problems.append(
                f"{module}: the trainable-tokens rows have shape {tuple(values.shape)}, for {len(ids)} token ids"
            )
            continue
        if module in lora_modules:
            problems.append(f"{module}: both a LoRA update and trainable tokens; merge them as two adapters")
            continue
        rows[f"{module}.weight"] = (torch.tensor(ids, dtype=torch.long), values)
    return rows
