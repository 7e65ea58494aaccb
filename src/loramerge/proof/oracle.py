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

from loramerge.formats.adapter import Adapter
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.tolerance import Tolerance
from loramerge.plan.injection import ADAPTER, AdapterMode, adapter_mode
from loramerge.plan.skeleton import meta_model, renamed_keys, tied_names
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
    mode = built
    base_reader, merged_reader = CheckpointReader(base_root), CheckpointReader(merged_root)
    groups = mode.groups

    def merged_groups() -> tuple[tuple[str, ...], ...]:  # the ties transformers applies when loading the output
        model = meta_model(merged_root)
        return groups if isinstance(model, str) else tied_names(model)

    base_names = _Names(base_reader, mode.prefix, mode.groups)
    merged_names = _Names(merged_reader, mode.prefix, merged_groups)
    problems: list[str] = []
    changed: set[str] = set()
    covered: set[str] = set()  # model parameters whose adapter-mode value was checked
    checks: list[LayerCheck] = []

    def read(names: _Names, param: str, what: str) -> torch.Tensor | None:
        stored = names.provided(param)
        if stored is None:
            problems.append(f"{param}: the {what} checkpoint holds no tensor for it (nor for a tensor tied to it)")
            return None
        return names.reader.get(stored)

    tied = {member for group in mode.groups for member in group}
    families: set[tuple[Any, ...]] = set()
    pieces: dict[str, _Pieces] = {}
    for name, layer in mode.layers.items():
        if type(layer).__name__ == "ParamWrapper":  # target_parameters: a parameter stored in pieces
            if not pieces:
                pieces.update(_pieces(base_root, list(base_reader.names)))
            family = (*layer_family(name, layer), (plan or {}).get(name))
            judge = every_layer or family not in families
            families.add(family)
            check = _param_check(name, layer, pieces, base_reader, merged_reader, dtype, judge, changed, problems)
            if check is not None:
                checks.append(check(tolerance, seed, rounded_base))
            continue
        base = cast(Any, layer).get_base_layer()
        base_values: dict[str, torch.Tensor] = {}
        merged_values: dict[str, torch.Tensor] = {}
        params = dict(base.named_parameters(recurse=False))
        special = any(f"{name}.{n}" in tied or id(p) not in mode.placeholders for n, p in params.items())
        family = (*layer_family(name, layer), (plan or {}).get(name))
        judge = every_layer or special or family not in families
        families.add(family)
        for pname, p in params.items():
            param = f"{name}.{pname}"
            covered.add(param)
            if not judge:  # which tensors change is still decided, from PEFT's layer
                lora_bias = bool(cast(Any, layer).lora_bias.get(ADAPTER, False))
                stored = merged_names.provided(param)
                if stored is not None and (pname == "weight" or lora_bias):
                    changed.add(stored)
                continue
            if id(p) not in mode.placeholders:
                original: torch.Tensor | None = p.detach()  # the adapter file carries this base tensor
            else:
                original = read(base_names, param, "base")
            got = read(merged_names, param, "merged")
            if original is None or got is None:
                continue
            base_values[pname] = _convert(original, dtype if dtype is not None else got.dtype)
            merged_values[pname] = got
            stored = merged_names.provided(param)
            lora_bias = bool(cast(Any, layer).lora_bias.get(ADAPTER, False))
            if stored is not None and (pname == "weight" or lora_bias or id(p) not in mode.placeholders):
                changed.add(stored)
        if "weight" in merged_values:
            checks.append(_layer_check(name, layer, base_values, merged_values, tolerance, seed, rounded_base))
    for name, wrapper in mode.tokens.items():  # trainable tokens: PEFT's own merged rows
        param = f"{name}.weight"
        covered.add(param)
        original, got, stored = read(base_names, param, "base"), read(merged_names, param, "merged"), None
        if original is None or got is None:
            continue
        stored = merged_names.provided(param)
        assert stored is not None
        changed.add(stored)
        layer = cast(Any, wrapper).token_adapter
        with torch.no_grad(), _holding(layer.base_layer, {"weight": _convert(original, got.dtype)}):
            expected = layer.get_merged_weights([ADAPTER]).detach()
        if got.shape != expected.shape or not torch.equal(got, expected):
            problems.append(f"{stored}: its rows are not PEFT's trainable-tokens rows over the base's")
    for param, value in mode.saved.items():
        if param in covered:
            continue
        covered.add(param)
        got = read(merged_names, param, "merged")
        stored = merged_names.provided(param)
        if got is None or stored is None:
            continue
        changed.add(stored)
        expected = _convert(value, got.dtype)
        if got.shape != expected.shape or not torch.equal(got, expected):
            problems.append(f"{stored}: differs from the adapter's copy, which adapter mode uses instead of the base's")
    for group in mode.groups:  # the other members of a tie keep the value adapter mode gives them
        if not any(member in covered for member in group):
            continue
        for member in group:
            if member in covered:
                continue
            stored = merged_names.provided(member)
            original = read(base_names, member, "base")
            got = read(merged_names, member, "merged")
            if stored is None or original is None or got is None:
                continue
            changed.add(stored)
            if got.shape != original.shape or not torch.equal(got, _convert(original, got.dtype)):
                problems.append(
                    f"{member}: tied to an adapted tensor in the base model, but adapter mode leaves it unchanged; "
                    f"the merged checkpoint gives it the value of {stored}, which differs"
                )
    added = frozenset(changed - set(base_reader.stored))
    return OracleResult(tuple(checks), tuple(problems), frozenset(changed), added, len(mode.layers))


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
