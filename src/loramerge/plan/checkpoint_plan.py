"""Where an adapter's updates go in a checkpoint: module names mapped to tensor names, each
weight's layout, and the tensors that must be untied first (the plan of a checkpoint merge).

Read from the checkpoint's index and config alone, without building the model. What this plan
decides is judged independently by PEFT's own layers (:mod:`loramerge.proof.oracle`).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from loramerge.errors import (
    AdapterMismatchError,
    LoraMergeWarning,
    UnsupportedAdapterError,
)
from loramerge.formats.adapter import ATTENTION, Adapter, AdapterModule
from loramerge.formats.io import read_json_object
from loramerge.formats.shards import (
    CheckpointReader,
)
from loramerge.numerics.delta import Kind, LoraUpdate
from loramerge.plan import skeleton
from loramerge.plan.fused import fused_keys
from loramerge.plan.param_targets import parameter_path, stored_updates
from loramerge.plan.skeleton import conv1d_free, kind_of, layer_kinds, renamed_keys, tied_groups

logger = logging.getLogger(__name__)


def _resolve(names: set[str], wanted: str) -> str | None:
    """The checkpoint tensor name for an adapter's ``wanted`` name, allowing for prefix differences."""
    if wanted in names:
        return wanted
    matches = [n for n in names if n.endswith("." + wanted)]
    if len(matches) == 1:
        return matches[0]
    parts = wanted.split(".")
    for i in range(1, len(parts) - 1):
        tail = ".".join(parts[i:])
        if tail in names:
            return tail
    return None


def _expected_shape(kind: Kind, update: LoraUpdate) -> tuple[int, ...]:
    a, b = update.lora_A, update.lora_B
    if kind == "linear":
        return (int(b.shape[0]), int(a.shape[1]))
    if kind in ("conv1d", "embedding"):
        return (int(a.shape[1]), int(b.shape[0]))
    return (int(b.shape[0]), *(int(s) for s in a.shape[1:]))


@dataclass
class AdapterMapping:
    """Adapter entries resolved to checkpoint tensor names."""

    modules: dict[str, tuple[AdapterModule, Kind]]  # weight tensor name -> module, resolved kind
    biases: dict[str, AdapterModule]  # bias tensor name -> module with a lora_bias
    replaced: dict[str, torch.Tensor]  # tensor name -> replacement
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (ids, rows)
    # a replaced tensor the checkpoint does not store because it is tied to one it does: written as
    # its own tensor (the output unties it), name -> the stored tensor it was tied to
    tied_copies: dict[str, str] = field(default_factory=dict)
    # weight (and LoRA-bias) tensor name -> module name, for modules only PEFT's own layer merges
    # (Adapter.variant_modules)
    variants: dict[str, str] = field(default_factory=dict)
    variant_biases: set[str] = field(default_factory=set)  # the bias tensors among ``variants``
    # an nn.MultiheadAttention's two stored weights among ``variants``: tensor name -> its parameter
    # name in the attention ("in_proj_weight" or "out_proj.weight")
    attention_parts: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> set[str]:
        """Every tensor name the adapter changes."""
        return set(self.modules) | set(self.biases) | set(self.replaced) | set(self.token_rows) | set(self.variants)


def _weight_layout(
    root: Path, module_name: str, mod: AdapterModule, shape: tuple[int, ...], layers: list[dict[str, str] | None]
) -> str:
    """``"linear"`` ([out, in]) or ``"conv1d"`` ([in, out], GPT-2) for a linear-like adapted weight, or
    a problem. A non-square stored shape fits one layout only. A square one fits both, and the
    adapter's ``fan_in_fan_out`` (saved once for all targets) cannot be trusted: the layer class of
    the model the config builds (:mod:`loramerge.plan.skeleton`) decides, as in adapter mode."""
    candidates: tuple[Kind, ...] = ("linear", "conv1d")
    fits = [k for k in candidates if _expected_shape(k, mod.update) == shape]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        return mod.kind
    if conv1d_free(root):  # transformers' code for this model has no Conv1D: every such layer is a Linear
        return "linear"
    if not layers:
        layers.append(layer_kinds(root))
    known = layers[0]
    layer = kind_of(known, module_name) if known is not None else None
    if layer in ("linear", "conv1d"):
        return layer
    why = (
        "transformers cannot build this model from its config.json"
        if known is None
        else f"the model built from config.json has no unique Linear or Conv1D layer named {module_name!r}"
    )
    return (
        f"the weight is square {shape}, so a Linear ([out, in]) and a GPT-2 Conv1D ([in, out]) store it alike, and "
        f"{why}; merging it would be a guess. Merge in memory (loramerge.merge on the loaded model) instead."
    )


def map_adapter(reader: CheckpointReader, adapter: Adapter) -> AdapterMapping:
    """Map every adapter entry to a checkpoint tensor, checking shapes; one error lists every problem."""
    stored = _Stored(reader)
    problems: list[tuple[str, str]] = []
    modules, biases = _map_modules(stored, adapter, problems)
    replaced, tied_copies = _map_replaced(stored, adapter, problems)
    token_rows = _map_token_rows(stored, adapter, problems)
    variants, variant_biases, attention_parts = _map_variants(stored, adapter, problems)
    if adapter.parameter_factors:  # target_parameters: each stored piece of each expert gets its own update
        experts, why = expert_tensors(reader, adapter)
        modules.update(experts)
        problems += why
    if problems:
        problems.sort()
        lines = "\n".join(f"  - {n}: {why}" for n, why in problems)
        raise AdapterMismatchError(
            f"the adapter {str(adapter.path or '<in memory>')!r} does not fit the checkpoint {str(reader.root)!r}, "
            f"{len(problems)} problem(s):\n{lines}\nUse the base checkpoint the adapter was trained on."
        )
    return AdapterMapping(modules, biases, replaced, token_rows, tied_copies, variants, variant_biases, attention_parts)


class _Stored:
    """A checkpoint's stored names, and the model's names resolved to them."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.names = set(reader.names)
        self.layers: list[dict[str, str] | None] = []  # the model's layer kinds, built once if needed
        self._renamed: dict[str, str] | None = None  # transformers' own key conversions, built once if needed

    def resolve(self, wanted: str) -> str | None:
        """The stored name of the model's ``wanted``: as saved, else as transformers' loading renames
        it (VLM and legacy names), else by a unique suffix."""
        if wanted in self.names:
            return wanted
        if self._renamed is None:
            self._renamed = renamed_keys(self.reader.root, self.reader.names)
        return self._renamed.get(wanted) or _resolve(self.names, wanted)

    def missing(self, wanted: str) -> str:
        """Why ``wanted`` resolves to no stored tensor: none is named like it, or several are (listed)."""
        matches = sorted(n for n in self.names if n.endswith("." + wanted))
        if len(matches) > 1:
            return f"ambiguous: {matches} all end like it; the checkpoint's names must say which one is meant"
        return "no tensor named like this in the checkpoint"


def _map_modules(
    stored: _Stored, adapter: Adapter, problems: list[tuple[str, str]]
) -> tuple[dict[str, tuple[AdapterModule, Kind]], dict[str, AdapterModule]]:
    """Each adapted module's stored weight (with its layout, from the model's layer class) and bias."""
    modules: dict[str, tuple[AdapterModule, Kind]] = {}
    biases: dict[str, AdapterModule] = {}
    for module_name, mod in adapter.modules.items():
        tensor = stored.resolve(f"{module_name}.weight")
        if tensor is None:
            problems.append((module_name, stored.missing(f"{module_name}.weight")))
            continue
        shape = stored.reader.tensors[tensor].shape
        kind: Kind = mod.kind
        if kind in ("linear", "conv1d"):
            resolved = _weight_layout(stored.reader.root, module_name, mod, shape, stored.layers)
            if isinstance(resolved, str) and resolved not in ("linear", "conv1d"):
                problems.append((module_name, resolved))
                continue
            kind = cast(Kind, resolved)
        if kind == "conv" and skeleton.conv_padded(stored.reader.root, module_name):
            raise UnsupportedAdapterError(f"{module_name}: {skeleton.PADDED_CONV}; nothing was written.")
        if _expected_shape(kind, mod.update) != shape:
            fits = _expected_shape(kind, mod.update)
            problems.append((module_name, f"{tensor} has shape {shape}; the adapter's A/B fit {fits}"))
            continue
        if mod.update.bias is not None:
            bias = stored.resolve(f"{module_name}.bias")
            if bias is None:
                problems.append((module_name, "the adapter has a lora_bias but the checkpoint has no bias for it"))
                continue
            biases[bias] = mod
        modules[tensor] = (mod, kind)
    return modules, biases


def _map_variants(
    stored: _Stored, adapter: Adapter, problems: list[tuple[str, str]]
) -> tuple[dict[str, str], set[str], dict[str, str]]:
    """The stored weights (and the bias, with a LoRA bias) of each module only PEFT's own layer
    merges (PEFT checks its factors' shapes when it loads them into the layer the config builds);
    an ``nn.MultiheadAttention`` has two, its packed projection and its ``out_proj``."""
    variants: dict[str, str] = {}
    biases: set[str] = set()
    parts: dict[str, str] = {}
    prefix = "base_model.model."
    for module_name, variant in adapter.variant_modules.items():
        names = ("in_proj_weight", "out_proj.weight") if variant == ATTENTION else ("weight",)
        found = {name: stored.resolve(f"{module_name}.{name}") for name in names}
        missing = [f"{module_name}.{name}" for name, tensor in found.items() if tensor is None]
        if missing:
            problems.append((module_name, stored.missing(missing[0])))
            continue
        if f"{prefix}{module_name}.lora_B.bias" in adapter.tensors:
            bias = stored.resolve(f"{module_name}.bias")
            if bias is None:
                problems.append((module_name, "the adapter has a lora_bias but the checkpoint has no bias for it"))
                continue
            variants[bias] = module_name
            biases.add(bias)
        for name, tensor in found.items():
            assert tensor is not None
            variants[tensor] = module_name
            if variant == ATTENTION:
                parts[tensor] = name
    return variants, biases, parts


def _map_replaced(
    stored: _Stored, adapter: Adapter, problems: list[tuple[str, str]]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors the adapter replaces, and those it replaces that the checkpoint ties to another."""
    replaced: dict[str, torch.Tensor] = {}
    tied_copies: dict[str, str] = {}
    tensors = stored.reader.tensors
    for pname, value in adapter.replaced.items():
        tensor = stored.resolve(pname)
        partner = _stored_tie_partner(stored.reader, pname) if tensor is None else None
        if partner is not None and tensors[partner].shape == tuple(value.shape):
            replaced[pname], tied_copies[pname] = value, partner  # e.g. modules_to_save=["lm_head"], tied
        elif tensor is None:
            kind = adapter.replaced_kinds[pname]
            problems.append((pname, f"the adapter replaces this tensor ({kind}) but the checkpoint has none"))
        elif tensors[tensor].shape != tuple(value.shape):
            problems.append(
                (
                    pname,
                    f"the checkpoint's {tensor} has shape {tensors[tensor].shape}, the adapter's {tuple(value.shape)}",
                )
            )
        else:
            replaced[tensor] = value
    return replaced, tied_copies


def _map_token_rows(
    stored: _Stored, adapter: Adapter, problems: list[tuple[str, str]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Trainable-token rows by the stored embedding they replace rows of."""
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for pname, (ids, rows) in adapter.token_rows.items():
        tensor = stored.resolve(pname)
        shape = stored.reader.tensors[tensor].shape if tensor is not None else ()
        if tensor is None or len(shape) != 2:
            problems.append((pname, "the adapter replaces token rows of this embedding but the checkpoint has none"))
        elif rows.shape[1] != shape[1] or int(ids.max()) >= shape[0]:
            problems.append(
                (pname, f"rows of {rows.shape[1]} values for token ids up to {int(ids.max())}; {tensor} is {shape}")
            )
        else:
            token_rows[tensor] = (ids, rows)
    return token_rows


def _stored_tie_partner(reader: CheckpointReader, name: str) -> str | None:
    """The stored tensor ``name`` is tied to in the model the checkpoint's config builds (``None``
    when it is not tied, or the model cannot be built)."""
    for group in tied_groups(reader.root) or []:
        if name in group:
            stored = [n for n in group if n in reader.tensors]
            return stored[0] if len(stored) == 1 else None
    return None


_INPUT_EMBEDDING_KEYS = ("embed_tokens", "wte.", "word_embeddings", "embed_in")
_TIEABLE_KEYS = ("embed", "shared", "wte", "wpe", "word_embeddings", "lm_head", "head", "output")


def _read_config(root: Path) -> dict[str, Any]:
    if not (root / "config.json").is_file():
        return {}
    return read_json_object(root / "config.json", "config")


def _untie_plan(root: Path, reader: CheckpointReader, touched: set[str]) -> dict[str, str]:
    """``{tied name: stored name}`` for every tensor that shares storage with one the adapter changes
    (the model's own tied-weights declarations, from the weightless model the config builds): in
    adapter mode the others do not see the delta, so the output writes them with the original values
    and says ``tie_word_embeddings=false``. T5 and BART tie ``shared`` to both ``embed_tokens`` and
    ``lm_head``; decoder LMs tie ``lm_head`` to the input embedding. Without a buildable model, the
    input-embedding / ``lm_head`` tie of the config is the only one known."""
    # transformers ties embeddings and output heads only: the weightless model (2-3 s to build) is
    # consulted when the adapter changes one of those
    groups = tied_groups(root) if any(k in n for n in touched for k in _TIEABLE_KEYS) else []
    if groups is not None:
        plan: dict[str, str] = {}
        for group in groups:
            changed = sorted(n for n in group if n in touched and n in reader.tensors)
            if changed:
                plan.update({n: changed[0] for n in group if n not in reader.tensors})
        if plan:
            warnings.warn(
                f"the checkpoint ties {sorted(plan)} to {sorted(set(plan.values()))}, which the adapter changes: the "
                "output stores them with the original values (as adapter mode computes) and says "
                "tie_word_embeddings=false in config.json.",
                LoraMergeWarning,
                stacklevel=3,
            )
        return plan
    config = _read_config(root)
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
    changed = sorted(n for n in touched if any(k in n for k in _INPUT_EMBEDDING_KEYS))
    if not tied or not changed or "lm_head.weight" in reader.tensors:
        return {}
    if len(changed) != 1:
        raise UnsupportedAdapterError(
            f"the checkpoint ties its embeddings and the adapter changes {changed}; which one is the tied input "
            "embedding is ambiguous. Merge in memory (loramerge.merge), which unties from the model's own ties."
        )
    warnings.warn(
        f"the checkpoint ties lm_head to {changed[0]}, which the adapter changes: the output stores lm_head.weight "
        "with the original values (as adapter mode computes) and says tie_word_embeddings=false in config.json.",
        LoraMergeWarning,
        stacklevel=3,
    )
    return {"lm_head.weight": changed[0]}


def _untie_config(root: Path) -> None:
    path = root / "config.json"
    config = _read_config(root)
    if not config:
        return
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _updates_for(mod: AdapterModule, kind: Kind) -> LoraUpdate:
    """The module's weight update with the resolved kind (a LoRA bias is a separate tensor here)."""
    up = mod.update
    return LoraUpdate(kind, up.lora_A, up.lora_B, mod.scale, up.magnitude, None)


def expert_tensors(
    reader: CheckpointReader, adapter: Adapter
) -> tuple[dict[str, tuple[AdapterModule, Kind]], list[tuple[str, str]]]:
    """The stored tensors that ``adapter``'s ``target_parameters`` change, each with its own plain
    LoRA update, and the problems found. Which parameter each of PEFT's wrappers adapts (and its
    scale) comes from PEFT's own injection into the model ``config.json`` builds, without weights;
    which stored tensors make up that parameter comes from transformers' weight converters."""
    from peft.tuners.lora.layer import ParamWrapper

    from loramerge.plan.injection import ADAPTER, adapter_mode

    mode = adapter_mode(reader.root, adapter)
    if isinstance(mode, str):
        return {}, [("target_parameters", f"cannot plan them: {mode}")]
    fused = fused_keys(reader.root, reader.names)
    shapes = {n: tuple(i.shape) for n, i in reader.tensors.items()}
    found: dict[str, tuple[AdapterModule, Kind]] = {}
    problems: list[tuple[str, str]] = []
    for path, layer in mode.layers.items():
        if not isinstance(layer, ParamWrapper):
            continue
        param = parameter_path(path, layer)
        pieces = fused.get(param)
        if pieces is None:
            problems.append((param, "the checkpoint stores no tensors transformers builds this parameter from"))
            continue
        updates = stored_updates(layer, ADAPTER, pieces, shapes)
        if isinstance(updates, str):
            problems.append((param, f"not merged: {updates}"))
            continue
        r = int(layer.r[ADAPTER])
        alpha = float(layer.lora_alpha[ADAPTER])
        for tensor, up in updates.items():
            module = tensor.removesuffix(".weight")
            found[tensor] = (AdapterModule(module, "linear", r, alpha, up.scale, up), "linear")
    return found, problems
