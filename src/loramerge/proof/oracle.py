"""The reference a checkpoint merge is judged against: PEFT's adapter mode, rebuilt without weights.

A check must not share code with what it checks. :mod:`loramerge.operations.checkpoint` plans a merge from
tensor names and the adapter file; this module asks transformers and PEFT instead. transformers
builds the base model from the checkpoint's ``config.json`` on the ``meta`` device (no memory),
PEFT wraps and loads the adapter into it as ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)``
does, and every LoRA layer PEFT made is then run on seeded probes, with its base weight read from
the base checkpoint, against the same base layer holding the merged weight. Which module is adapted,
its layer class (so Linear or GPT-2 ``Conv1D`` layout), its scale, its variant, and which stored
tensors are tied to it all come from transformers and PEFT: none from loramerge's own plan or
delta math. Every tensor tied to an adapted one must still hold what adapter mode uses for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loramerge.formats.adapter import Adapter
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.tolerance import Tolerance
from loramerge.plan.injection import ADAPTER, AdapterMode, adapter_mode
from loramerge.plan.skeleton import meta_model, renamed_keys, tied_names
from loramerge.proof.oracle_attention import judge_attention
from loramerge.proof.oracle_layers import (
    _convert,
    _holding,
    _layer_check,
    _param_check,
    _Pieces,
    _pieces,
    layer_family,
)
from loramerge.proof.reports import LayerCheck

__all__ = ["Judgement", "OracleResult", "check_merged_checkpoint", "judge_by_peft"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OracleResult:
    """What the oracle found about a merged checkpoint.

    Attributes:
        layers: One check per LoRA layer PEFT made, against PEFT's own layer.
        problems: Other tensors that do not hold what adapter mode uses, each with the reason.
        changed: The merged checkpoint's tensor names adapter mode changes or adds (adapted
            weights and biases, replaced tensors, untied copies); every other tensor must equal the base's.
        added: Of ``changed``, those the base checkpoint does not store (untied copies).
        adapted: How many LoRA layers PEFT made (``len(layers)`` unless ``every_layer=False``).
    """

    layers: tuple[LayerCheck, ...]
    problems: tuple[str, ...]
    changed: frozenset[str]
    added: frozenset[str]
    adapted: int = 0


class _Names:
    """Model parameter names resolved to one checkpoint's stored tensors, ties included."""

    def __init__(
        self,
        reader: CheckpointReader,
        prefix: str,
        groups: tuple[tuple[str, ...], ...] | Callable[[], tuple[tuple[str, ...], ...]],
    ):
        self.reader, self.prefix = reader, prefix
        self.stored = set(reader.stored)
        self._groups = groups
        self._group: dict[str, tuple[str, ...]] | None = None
        self._renamed: dict[str, str] | None = None

    @property
    def group(self) -> dict[str, tuple[str, ...]]:
        """Parameter name → its tie group (built on first use: it may need the weightless model)."""
        if self._group is None:
            groups = self._groups() if callable(self._groups) else self._groups
            self._group = {name: g for g in groups for name in g}
        return self._group

    def direct(self, param: str) -> str | None:
        """The stored tensor saved under ``param``'s name (allowing the model's base prefix)."""
        candidates = [param]
        if self.prefix:
            candidates.append(f"{self.prefix}.{param}")
            if param.startswith(self.prefix + "."):
                candidates.append(param[len(self.prefix) + 1 :])
        found = next((c for c in candidates if c in self.stored), None)
        if found is None:  # as transformers' own loading renames stored names (VLM, legacy names)
            if self._renamed is None:
                self._renamed = renamed_keys(self.reader.root, sorted(self.stored))
            found = self._renamed.get(param)
        return found

    def provided(self, param: str) -> str | None:
        """The stored tensor whose value ``param`` gets when the checkpoint is loaded. transformers
        (5.x) ties a parameter the checkpoint does not store to the member of its tie group that it
        does store, and leaves members stored with different values untied (with a warning)."""
        for member in (param, *self.group.get(param, ())):
            found = self.direct(member)
            if found is not None:
                return found
        return None


def check_merged_checkpoint(
    base_root: Path,
    merged_root: Path,
    adapter: Adapter,
    tolerance: Tolerance,
    *,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    mode: AdapterMode | None = None,
    every_layer: bool = True,
    plan: Mapping[str, Any] | None = None,
    rounded_base: bool = False,
) -> OracleResult | str:
    """Judge the checkpoint at ``merged_root`` against adapter mode on ``base_root`` (see the module
    docstring), or say why adapter mode cannot be rebuilt (then nothing was checked).

    ``every_layer=False`` runs PEFT's layer for one layer of each :func:`layer_family` (and every
    layer tied to another tensor or carrying a saved base) instead of all: the mistakes only this
    check can see (a layout, a scale, a variant, a tie) are the same for every layer of a family,
    while loramerge's own per-layer probes and the digests of every tensor cover each layer. Which
    tensors change is still decided for every layer. ``plan`` (module name → what the merge did
    with it, e.g. its layout and scale) splits families further, so that a layer the merge treated
    unlike the rest of its family is run through PEFT's layer too. ``rounded_base``: the base was
    itself computed and rounded (an unmerge's output, judged by merging it again): its rounding is
    allowed too.

    ``dtype``: the merge converted every floating tensor to it (the base is compared after the same
    conversion)."""
    built = mode if mode is not None else adapter_mode(base_root, adapter)
    if isinstance(built, str):
        return built
    judge = _Judge(built, base_root, merged_root, tolerance, dtype, seed, every_layer, plan or {}, rounded_base)
    attentions = [n for n, layer in built.layers.items() if type(layer).__name__ == "MultiheadAttention"]
    for name, layer in built.layers.items():
        if name in attentions:
            judge_attention(judge, name, layer)
        elif any(name.startswith(f"{a}.base_layer.") for a in attentions):
            continue  # an attention's out_proj: judged with its attention
        elif type(layer).__name__ == "ParamWrapper":  # target_parameters: a parameter stored in pieces
            judge.wrapper(name, layer)
        else:
            judge.layer(name, layer)
    judge.tokens()
    judge.saved()
    judge.ties()
    added = frozenset(judge.changed - set(judge.base.reader.stored))
    adapted = len(built.layers) - sum(any(n.startswith(f"{a}.base_layer.") for a in attentions) for n in built.layers)
    return OracleResult(tuple(judge.checks), tuple(judge.problems), frozenset(judge.changed), added, adapted)


class _Judge:
    """One judgement of a merged checkpoint: what was checked, what changed, what is wrong."""

    def __init__(
        self,
        mode: AdapterMode,
        base_root: Path,
        merged_root: Path,
        tolerance: Tolerance,
        dtype: torch.dtype | None,
        seed: int,
        every_layer: bool,
        plan: Mapping[str, Any],
        rounded_base: bool,
    ) -> None:
        self.mode, self.base_root, self.tolerance, self.dtype, self.seed = mode, base_root, tolerance, dtype, seed
        self.every_layer, self.plan, self.rounded_base = every_layer, plan, rounded_base
        groups = mode.groups

        def merged_groups() -> tuple[tuple[str, ...], ...]:  # the ties transformers applies when loading the output
            model = meta_model(merged_root)
            return groups if isinstance(model, str) else tied_names(model)

        self.base = _Names(CheckpointReader(base_root), mode.prefix, mode.groups)
        self.merged = _Names(CheckpointReader(merged_root), mode.prefix, merged_groups)
        self.problems: list[str] = []
        self.changed: set[str] = set()
        self.covered: set[str] = set()  # model parameters whose adapter-mode value was checked
        self.checks: list[LayerCheck] = []
        self.tied = {member for group in mode.groups for member in group}
        self.families: set[tuple[Any, ...]] = set()
        self.pieces: dict[str, _Pieces] = {}

    def read(self, names: _Names, param: str, what: str) -> torch.Tensor | None:
        stored = names.provided(param)
        if stored is None:
            self.problems.append(f"{param}: the {what} checkpoint holds no tensor for it (nor for a tensor tied to it)")
            return None
        return names.reader.get(stored)

    def _judged(self, name: str, layer: nn.Module, special: bool = False) -> bool:
        """Whether PEFT's layer runs for this layer: every layer, or the first of its family."""
        family = (*layer_family(name, layer), self.plan.get(name))
        judge = self.every_layer or special or family not in self.families
        self.families.add(family)
        return judge

    def wrapper(self, name: str, layer: nn.Module) -> None:
        """A ``target_parameters`` wrapper: its parameter, stored in pieces, against PEFT's ``ParamWrapper``."""
        if not self.pieces:
            self.pieces.update(_pieces(self.base_root, list(self.base.reader.names)))
        judge = self._judged(name, layer)
        check = _param_check(
            name,
            layer,
            self.pieces,
            self.base.reader,
            self.merged.reader,
            self.dtype,
            judge,
            self.changed,
            self.problems,
        )
        if check is not None:
            self.checks.append(check(self.tolerance, self.seed, self.rounded_base))

    def layer(self, name: str, layer: nn.Module) -> None:
        """A LoRA layer: its merged weight (and bias) against PEFT's layer in adapter mode on probes."""
        base = cast(Any, layer).get_base_layer()
        base_values: dict[str, torch.Tensor] = {}
        merged_values: dict[str, torch.Tensor] = {}
        params = dict(base.named_parameters(recurse=False))
        placeholders = self.mode.placeholders
        special = any(f"{name}.{n}" in self.tied or id(p) not in placeholders for n, p in params.items())
        judge = self._judged(name, layer, special)
        lora_bias = bool(cast(Any, layer).lora_bias.get(ADAPTER, False))
        for pname, p in params.items():
            param = f"{name}.{pname}"
            self.covered.add(param)
            stored = self.merged.provided(param)
            if not judge:  # which tensors change is still decided, from PEFT's layer
                if stored is not None and (pname == "weight" or lora_bias):
                    self.changed.add(stored)
                continue
            if id(p) not in placeholders:
                original: torch.Tensor | None = p.detach()  # the adapter file carries this base tensor
            else:
                original = self.read(self.base, param, "base")
            got = self.read(self.merged, param, "merged")
            if original is None or got is None:
                continue
            base_values[pname] = _convert(original, self.dtype if self.dtype is not None else got.dtype)
            merged_values[pname] = got
            if stored is not None and (pname == "weight" or lora_bias or id(p) not in placeholders):
                self.changed.add(stored)
        if "weight" in merged_values:
            tol, seed = self.tolerance, self.seed
            self.checks.append(_layer_check(name, layer, base_values, merged_values, tol, seed, self.rounded_base))

    def tokens(self) -> None:
        """Trainable tokens: the stored rows must be PEFT's own merged rows."""
        for name, wrapper in self.mode.tokens.items():
            param = f"{name}.weight"
            self.covered.add(param)
            original, got = self.read(self.base, param, "base"), self.read(self.merged, param, "merged")
            if original is None or got is None:
                continue
            stored = self.merged.provided(param)
            assert stored is not None
            self.changed.add(stored)
            layer = cast(Any, wrapper).token_adapter
            with torch.no_grad(), _holding(layer.base_layer, {"weight": _convert(original, got.dtype)}):
                expected = layer.get_merged_weights([ADAPTER]).detach()
            if got.shape != expected.shape or not torch.equal(got, expected):
                self.problems.append(f"{stored}: its rows are not PEFT's trainable-tokens rows over the base's")

    def saved(self) -> None:
        """Tensors adapter mode takes from the adapter file (``modules_to_save``, trained biases)."""
        for param, value in self.mode.saved.items():
            if param in self.covered:
                continue
            self.covered.add(param)
            got = self.read(self.merged, param, "merged")
            stored = self.merged.provided(param)
            if got is None or stored is None:
                continue
            self.changed.add(stored)
            expected = _convert(value, got.dtype)
            if got.shape != expected.shape or not torch.equal(got, expected):
                self.problems.append(
                    f"{stored}: differs from the adapter's copy, which adapter mode uses instead of the base's"
                )

    def ties(self) -> None:
        """The other members of a tie keep the value adapter mode gives them."""
        for group in self.mode.groups:
            if not any(member in self.covered for member in group):
                continue
            for member in group:
                if member in self.covered:
                    continue
                stored = self.merged.provided(member)
                original = self.read(self.base, member, "base")
                got = self.read(self.merged, member, "merged")
                if stored is None or original is None or got is None:
                    continue
                self.changed.add(stored)
                if got.shape != original.shape or not torch.equal(got, _convert(original, got.dtype)):
                    self.problems.append(
                        f"{member}: tied to an adapted tensor in the base model, but adapter mode leaves it unchanged; "
                        f"the merged checkpoint gives it the value of {stored}, which differs"
                    )


@dataclass(frozen=True)
class Judgement:
    """loramerge's own per-layer checks, joined with the oracle's (:func:`judge_by_peft`).

    Attributes:
        layers: Every layer check; a layer failing against PEFT's own layer fails, with that reason.
        note: How the reference was made, for the report.
        unexpected: Tensors that do not hold what adapter mode uses.
        changed: The tensors adapter mode changes (``None`` when the oracle could not be built).
    """

    layers: list[LayerCheck]
    note: str
    unexpected: list[str]
    changed: frozenset[str] | None

    def leaves_alone(self, name: str) -> bool:
        """Whether adapter mode certainly leaves the stored tensor ``name`` as it is in the base."""
        return self.changed is not None and name not in self.changed


def judge_by_peft(
    base_root: Path,
    merged_root: Path,
    adapter: Adapter,
    tolerance: Tolerance,
    dtype: torch.dtype | None,
    seed: int,
    own: list[LayerCheck],
    every_layer: bool = True,
    plan: Mapping[str, Any] | None = None,
    rounded_base: bool = False,
) -> Judgement:
    """Run :func:`check_merged_checkpoint` and join its layer checks with loramerge's ``own``."""
    result = check_merged_checkpoint(
        base_root,
        merged_root,
        adapter,
        tolerance,
        dtype=dtype,
        seed=seed,
        every_layer=every_layer,
        plan=plan,
        rounded_base=rounded_base,
    )
    if isinstance(result, str):
        note = (
            f"not judged against PEFT's own layers: {result}; the per-tensor checks follow loramerge's own "
            "mapping of the adapter (exact names, no shape guesses)"
        )
        return Judgement(list(own), note, [], None)
    by_name = {c.name: c for c in result.layers}
    layers = []
    for check in own:
        oracle = by_name.pop(check.name, None)
        if oracle is not None and not oracle.passed:
            reason = "; ".join(r for r in (check.reason, oracle.reason) if r)
            check = dataclasses.replace(check, passed=False, reason=reason)
        layers.append(check)
    layers += by_name.values()  # layers PEFT adapts that loramerge's own mapping did not
    names = sorted({p.split(":", 1)[0] for p in result.problems})
    judged = (
        f"all {result.adapted}"
        if len(result.layers) == result.adapted
        else f"{len(result.layers)} of {result.adapted} (one per layer family: class, shape, name, rank, scale, "
        "variant; every tied one)"
    )
    note = (
        f"judged against PEFT's own LoRA layers ({judged}), built from config.json and the adapter file on a "
        "weightless model and run on seeded probes; which tensors change, ties and replaced tensors checked for all"
    )
    if result.problems:
        note += ". Not as adapter mode: " + "; ".join(result.problems[:5])
    return Judgement(layers, note, names, result.changed)
