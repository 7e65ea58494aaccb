"""Running a model as if its weights were wider (fp32 or fp64): the reference runs of the
whole-model check, one module widened at a time so that the extra memory is one module's weights."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from loramerge.proof.model_runs import Probes, run_model

logger = logging.getLogger(__name__)

_ORDER = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


Perturb = Callable[[torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def widened(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Temporarily convert every narrower floating tensor of ``model`` to ``dtype``, exactly undone after.

    Costs the memory of the widened model; :func:`run_widened` needs only one module at a time.
    """
    changed: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        for t in itertools.chain(model.parameters(), model.buffers()):
            if id(t) in seen or not t.is_floating_point() or _ORDER.get(t.dtype, 3) >= _ORDER[dtype]:
                continue
            seen.add(id(t))
            changed.append((t, t.data))
            t.data = t.data.to(dtype)
        yield
    finally:
        for t, original in changed:
            t.data = original


def run_widened(
    model: nn.Module,
    probes: Probes,
    dtype: torch.dtype,
    perturb: dict[int, Perturb] | None = None,
    fallbacks: set[str] | None = None,
) -> torch.Tensor:
    """Run ``model`` on ``probes`` as if all its weights were ``dtype``, widening one module at a time.

    Each module's own parameters are converted to ``dtype`` just before its forward (applying
    ``perturb[id(param)]`` to the converted copy, if given) and put back right after, so the extra
    memory is one module's weights. Buffers are widened for the whole call (they are small). If a
    module uses another module's weights directly (the dtypes then clash), the whole model is
    widened instead. If some module cannot run in ``dtype`` at all (torch has no fp64 kernel for
    it, e.g. grouped expert matmuls), that module alone runs in its own dtype, its inputs narrowed
    and its outputs widened again; its name is added to ``fallbacks``.
    """
    wide_probes = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in probes.items()}
    try:
        return _run_per_module(model, wide_probes, dtype, perturb, None)
    except RuntimeError as e:
        logger.info("module-by-module widening failed (%s); widening the whole model", e)
    try:
        with widened(model, dtype):
            if perturb:
                for p in model.parameters():
                    if id(p) in perturb:
                        perturb[id(p)](p.data, p.data)
            return run_model(model, wide_probes)
    except RuntimeError as e:
        logger.info("the whole model cannot run in %s (%s); falling back module by module", dtype, e)
    found: set[str] = set()
    out = _run_per_module(model, wide_probes, dtype, perturb, found)
    if fallbacks is not None:
        fallbacks.update(found)
    return out


def _convert(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (through tuples, lists and dicts) converted to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return (
            type(value)(*(_convert(v, dtype) for v in value))
            if hasattr(value, "_fields")
            else tuple(_convert(v, dtype) for v in value)
        )
    if isinstance(value, list):
        return [_convert(v, dtype) for v in value]
    if isinstance(value, dict):
        for key in list(value):
            value[key] = _convert(value[key], dtype)
        return value
    return value


def _run_per_module(
    model: nn.Module,
    wide_probes: Probes,
    dtype: torch.dtype,
    perturb: dict[int, Perturb] | None,
    fallbacks: set[str] | None,
) -> torch.Tensor:
    """:func:`run_widened`'s module-by-module run; ``fallbacks=None``: no module may fall back."""
    names = {id(m): n for n, m in model.named_modules()}
    wrapped: list[tuple[nn.Module, Any]] = []  # each module and the instance forward it had (exact_forward's)

    def widen_params(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and _ORDER.get(p.dtype, 3) < _ORDER[dtype]:
                saved.append((p, p.data))
                wide = p.data.to(dtype)
                if perturb is not None and id(p) in perturb:
                    perturb[id(p)](wide, p.data)
                p.data = wide
        return saved

    def wrap(module: nn.Module) -> None:
        original = module.forward
        native = next((p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()), dtype)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if type(module) is nn.Embedding and perturb is None:
                # a lookup returns stored values exactly: widening its output equals widening the table
                return _convert(original(*args, **kwargs), dtype)
            saved = widen_params(module)
            try:
                return original(*args, **kwargs)
            except RuntimeError:
                if fallbacks is None:
                    raise
                for p, data in saved:
                    p.data = data
                saved = []
                fallbacks.add(names.get(id(module), type(module).__name__))
                out = original(*_convert(list(args), native), **_convert(dict(kwargs), native))
                return _convert(out, dtype)
            finally:
                for p, data in saved:
                    p.data = data

        wrapped.append((module, module.__dict__.get("forward")))
        module.forward = forward

    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                wrap(module)
        for b in model.buffers():
            if b.is_floating_point() and _ORDER.get(b.dtype, 3) < _ORDER[dtype]:
                buffers.append((b, b.data))
                b.data = b.data.to(dtype)
        return run_model(model, wide_probes)
    finally:
        for module, previous in wrapped:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        for b, original in buffers:
            b.data = original
