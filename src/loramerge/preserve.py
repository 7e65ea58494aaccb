"""Give objects back as they came in: training flags and ``requires_grad`` of every module and
parameter, and the order in which each module registers its parameters.

Anything loramerge runs a model for (probes, references, attaching an adapter for a check) happens
inside :func:`preserved`, so the caller's model comes back in the mode it was handed in: a model in
eval mode is still in eval mode (dropout off), a model being trained is still in training mode.

The order matters for PEFT's ``target_parameters``: running a ``ParamWrapper`` in adapter mode
registers its parameter again (``torch.nn.utils.parametrize``), which moves it to the end of its
module's parameters, and PEFT nests the wrappers of the next adapter in that order, so that the
adapter files saved from it name their tensors otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ModuleFlags", "preserved"]


@dataclass
class ModuleFlags:
    """The training flag of every module and the ``requires_grad`` flag of every parameter of some
    models, by object identity (wrappers that come and go do not matter)."""

    training: dict[int, tuple[nn.Module, bool]] = field(default_factory=dict)
    grads: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict)
    order: dict[int, tuple[nn.Module, tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def of(cls, models: Iterable[nn.Module]) -> ModuleFlags:
        """Record the flags of every module and parameter of ``models``."""
        flags = cls()
        for model in models:
            for module in model.modules():
                flags.training.setdefault(id(module), (module, module.training))
                if len(module._parameters) > 1:
                    flags.order.setdefault(id(module), (module, tuple(module._parameters)))
            for p in model.parameters():
                flags.grads.setdefault(id(p), (p, p.requires_grad))
        return flags

    def restore(self) -> None:
        """Put every recorded flag back."""
        for module, training in self.training.values():
            module.training = training
        for p, grad in self.grads.values():
            if p.requires_grad != grad and (p.is_leaf or not grad):
                p.requires_grad_(grad)
        for module, names in self.order.values():
            current = module._parameters
            if tuple(current) != names and set(names) <= set(current):
                ordered = {n: current[n] for n in names}
                ordered.update((n, v) for n, v in current.items() if n not in ordered)
                current.clear()
                current.update(ordered)

    def carry(self, old: nn.Module, new: nn.Module) -> None:
        """``new`` replaces ``old`` (a dequantized layer, say): give it ``old``'s flags."""
        entry = self.training.get(id(old))
        new.train(entry[1] if entry is not None else old.training)
        grads = [g for _, g in (self.grads.get(id(p), (p, p.requires_grad)) for p in old.parameters())]
        for p in new.parameters():
            p.requires_grad_(any(grads) and p.is_floating_point())
        self.training[id(new)] = (new, new.training)
        for p in new.parameters():
            self.grads[id(p)] = (p, p.requires_grad)


@contextlib.contextmanager
def preserved(*models: nn.Module) -> Iterator[ModuleFlags]:
    """Within the block, do anything to ``models``' modes and grad flags; afterwards they are as before.

    Yields the recorded flags (see :meth:`ModuleFlags.carry` for modules that get replaced).
    """
    flags = ModuleFlags.of(models)
    try:
        yield flags
    finally:
        flags.restore()
