"""Reading a PEFT LoRA adapter directory into a typed, validated :class:`Adapter`.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the legacy
pickle ``adapter_model.bin``, refused unless the caller opts in). Keys look like
``base_model.model.<module path>.lora_A.weight``; this module turns them into one
:class:`~loramerge.numerics.delta.LoraUpdate` per adapted module plus the full tensors the adapter replaces
(``modules_to_save`` copies, trained biases, saved embedding bases).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from loramerge.errors import AdapterConfigError, AdapterNotFoundError, UnsafeFormatError
from loramerge.formats.adapter_tensors import (
    sort_tensors,
    split_parameter_factors,
    token_rows,
)
from loramerge.formats.hub_download import hub_path
from loramerge.formats.io import read_tensors
from loramerge.numerics.delta import Kind, LoraUpdate

__all__ = ["Adapter", "AdapterModule", "load_adapter"]

from loramerge.formats.adapter_config import PEFT_MERGED_VARIANTS, _validate_config, pattern_value

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


Bias = Literal["none", "all", "lora_only"]


@dataclass(frozen=True)
class AdapterModule:
    """The LoRA update of one module of the base model.

    Attributes:
        name: Module path in the base model, e.g. ``"model.layers.0.self_attn.q_proj"``.
        kind: ``"linear"``, ``"conv1d"`` (GPT-2 style, ``fan_in_fan_out``), ``"embedding"`` or ``"conv"``.
        rank: ``r`` for this module (``rank_pattern`` applied).
        alpha: ``lora_alpha`` for this module (``alpha_pattern`` applied).
        scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
        update: The tensors, as a :class:`~loramerge.numerics.delta.LoraUpdate`.
    """

    name: str
    kind: Kind
    rank: int
    alpha: float
    scale: float
    update: LoraUpdate

    @property
    def use_dora(self) -> bool:
        """Whether this module is a DoRA module (has a magnitude vector)."""
        return self.update.magnitude is not None

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """ΔW in fp32, in the layout of the module's weight.

        ``shape`` is needed for convolutions (the kernel shape); other kinds infer it.
        """
        if shape is None:
            a, b = self.update.lora_A, self.update.lora_B
            if self.kind == "linear":
                shape = (b.shape[0], a.shape[1])
            elif self.kind in ("conv1d", "embedding"):
                shape = (a.shape[1], b.shape[0])
            else:
                shape = (b.shape[0], *a.shape[1:])
        return self.update.delta(shape)


@dataclass(frozen=True)
class Adapter:
    """A validated, typed view of a PEFT LoRA adapter.

    Create it with :func:`load_adapter`. All mappings are read-only and sorted by name.

    Attributes:
        path: The directory it was read from (``None`` when built in memory).
        config: The raw ``adapter_config.json`` contents.
        modules: One :class:`AdapterModule` per adapted module, by module path.
        replaced: Full tensors that *replace* base parameters when the adapter is applied, by
            parameter name: ``modules_to_save`` copies, biases trained with ``bias="all"`` or
            ``"lora_only"``, and saved embedding bases (PEFT's ``save_embedding_layers``).
        replaced_kinds: Why each entry of ``replaced`` exists: ``"modules_to_save"``,
            ``"trained_bias"`` or ``"saved_base"``.
        tensors: The adapter's tensors exactly as stored (keys as in the file).
        token_rows: PEFT's trainable tokens (``trainable_token_indices``): for each embedding
            weight, by parameter name, the token ids and the rows that replace theirs, as
            ``(indices, rows)``. Adapter mode looks those rows up instead of the base's (and, when
            the output head is tied to the embedding, scores with them too).
        parameter_factors: PEFT's ``target_parameters`` (LoRA on raw parameters, e.g. MoE expert
            stacks): ``(lora_A, lora_B)`` by the path of PEFT's wrapper as the file names it
            (``model.layers.0.mlp.experts``, or ``...experts.base_layer`` for a wrapper nested in
            another). Which parameter each adapts, and its scale, is decided when it is planned
            against a model, by PEFT's own injection (wrappers nest in PEFT's order).
        variant_modules: Modules whose LoRA layer holds more than A, B and a scale, by module path,
            with the variant's name (``"KaSA"``, ``"BD-LoRA"``, ``"DoRA on an embedding"``,
            ``"DoRA on a convolution"``, ``"LoRA on an nn.MultiheadAttention"``: its packed
            projection and its ``out_proj``, which PEFT adapts together). They are not in :attr:`modules`: loramerge's own delta
            math does not model them, so every merge sends them through PEFT's own layer, and an
            unmerge needs a receipt.
    """

    path: Path | None
    config: Mapping[str, Any]
    modules: Mapping[str, AdapterModule]
    replaced: Mapping[str, torch.Tensor] = field(default_factory=dict)
    replaced_kinds: Mapping[str, str] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    token_rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    parameter_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    variant_modules: Mapping[str, str] = field(default_factory=dict)

    def weight_names(self, module: str) -> tuple[str, ...]:
        """The parameter names of the weights the adapter changes in ``module``: ``<module>.weight``,
        or an attention's ``in_proj_weight`` and ``out_proj.weight``."""
        if self.variant_modules.get(module) == ATTENTION:
            return (f"{module}.in_proj_weight", f"{module}.out_proj.weight")
        return (f"{module}.weight",)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Paths of the modules that get a low-rank update (variant modules included), sorted."""
        return tuple(sorted({*self.modules, *self.variant_modules}))

    @property
    def base_model_name_or_path(self) -> str | None:
        """The base model the adapter was trained on, as recorded in its config."""
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def uses_dora(self) -> bool:
        """Whether any module is a DoRA module."""
        return any(m.use_dora for m in self.modules.values())

    def delta(self, module_name: str) -> torch.Tensor:
        """ΔW (fp32) of one module; see :meth:`AdapterModule.delta`."""
        try:
            return self.modules[module_name].delta()
        except KeyError:
            raise KeyError(
                f"the adapter has no module {module_name!r}; its modules are {list(self.modules)[:5]}..."
            ) from None

    def num_parameters(self) -> int:
        """Number of stored adapter parameters."""
        return sum(t.numel() for t in self.tensors.values())

    def summary(self) -> str:
        """A human-readable table: module, kind, rank, alpha, scale, ΔW shape."""
        lines = [f"adapter: {self.path or '<in memory>'}", f"base model: {self.base_model_name_or_path or '?'}"]
        lines.append(f"{'module':<60} {'kind':<9} {'r':>4} {'alpha':>7} {'scale':>8} {'dora':>4}")
        for m in self.modules.values():
            lines.append(
                f"{m.name:<60} {m.kind:<9} {m.rank:>4} {m.alpha:>7g} {m.scale:>8.4g} {'yes' if m.use_dora else '':>4}"
            )
        for name, variant in self.variant_modules.items():
            lines.append(f"{name:<60} {variant}, merged by PEFT's own layer")
        for name, (a, b) in self.parameter_factors.items():
            lines.append(f"{name:<60} target_parameters wrapper, lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}")
        for name, kind in self.replaced_kinds.items():
            lines.append(f"{name:<60} replaces the base tensor ({kind}, shape {tuple(self.replaced[name].shape)})")
        total = self.num_parameters()
        lines.append(
            f"{len(self.modules) + len(self.variant_modules)} adapted modules, "
            + (f"{len(self.parameter_factors)} target_parameters wrappers, " if self.parameter_factors else "")
            + f"{len(self.replaced)} replaced tensors, {total:,} parameters"
        )
        return "\n".join(lines)


def build_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: Path | None = None) -> Adapter:
    """Build and validate an :class:`Adapter` from a config dict and its tensors (keys as PEFT saves them)."""
    where = str(path / CONFIG_NAME) if path is not None else "adapter config"
    _validate_config(config, where)
    found = sort_tensors(tensors, set(config.get("modules_to_save") or []))
    problems = found.problems
    parameter_factors = split_parameter_factors(found.parts, list(config.get("target_parameters") or []), problems)
    modules: dict[str, AdapterModule] = {}
    variants: dict[str, str] = {}
    whole = next((name for key, name in PEFT_MERGED_VARIANTS.items() if config.get(key)), None)
    for module_name in _attention_modules(found.parts, problems):
        variants[module_name] = ATTENTION
    for module_name, p in sorted(found.parts.items()):
        variant = _layer_variant(module_name, p, whole, problems)
        if variant is not None:
            variants[module_name] = variant
            continue
        module = _module(module_name, p, config, where, problems)
        if module is not None:
            modules[module_name] = module
    rows = token_rows(config.get("trainable_token_indices"), found.tokens, {*modules, *variants}, problems)
    if problems:
        raise AdapterConfigError(f"{where}: the adapter's tensors are inconsistent:\n  - " + "\n  - ".join(problems))
    if not modules and not variants and not found.replaced and not rows and not parameter_factors:
        raise AdapterConfigError(f"{where}: the adapter contains no LoRA tensors.")
    return Adapter(
        path=path,
        config=MappingProxyType(dict(config)),
        modules=MappingProxyType(modules),
        replaced=MappingProxyType(found.replaced),
        replaced_kinds=MappingProxyType(found.replaced_kinds),
        tensors=MappingProxyType(dict(tensors)),
        token_rows=MappingProxyType(rows),
        parameter_factors=MappingProxyType(parameter_factors),
        variant_modules=MappingProxyType(variants),
    )


ATTENTION = "LoRA on an nn.MultiheadAttention"


def _attention_modules(parts: dict[str, dict[str, torch.Tensor]], problems: list[str]) -> list[str]:
    """PEFT's LoRA on an ``nn.MultiheadAttention`` ``X``: factors for its packed projection under
    ``X`` and for its ``out_proj`` under ``X.base_layer.out_proj`` (taken out of ``parts``: only
    PEFT's attention layer merges the two, together)."""
    found = []
    for name in sorted(parts):
        owner, _, rest = name.rpartition(".base_layer.")
        if rest != "out_proj" or not owner:
            continue
        inner, outer = parts.pop(name), parts.pop(owner, None)
        if outer is None or any(set(p) != {"lora_A", "lora_B"} for p in (inner, outer)):
            problems.append(
                f"{owner}: an nn.MultiheadAttention adapter needs lora_A and lora_B for it and its out_proj"
            )
            continue
        found.append(owner)
    return found


def _layer_variant(
    module_name: str, p: Mapping[str, torch.Tensor], whole: str | None, problems: list[str]
) -> str | None:
    """The variant of one module that only PEFT's own layer merges: ``whole`` (the adapter's, for
    every module), or DoRA on an embedding or a convolution (``None``: plain LoRA or DoRA on a
    linear layer, which loramerge's own math merges)."""
    if "lora_diag" in p and whole != "KaSA":
        problems.append(f"{module_name}: has KaSA's lora_diag but the config sets no kasa_config")
        return None
    embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
    if whole is not None:
        variant = whole
    elif "lora_magnitude_vector" in p and embedding:
        variant = "DoRA on an embedding"
    elif "lora_magnitude_vector" in p and "lora_A" in p and p["lora_A"].dim() > 2:
        variant = "DoRA on a convolution"
    else:
        return None
    pair = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if not all(k in p for k in pair):
        problems.append(f"{module_name}: has {sorted(p)} but needs both the A and the B matrix")
    return variant


def _module(
    module_name: str, p: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str, problems: list[str]
) -> AdapterModule | None:
    """One adapted module from its factors, checked against the config's rank (``None``: a problem was added)."""
    if "lora_embedding_A" in p or "lora_embedding_B" in p:
        a, b, kind = p.get("lora_embedding_A"), p.get("lora_embedding_B"), "embedding"
    else:
        a, b = p.get("lora_A"), p.get("lora_B")
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        kind = "conv" if a is not None and a.dim() > 2 else "conv1d" if fan_in_fan_out else "linear"
    if a is None or b is None:
        problems.append(f"{module_name}: has {sorted(p)} but needs both the A and the B matrix")
        return None
    if a.dim() < 2 or b.dim() < 2:
        problems.append(f"{module_name}: A {tuple(a.shape)} and B {tuple(b.shape)} must be matrices (or conv kernels)")
        return None
    rank = int(a.shape[0])
    if b.shape[1] != rank:
        problems.append(
            f"{module_name}: A has rank {rank} but B has {b.shape[1]} columns (A {tuple(a.shape)}, B {tuple(b.shape)})"
        )
        return None
    expected_rank = int(pattern_value(dict(config.get("rank_pattern") or {}), module_name, int(config["r"])))
    if expected_rank != rank:
        problems.append(f"{module_name}: the config gives rank {expected_rank} but the tensors have rank {rank}")
        return None
    alpha = float(pattern_value(dict(config.get("alpha_pattern") or {}), module_name, float(config["lora_alpha"])))
    scale = alpha / math.sqrt(rank) if bool(config.get("use_rslora", False)) else alpha / rank
    magnitude = p.get("lora_magnitude_vector")
    update = LoraUpdate(kind, a, b, scale, magnitude=magnitude, bias=p.get("lora_B_bias"))  # type: ignore[arg-type]
    return AdapterModule(module_name, kind, rank, alpha, scale, update)  # type: ignore[arg-type]


def load_adapter(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Adapter:
    """Read and validate a PEFT LoRA adapter directory, or download one from the Hub.

    Args:
        path: Directory with ``adapter_config.json`` and ``adapter_model.safetensors``, or a Hub
            repo id (``namespace/name``) when no such directory exists.
        allow_pickle: Accept a legacy ``adapter_model.bin`` (read with ``weights_only=True``) when
            no safetensors file is present. Off by default: pickle files can run code.
        revision: Hub only: branch, tag or commit (default ``main``).
        token: Hub only: token (default ``HF_TOKEN`` or the stored login).
        endpoint: Hub only: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The adapter, with per-module scales resolved and tensors checked against the config.

    Raises:
        AdapterNotFoundError: The directory or a required file is missing.
        AdapterConfigError: The config is malformed or disagrees with the tensors.
        UnsupportedAdapterError: The adapter uses a PEFT feature loramerge cannot merge.
        UnsafeFormatError: Only a pickle file exists and ``allow_pickle`` is false.

    Example:
        >>> adapter = load_adapter(adapter_dir)  # doctest: +SKIP
        >>> adapter.modules["model.layers.0.self_attn.q_proj"].scale  # doctest: +SKIP
        2.0
    """
    root = hub_path(path, revision=revision, token=token, endpoint=endpoint)
    if not root.is_dir():
        raise AdapterNotFoundError(
            f"adapter directory {str(root)!r} does not exist (or is not a directory); pass the folder that PEFT's "
            "save_pretrained() wrote, containing adapter_config.json."
        )
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterNotFoundError(f"{str(config_path)!r} is missing: {str(root)!r} is not a PEFT adapter directory.")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterConfigError(f"{str(config_path)!r} is not valid JSON ({e}); re-save the adapter with PEFT.") from e
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{str(config_path)!r} must hold a JSON object, found {type(raw).__name__}.")
    st_path = root / SAFETENSORS_NAME
    bin_path = root / PICKLE_NAME
    if st_path.is_file():
        tensors = read_tensors(st_path)
    elif bin_path.is_file():
        if not allow_pickle:
            raise UnsafeFormatError(
                f"{str(root)!r} has only the pickle file {PICKLE_NAME}, which can run arbitrary code when loaded. "
                "Convert it to safetensors, or pass allow_pickle=True (it is then read with weights_only=True) "
                "if you trust its source."
            )
        tensors = read_tensors(bin_path, allow_pickle=True)
    else:
        raise AdapterNotFoundError(
            f"{str(root)!r} has no {SAFETENSORS_NAME} (nor {PICKLE_NAME}); the adapter weights are missing."
        )
    logger.debug("read %d adapter tensors from %s", len(tensors), root)
    return build_adapter(raw, tensors, root)
