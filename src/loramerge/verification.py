"""Numerical verification: probes, wide-dtype references, the per-layer and whole-model checks.

Two kinds of evidence are gathered (see :mod:`loramerge.tolerance` for the rule):

* **per layer**, on random probe vectors: the merged layer's output, and adapter mode's output in
  the model's dtype, both against the layer's adapter-mode output computed in a wider dtype. This
  needs no copy of the model, so it runs for any model size.
* **whole model**, on probe inputs (seeded random token ids / pixels, or the caller's): the merged
  model's outputs, and adapter mode's, against adapter mode run in a wider dtype. The model is
  widened in place and narrowed back afterwards, which is exact (every bf16/fp16 value is an fp32
  value, every fp32 value an fp64 value); it costs the memory of the widened model, so ``"auto"``
  runs it only when that fits comfortably.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from loramerge.adapter import Adapter
from loramerge.delta import Kind, LoraUpdate, apply_weight, dora_norms, view2d
from loramerge.errors import LoraMergeError
from loramerge.preserve import preserved
from loramerge.quantized import check_supported, checked_dequantize, exact_forward, keep_layout, quantized_layers
from loramerge.reports import LayerCheck, OutputCheck, VerificationReport
from loramerge.tolerance import Tolerance, reference_dtype, relative_errors, ulp, unit_roundoff

__all__ = ["make_probes", "verify"]

logger = logging.getLogger(__name__)

Probes = Mapping[str, torch.Tensor]
CheckOutputs = bool | Literal["auto"]
PROBES_PER_LAYER = 16


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding most of ``model``'s parameters."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_probes(model: nn.Module, *, seed: int = 0, batch: int = 2, seq_len: int = 32) -> dict[str, torch.Tensor]:
    """Seeded random inputs for ``model``: token ids for text models, pixels for vision models,
    log-mel features (Whisper-style) or waveforms for speech models, and decoder token ids for
    encoder-decoder models (T5, BART, Whisper, ...).

    Args:
        model: A transformers model (its ``main_input_name`` and config say what it takes).
        seed: Same seed, same probes.
        batch: Number of probe sequences / images / clips.
        seq_len: Tokens per sequence (also decoder tokens, up to the decoder's length limit).

    Raises:
        LoraMergeError: The model takes inputs loramerge cannot invent; pass ``probes=`` yourself.

    Example:
        >>> make_probes(model)["input_ids"].shape  # doctest: +SKIP
        torch.Size([2, 32])
    """
    inner = getattr(getattr(model, "base_model", None), "model", None) if hasattr(model, "peft_config") else None
    target = cast(nn.Module, inner) if inner is not None else model
    config = getattr(target, "config", None)
    main = getattr(target, "main_input_name", None)
    gen = torch.Generator().manual_seed(seed)
    device = _device(model)
    probes: dict[str, torch.Tensor] = {}
    if config is not None:
        probes = _main_inputs(config, str(main), gen, batch, seq_len, model_dtype(model))
    if not probes:
        raise LoraMergeError(
            f"cannot build probe inputs for {type(target).__name__} (main input {main!r}); pass probes={{...}} with "
            "a small batch of real inputs, or check_outputs=False to rely on the per-layer checks."
        )
    if config is not None and getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in probes:
        decoder = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        vocab = int(getattr(decoder, "vocab_size", 0) or getattr(config, "vocab_size", 0) or 0)
        limit = int(getattr(decoder, "max_target_positions", 0) or getattr(decoder, "max_position_embeddings", 0) or 0)
        length = min(seq_len, limit) if limit > 0 else seq_len
        if vocab <= 0:
            raise LoraMergeError(
                f"cannot build decoder inputs for {type(target).__name__}: its config has no vocab_size; pass probes=."
            )
        probes["decoder_input_ids"] = torch.randint(0, vocab, (batch, length), generator=gen)
    return {k: v.to(device) for k, v in probes.items()}


def _main_inputs(
    config: Any, main: str, gen: torch.Generator, batch: int, seq_len: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's main input, from its config; empty when it cannot be invented."""
    if main == "input_ids":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = int(getattr(text, "vocab_size", 0) or 0)
        if vocab > 0:
            ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if main == "pixel_values":
        channels = int(getattr(config, "num_channels", 3))
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.randn(batch, channels, h, w, generator=gen).to(dtype)}
    if main == "input_features" and getattr(config, "num_mel_bins", None):
        # Whisper-style encoders take exactly 2 frames per source position (a stride-2 convolution)
        frames = 2 * int(getattr(config, "max_source_positions", 0) or 1500)
        features = torch.randn(batch, int(config.num_mel_bins), frames, generator=gen)
        return {"input_features": features.to(dtype)}
    if main == "input_values":
        return {"input_values": torch.randn(batch, 16 * 400, generator=gen).to(dtype)}
    return {}


def first_tensor(output: Any) -> torch.Tensor:
    """The main output tensor of a model call (``logits`` when present)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values: Iterator[Any] = iter(output.values()) if isinstance(output, Mapping) else iter(output)
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise LoraMergeError(f"the model returned no tensor ({type(output).__name__}); pass probes that produce one.")


MIN_JUDGED_OUTPUTS = 1024


def _last_hidden(output: Any) -> torch.Tensor | None:
    """The last hidden state in a transformers model output (decoder's for encoder-decoders), if any."""
    for key in ("decoder_hidden_states", "hidden_states"):
        states = getattr(output, key, None)
        if isinstance(states, (tuple, list)) and states and isinstance(states[-1], torch.Tensor):
            return states[-1]
    last = getattr(output, "last_hidden_state", None)
    return last if isinstance(last, torch.Tensor) else None


@contextlib.contextmanager
def recorded_routes(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record, for the duration, the experts each mixture-of-experts router picks for each token.

    A router is recognised by what it returns: a tuple whose last element is an integer tensor
    ``[tokens, k]`` (transformers' top-k routers). Each call appends that tensor, sorted along
    ``k`` (the choice, not its order), to the yielded list, in the order the routers first ran;
    a router that runs again (a widened run repeating a module in its own dtype) keeps its last
    choice.
    """
    found: list[torch.Tensor] = []
    last_call: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        last = output[-1] if isinstance(output, tuple) and output else None
        if isinstance(last, torch.Tensor) and last.dim() == 2 and not last.is_floating_point():
            last_call[id(module)] = last.detach().sort(dim=-1).values.cpu()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        found.extend(last_call.values())


def run_model(model: nn.Module, probes: Probes, routes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``model(**probes)`` in eval mode without gradients, returning the main output on CPU.

    A main output of fewer than :data:`MIN_JUDGED_OUTPUTS` numbers (a classifier's few logits) is
    too small to judge as a distribution of errors: the last hidden state is appended to it, so the
    tolerance rule sees thousands of outputs (both flattened into one vector). With ``routes``,
    the experts mixture-of-experts routers chose are appended to it (:func:`recorded_routes`).
    """
    if routes is not None:
        with recorded_routes(model) as found:
            out = run_model(model, probes)
        routes.extend(found)
        return out
    with preserved(model):
        model.eval()
        with torch.no_grad():
            out = model(**probes)
            main = first_tensor(out)
            if main.numel() < MIN_JUDGED_OUTPUTS:
                hidden = _last_hidden(out)
                if hidden is None and "output_hidden_states" not in probes:
                    try:
                        hidden = _last_hidden(model(**probes, output_hidden_states=True))
                    except (TypeError, ValueError):  # the model takes no such argument
                        hidden = None
                if hidden is not None and hidden.is_floating_point():
                    main = torch.cat([main.reshape(-1), hidden.reshape(-1).to(main.dtype)])
        return main.detach().to("cpu")


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


def _widened_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Extra memory of the reference run: the widened copy of the largest single module's weights
    (:func:`run_widened` widens one module at a time)."""
    size = torch.empty((), dtype=dtype).element_size()
    largest = 0
    for module in model.modules():
        own = sum(p.numel() * size for p in module.parameters(recurse=False) if p.is_floating_point())
        largest = max(largest, own)
    return largest


def _memory_budget() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def want_output_check(model: nn.Module, check_outputs: CheckOutputs, probes: Probes | None) -> tuple[bool, str]:
    """Whether to run the whole-model check, and a note when it is skipped."""
    if check_outputs is False:
        return False, "whole-model output check off (check_outputs=False); per-layer checks only"
    dtype = model_dtype(model)
    extra = _widened_bytes(model, reference_dtype(dtype))
    if check_outputs == "auto" and extra > _memory_budget():
        return False, (
            f"whole-model output check skipped: the {reference_dtype(dtype)} reference would need {extra / 2**30:.1f} GiB "
            "for its largest module, more than a quarter of this machine's RAM; per-layer checks only "
            "(check_outputs=True forces it)"
        )
    if probes is None:
        try:
            make_probes(model)
        except LoraMergeError as e:
            if check_outputs is True:
                raise
            return False, f"whole-model output check skipped: {e}"
    return True, ""


def probe_batch(
    model: nn.Module, check_outputs: CheckOutputs, probes: Probes | None, seed: int, notes: list[str]
) -> dict[str, torch.Tensor] | None:
    """The probe inputs for the whole-model check, or ``None`` when it is skipped (with a note why)."""
    run, note = want_output_check(model, check_outputs, probes)
    if note:
        notes.append(note)
    if not run:
        return None
    return dict(probes) if probes is not None else make_probes(model, seed=seed)


@dataclass
class ModelReference:
    """Adapter-mode outputs on the probes: in the model's dtype and in the reference dtype.

    ``narrow`` names the modules the reference had to run in the model's own dtype (no kernel for
    the reference dtype); ``note`` says so for a report.
    """

    adapter: torch.Tensor
    reference: torch.Tensor
    dtype: torch.dtype
    reference_dtype: torch.dtype
    narrow: tuple[str, ...] = ()
    routes: tuple[torch.Tensor, ...] = ()  # the experts MoE routers chose in the reference run

    @property
    def note(self) -> str:
        """A report note about modules that could not run in the reference dtype ('' when none)."""
        if not self.narrow:
            return ""
        shown = ", ".join(self.narrow[:6]) + (f" and {len(self.narrow) - 6} more" if len(self.narrow) > 6 else "")
        return (
            f"reference: {len(self.narrow)} module(s) ran in {str(self.dtype).replace('torch.', '')} because torch has "
            f"no {str(self.reference_dtype).replace('torch.', '')} kernel for them: {shown}"
        )


def reference_outputs(model: nn.Module, probes: Probes) -> ModelReference:
    """Run ``model`` (in adapter mode) on ``probes`` in its own dtype and, widened, in the reference dtype.

    bitsandbytes layers compute with their dequantized weight, exactly, in the widened run
    (:func:`loramerge.quantized.exact_forward`).
    """
    dtype = model_dtype(model)
    ref_dtype = reference_dtype(dtype)
    adapter_out = run_model(model, probes)
    narrow: set[str] = set()
    routes: list[torch.Tensor] = []
    with exact_forward(model):
        try:
            with recorded_routes(model) as routes:
                ref = run_widened(model, probes, ref_dtype, fallbacks=narrow)
        except RuntimeError as e:
            if ref_dtype != torch.float64:
                raise
            # Some architectures hard-code fp32 somewhere; fall back to an fp32 reference (then the floor decides).
            logger.info("fp64 reference failed (%s); using fp32", e)
            ref_dtype = torch.float32
            routes = []
            ref = run_model(model, probes, routes)
    return ModelReference(adapter_out, ref.to(ref_dtype), dtype, ref_dtype, tuple(sorted(narrow)), tuple(routes))


def same_route_positions(
    routes: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], probes: Probes, output_shape: torch.Size
) -> torch.Tensor | None:
    """A ``[batch, seq]`` mask of the probe positions where every router chose the same experts as
    in the reference run, and no earlier position of the sequence was routed otherwise (later
    positions attend to it). ``None`` when the routes cannot be matched to positions, nothing was
    rerouted, or more than half of the positions were (then everything is judged)."""
    ids = probes.get("input_ids")
    if ids is None or ids.dim() != 2 or len(routes) != len(reference) or not routes:
        return None
    batch, seq = ids.shape
    if tuple(output_shape[:2]) != (batch, seq):
        return None
    rerouted = torch.zeros(batch * seq, dtype=torch.bool)
    for got, want in zip(routes, reference, strict=True):
        if got.shape != want.shape or got.shape[0] != batch * seq:
            return None
        rerouted |= (got != want).any(dim=-1)
    if not bool(rerouted.any()):
        return None
    keep = ~(rerouted.view(batch, seq).long().cummax(dim=1).values.bool())
    return keep if int((~keep).sum()) * 2 <= batch * seq else None


def storage_baseline(
    model: nn.Module, probes: Probes, weights: Sequence[torch.Tensor], seed: int = 0
) -> tuple[float, float]:
    """How much the model's outputs move when ``weights`` are perturbed by random rounding-sized noise.

    Storing ``W + ΔW`` in a 16-bit dtype rounds every element by up to ½ulp; adapter mode avoids
    part of that (its LoRA weights usually stay fp32). This measures the unavoidable effect
    independently of whether the stored values are right: the model is run widened once as is and
    once with uniform ±½ulp noise added to (widened copies of) ``weights``. The weights themselves
    are never changed.

    Returns:
        ``(relative RMS change, relative max change)`` of the main output.
    """
    dtype = weights[0].dtype if weights else model_dtype(model)
    ref_dtype = reference_dtype(dtype)
    ids = {id(w): i for i, w in enumerate(weights)}

    def noise(i: int) -> Perturb:
        def add(wide: torch.Tensor, stored: torch.Tensor) -> None:
            gen = torch.Generator().manual_seed(_seed_for(f"storage-noise-{i}", seed))
            n = torch.rand(wide.shape, generator=gen, dtype=wide.dtype).sub_(0.5).to(wide.device)
            wide.add_(n.mul_(ulp(stored, stored.dtype).to(wide.dtype)))

        return add

    clean = run_widened(model, probes, ref_dtype)
    noisy = run_widened(model, probes, ref_dtype, {k: noise(i) for k, i in ids.items()})
    return relative_errors(noisy, clean)


def output_check(
    merged: torch.Tensor,
    ref: ModelReference,
    tolerance: Tolerance,
    probes: Probes,
    storage: Callable[[], tuple[float, float]] | None = None,
    routes: Sequence[torch.Tensor] = (),
) -> OutputCheck:
    """Apply the tolerance rule to whole-model outputs.

    The rule allows ``factor * adapter error + floor``; when the merged error is above that and
    ``storage`` is given, the storage-rounding baseline (:func:`storage_baseline`, a callable
    because it costs two wide forward passes) is measured and the limit becomes
    ``factor * hypot(adapter error, storage error) + floor``. The baseline can only widen the
    limit, so it is skipped (reported as NaN) when the merge passes without it.

    ``routes`` (what the merged model's MoE routers chose, see :func:`recorded_routes`): positions
    routed otherwise than in the reference run are left out (:func:`same_route_positions`).
    """
    if merged.shape != ref.reference.shape:
        raise LoraMergeError(
            f"merged output shape {tuple(merged.shape)} differs from adapter mode's {tuple(ref.reference.shape)}"
        )
    keep = same_route_positions(routes, ref.routes, probes, merged.shape)
    rerouted = 0
    if keep is not None:
        rerouted = int((~keep).sum())
        merged = merged[keep]
        ref = dataclasses.replace(ref, adapter=ref.adapter[keep], reference=ref.reference[keep])
    m_rms, m_max = relative_errors(merged, ref.reference)
    a_rms, a_max = relative_errors(ref.adapter, ref.reference)
    s_rms, s_max = math.nan, math.nan
    limit = tolerance.limit(a_rms, ref.dtype)
    if not m_rms <= limit and storage is not None and math.isfinite(m_rms):
        s_rms, s_max = storage()
        limit = tolerance.limit(math.hypot(a_rms, s_rms), ref.dtype)
    shape = next(iter(probes.values())).shape
    ok = math.isfinite(m_rms) and math.isfinite(m_max) and m_rms <= limit
    return OutputCheck(
        dtype=str(ref.dtype).replace("torch.", ""),
        reference_dtype=str(ref.reference_dtype).replace("torch.", ""),
        probe_shape=tuple(int(s) for s in shape),
        merged_error=m_rms,
        adapter_error=a_rms,
        storage_error=s_rms,
        limit=limit,
        merged_max_error=m_max,
        adapter_max_error=a_max,
        storage_max_error=s_max,
        max_abs_diff=float((merged.double() - ref.adapter.double()).abs().max()),
        output_scale=float(ref.reference.abs().max()),
        passed=ok,
        rerouted_positions=rerouted,
    )


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def _input_features(kind: Kind, weight: torch.Tensor) -> int:
    w = view2d(weight)
    return int(w.shape[0]) if kind in ("conv1d", "embedding") else int(w.shape[1])


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """A layer's bias (detached), or ``None``."""
    b = getattr(layer, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


def probe_inputs(name: str, kind: Kind, weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Seeded probe inputs for one layer: token ids for embeddings, vectors in the weight's dtype otherwise."""
    gen = torch.Generator().manual_seed(_seed_for(name, seed))
    if kind == "embedding":
        return torch.randint(0, weight.shape[0], (PROBES_PER_LAYER,), generator=gen).to(weight.device)
    x = torch.randn(PROBES_PER_LAYER, _input_features(kind, weight), generator=gen)
    return x.to(weight.dtype).to(weight.device)


def exact_layer_output(kind: Kind, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A layer's output on probe inputs ``x``, computed in the reference dtype of the weight's dtype."""
    rd = reference_dtype(weight.dtype)
    y = apply_weight(kind, weight, x if kind == "embedding" else x.to(rd), rd)
    return y + bias.to(rd) if bias is not None else y


def storage_rms(kind: Kind, stored: torch.Tensor, x: torch.Tensor, extra: torch.Tensor | None = None) -> float:
    """Expected RMS output error on probes ``x`` caused by rounding every element of ``stored``'s
    exact value to its dtype (independent rounding errors of ±½ulp: variance ulp²/12 each), plus
    ``extra``, a per-element variance in ``stored``'s layout (see :func:`merge_rounding_variance`)."""
    dtype = stored.dtype
    rd = reference_dtype(dtype)

    def ulp_squared(chunk: torch.Tensor) -> torch.Tensor:
        return ulp(chunk, dtype).to(rd).pow(2) / 12

    xx = x if kind == "embedding" else x.to(rd).pow(2)
    variance = apply_weight(kind, stored.detach(), xx, rd, ulp_squared)
    if extra is not None:
        variance = variance + apply_weight(kind, extra, xx, rd)
    return float(variance.double().mean().sqrt())


def merge_rounding_variance(kind: Kind, stored: torch.Tensor, updates: Sequence[LoraUpdate]) -> torch.Tensor | None:
    """Per-element variance of the rounding a faithful merge may add beyond storing ``W + ΔW``.

    loramerge computes ``ΔW`` exactly enough and rounds once; other tools (PEFT among them) compute
    ``ΔW`` in fp32 and, for embeddings, round it to the weight's dtype before adding it. Both are as
    faithful to adapter mode as a correctly rounded merge, so the per-layer check allows, per
    element and update, ``½ulp(ΔW)`` in the stored dtype (variance ulp²/12) and fp32 arithmetic of
    ``ΔW`` (``(r + 2) u₃₂ |s| (|B||A|)``, variance of a uniform error: bound²/3). DoRA's merged
    weight ``m ⊙ (W + ΔW) / ‖W + ΔW‖`` is a sum, a norm, a quotient and a product computed in fp32:
    three fp32 roundings of each element are allowed (bound ``3 u₃₂ |W'|``). ``None`` for fp64 weights.
    """
    if not updates or stored.dtype == torch.float64:
        return None
    u32 = unit_roundoff(torch.float32)
    if any(up.magnitude is not None for up in updates):
        return (3 * u32 * stored.detach().float()).pow(2) / 3
    total = torch.zeros(stored.shape, dtype=torch.float32, device=stored.device)
    for up in updates:
        delta = up.delta(tuple(stored.shape), torch.float32).to(stored.device)
        left, right = up.factors(torch.float32)
        bound = ((up.rank + 2) * u32 * abs(up.scale)) * (left.abs() @ right.abs()).reshape(stored.shape)
        total += ulp(delta, stored.dtype).pow(2) / 12 + bound.to(stored.device).pow(2) / 3
    return total


MAX_PROBE_OUTPUTS = 512


def output_subset(
    name: str, kind: Kind, weight: torch.Tensor, seed: int, max_outputs: int | None
) -> torch.Tensor | None:
    """A seeded sorted sample of at most ``max_outputs`` output features (``None``: all of them)."""
    w = view2d(weight)
    n_out = int(w.shape[0] if kind in ("linear", "conv") else w.shape[1])
    if max_outputs is None or n_out <= max_outputs:
        return None
    gen = torch.Generator().manual_seed(_seed_for(f"outputs:{name}", seed))
    return torch.randperm(n_out, generator=gen)[:max_outputs].sort().values.to(weight.device)


def restrict_weight(kind: Kind, weight: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The part of ``weight`` that produces the output features ``idx`` (a copy; ``idx=None``: all)."""
    if idx is None:
        return weight.detach()
    return weight.detach().index_select(0 if kind in ("linear", "conv") else 1, idx)


def restrict_vector(v: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    """A per-output-feature vector (bias, DoRA magnitude) restricted to ``idx``."""
    if v is None or idx is None:
        return None if v is None else v.detach()
    return v.detach().reshape(-1).index_select(0, idx.to(v.device))


def restrict_update(up: LoraUpdate, idx: torch.Tensor | None) -> LoraUpdate:
    """``up`` restricted to the output features ``idx`` (``lora_B``'s first dimension, for every kind)."""
    if idx is None:
        return up
    b = up.lora_B.detach().index_select(0, idx.to(up.lora_B.device))
    return LoraUpdate(
        up.kind, up.lora_A, b, up.scale, restrict_vector(up.magnitude, idx), restrict_vector(up.bias, idx)
    )


class LayerProbe:
    """Per-layer functional check of one weight on random probe vectors.

    Built from the layer *before* it changes: it records adapter mode's output in the weight's
    dtype and in the reference dtype. :meth:`check` then compares the changed layer's output.
    """

    def __init__(
        self,
        name: str,
        kind: Kind,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        updates: Sequence[LoraUpdate],
        seed: int = 0,
        max_outputs: int | None = None,
    ):
        self.name, self.kind, self.dtype = name, kind, weight.dtype
        self.idx = output_subset(name, kind, weight, seed, max_outputs)
        weight = restrict_weight(kind, weight, self.idx)
        bias = restrict_vector(bias, self.idx)
        updates = [restrict_update(up, self.idx) for up in updates]
        self.updates = updates
        self.ref_dtype = reference_dtype(weight.dtype)
        self.x = probe_inputs(name, kind, weight, seed)
        x_exact = self.x if kind == "embedding" else self.x.to(self.ref_dtype)
        self.x_exact = x_exact
        rd, lp = self.ref_dtype, weight.dtype
        base_ref = apply_weight(kind, weight, x_exact, rd)
        base_lp = apply_weight(kind, weight, self.x)
        if bias is not None:
            base_ref = base_ref + bias.to(rd)
            base_lp = base_lp + bias
        lora_ref = torch.zeros_like(base_ref)
        for up in updates:
            lora_ref = lora_ref + up.lora_output(x_exact, rd)
            if up.bias is not None:
                lora_ref = lora_ref + up.scale * up.bias.detach().to(rd)
        self.reference = base_ref + lora_ref
        self.adapter = (base_lp.float() + lora_ref.to(lp).float()).to(lp)
        dora = [up for up in updates if up.magnitude is not None]
        if dora:
            assert dora[0].magnitude is not None
            factor = dora[0].magnitude.detach().to(rd).reshape(-1) / dora_norms(dora[0], weight).to(rd)
            self.reference = (base_ref - (bias.to(rd) if bias is not None else 0) + lora_ref) * factor + (
                bias.to(rd) if bias is not None else 0
            )
            no_bias = base_lp - (bias if bias is not None else 0)
            self.adapter = (
                (no_bias.float() + lora_ref.to(lp).float()).to(lp) * factor.to(lp) + (bias if bias is not None else 0)
            ).to(lp)

    def outputs(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The output of a layer holding ``weight``/``bias`` on the probes, computed exactly (in the
        reference dtype), so that only the stored values, not the arithmetic, are compared."""
        w, b = restrict_weight(self.kind, weight, self.idx), restrict_vector(bias, self.idx)
        return exact_layer_output(self.kind, w, b, self.x_exact)

    def storage(self, weight: torch.Tensor, merge_rounding: bool = True) -> float:
        """:func:`storage_rms` of ``weight`` on these probes (and output features), with the rounding
        any faithful merge may add (:func:`merge_rounding_variance`) unless ``merge_rounding`` is
        false. That term only widens the limit: a layer within the limit without it is within it."""
        stored = restrict_weight(self.kind, weight, self.idx)
        extra = merge_rounding_variance(self.kind, stored, self.updates) if merge_rounding else None
        return storage_rms(self.kind, stored, self.x, extra)

    def check(
        self,
        value: torch.Tensor,
        tolerance: Tolerance,
        residual: float,
        max_ulp: float,
        extra_reason: str = "",
        storage: float = 0.0,
    ) -> LayerCheck:
        """Check ``value``, the changed layer's exact output on the probes (:meth:`outputs`).

        The layer passes when ``error <= factor * storage_error + floor / 4``: evaluated exactly, the
        stored weight may differ from adapter mode only by about the rounding that storing
        ``W + ΔW`` in its dtype costs anyway. ``storage`` is :func:`storage_rms` of the stored
        weight(s) involved.
        """
        err, _ = relative_errors(value, self.reference)
        a_err, _ = relative_errors(self.adapter, self.reference)
        ref_rms = float(self.reference.double().pow(2).mean().sqrt())
        s_err = storage / ref_rms if ref_rms > 0 else 0.0
        limit = tolerance.factor * s_err + tolerance.floor_for(self.dtype) / 4
        reasons = []
        if not math.isfinite(err) or err > limit:
            reasons.append(
                f"output error {err:.3g} on probe vectors exceeds the limit {limit:.3g} "
                f"(rounding W + ΔW to {self.dtype} explains {s_err:.3g}; adapter mode in {self.dtype}: {a_err:.3g})"
            )
        if extra_reason:
            reasons.append(extra_reason)
        return LayerCheck(
            name=self.name,
            kind=self.kind,
            dtype=str(self.dtype).replace("torch.", ""),
            residual=residual,
            max_ulp=max_ulp,
            probe_error=err,
            adapter_error=a_err,
            storage_error=s_err,
            limit=limit,
            passed=not reasons,
            reason="; ".join(reasons),
        )


def check_stored(
    probe: LayerProbe,
    value: torch.Tensor,
    tolerance: Tolerance,
    residual: float,
    max_ulp: float,
    reason: str,
    weight: torch.Tensor,
) -> LayerCheck:
    """:meth:`LayerProbe.check` with the storage allowance of ``weight``: the term for the rounding a
    faithful merge may add (which only widens the limit) is computed only when the layer fails
    without it, so the verdict is the one the full allowance gives."""
    check = probe.check(value, tolerance, residual, max_ulp, reason, probe.storage(weight, merge_rounding=False))
    if check.passed:
        return check
    return probe.check(value, tolerance, residual, max_ulp, reason, probe.storage(weight))


def peft_layer_output(module: nn.Module, probe: LayerProbe) -> torch.Tensor | None:
    """What PEFT's own LoRA layer (``module``, the wrapper adapter mode runs, with its active
    adapters) computes on ``probe``'s inputs, run in the probe's reference dtype and restricted to
    its output features: an oracle that shares no code with loramerge's merge math.

    A convolution's probes are flattened patches: each is given to the layer as an image of exactly
    one kernel, with the padding of the layer and its LoRA convolutions set to zero for the call, so
    that its one output position is the patch's product. ``None`` where the layer cannot be run this
    way (dilated, grouped or non-zero-padded convolutions, and quantized base layers, whose weights
    cannot be widened).
    """
    if quantized_layers(module):
        return None
    x = probe.x_exact
    unpadded: list[tuple[Any, Any]] = []
    if probe.kind == "conv":
        base = cast(Any, module).get_base_layer()
        if any(d != 1 for d in base.dilation) or base.groups != 1 or base.padding_mode != "zeros":
            return None
        x = x.reshape(x.shape[0], base.in_channels, *base.kernel_size)
        convs = [base, *cast(Any, module).lora_A.values(), *cast(Any, module).lora_B.values()]
        unpadded = [(c, c.padding) for c in convs if isinstance(c, nn.modules.conv._ConvNd)]
    try:
        for conv, _ in unpadded:
            conv.padding = (0,) * len(conv.kernel_size)
        with widened(module, probe.ref_dtype), torch.no_grad(), preserved(module):
            module.eval()
            out = cast(torch.Tensor, module(x)).to(probe.ref_dtype)
    finally:
        for conv, padding in unpadded:
            conv.padding = padding
    if probe.kind == "conv":
        out = out.reshape(out.shape[0], -1)  # one output position: [probes, out channels]
    if probe.idx is not None:
        out = out.index_select(-1, probe.idx.to(out.device))
    return out


def oracle_check(check: LayerCheck, value: torch.Tensor, oracle: torch.Tensor | None) -> LayerCheck:
    """``check`` (from :meth:`LayerProbe.check`) also judged against PEFT's own layer output
    (:func:`peft_layer_output`), under the same limit: a mistake shared by loramerge's merge and its
    own reference (a scale, a layout) cannot pass both."""
    if oracle is None:
        return check
    err, _ = relative_errors(value, oracle)
    if math.isfinite(err) and err <= check.limit:
        return check
    reason = (
        f"output error {err:.3g} against PEFT's own LoRA layer exceeds the limit {check.limit:.3g}: loramerge's "
        "merge and PEFT's adapter mode disagree on this layer"
    )
    return dataclasses.replace(check, passed=False, reason="; ".join(r for r in (check.reason, reason) if r))


def oracle_only_check(
    probe: LayerProbe, value: torch.Tensor, oracle: torch.Tensor, tolerance: Tolerance, storage: float
) -> LayerCheck:
    """The per-layer check of a layer merged by PEFT's own layer (a variant loramerge does not
    model): judged against PEFT's adapter-mode layer alone, allowing ``factor`` times the rounding of
    storing the merged weight plus a quarter of the floor."""
    err, _ = relative_errors(value, oracle)
    ref_rms = float(oracle.double().pow(2).mean().sqrt())
    s_err = storage / ref_rms if ref_rms > 0 else 0.0
    limit = tolerance.factor * s_err + tolerance.floor_for(probe.dtype) / 4
    ok = math.isfinite(err) and err <= limit
    reason = "" if ok else f"output error {err:.3g} against PEFT's own LoRA layer exceeds the limit {limit:.3g}"
    return LayerCheck(
        probe.name,
        probe.kind,
        str(probe.dtype).replace("torch.", ""),
        math.nan,
        math.nan,
        err,
        math.nan,
        s_err,
        limit,
        ok,
        reason,
    )


def weight_space_check(
    kind: Kind, base_w: torch.Tensor, merged_w: torch.Tensor, updates: Sequence[LoraUpdate], tolerance: Tolerance
) -> tuple[float, float, str]:
    """Compare ``merged_w`` with ``base_w + ΔW`` (or the DoRA weight) elementwise, in fp32/fp64."""
    cdt = torch.float64
    base = base_w.detach().to(cdt)
    expected = base.clone()
    slack_terms = torch.zeros_like(base)
    cols = view2d(base).shape[1]
    for up in updates:
        expected += up.delta(base.shape, cdt)
        left, right = up.factors(cdt)
        slack_terms += (abs(up.scale) * (left.abs() @ right.abs())).reshape(base.shape) * (up.rank + 2)
    dora = [up for up in updates if up.magnitude is not None]
    if dora:
        assert dora[0].magnitude is not None
        norms = dora_norms(dora[0], base_w).to(cdt)
        factor = dora[0].magnitude.detach().to(cdt).reshape(-1) / norms
        on_rows = kind in ("linear", "conv")
        shaped = factor.reshape(-1, *([1] * (base.dim() - 1))) if on_rows else factor.reshape(1, -1)
        expected = expected * shaped
        slack_terms = slack_terms * shaped.abs() + expected.abs() * (math.sqrt(cols) + 4)
    residual = merged_w.detach().to(cdt) - expected
    change = float((expected - base).norm())
    rel = float(residual.norm()) / change if change > 0 else float(residual.norm())
    # Whoever merged computed ΔW in at least fp32: allow fp32 arithmetic error on top of the rounding,
    # and ΔW rounded to the merged dtype before it was added (PEFT does that for embeddings): ½ulp(ΔW).
    slack = 2 * unit_roundoff(torch.float32) * slack_terms
    if not dora:
        slack = slack + 0.5 * ulp(expected - base, merged_w.dtype).to(cdt)
    spacing = ulp(expected, merged_w.dtype).to(cdt)
    beyond = (residual.abs() - slack).clamp_min(0) / spacing
    max_ulp = float(beyond.max()) if beyond.numel() else 0.0
    allowed = tolerance.ulp * spacing + slack
    bad = residual.abs() > allowed
    reason = ""
    if not bool(torch.isfinite(residual).all()):
        reason = "the merged weight holds non-finite values"
    elif bool(bad.any()):
        where = int(bad.sum())
        reason = (
            f"W_merged - W_base differs from the adapter's update in {where} of {bad.numel()} elements, by up to "
            f"{max_ulp:.3g} ulp (allowed {tolerance.ulp:g}); wrong scale, transposed update, corrupted tensor or another base?"
        )
    return rel, max_ulp, reason


def loses_precision(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether converting ``value`` to ``dtype`` rounds any element."""
    if not value.is_floating_point() or value.dtype == dtype:
        return False
    return not torch.equal(value.to(dtype).to(value.dtype), value)


def _dequantized_params(base: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A quantized base's parameters, bitsandbytes weights dequantized exactly (as fp32)."""
    out: dict[str, torch.Tensor] = {}
    qlayers = quantized_layers(base)
    for pname, p in base.named_parameters(remove_duplicate=False):
        module_name = pname.rpartition(".")[0]
        value = p.detach()
        if pname.endswith(".weight") and module_name in qlayers:
            value = checked_dequantize(qlayers[module_name], module_name, seed=seed)
        out[pname] = value
    return out


def verify(
    base: nn.Module,
    adapter: Adapter,
    merged: nn.Module,
    *,
    probes: Probes | None = None,
    tolerance: Tolerance | None = None,
    check_outputs: CheckOutputs = "auto",
    seed: int = 0,
) -> VerificationReport:
    """Check that ``merged`` is ``base`` with ``adapter`` merged in, within tolerance.

    Three checks: per adapted layer, ``W_merged - W_base`` against ΔW elementwise (in ulps of the
    merged dtype) and the layer's output on random probe vectors against the wide-dtype reference;
    every other tensor bit-identical to the base (or to the adapter's copy where the adapter
    replaces it); and the whole model's outputs on probe inputs against adapter mode (tolerance
    rule, see :class:`~loramerge.Tolerance`). ``base`` is used in adapter mode temporarily and
    restored exactly.

    Args:
        base: The base model (plain, not a ``PeftModel``).
        adapter: The adapter that was merged.
        merged: The merged model.
        probes: Inputs for the whole-model check (keyword arguments of ``model(...)``); seeded
            random inputs when omitted.
        tolerance: The rule's settings; :class:`~loramerge.Tolerance` defaults when omitted.
        check_outputs: Run the whole-model check: ``True``, ``False`` or ``"auto"`` (when the
            wide-dtype reference fits in a quarter of RAM and probes can be built).
        seed: Seed of the random probes.

    Returns:
        The report; ``report.passed`` says whether everything is within tolerance (this function
        does not raise on a failed check).

    Example:
        >>> report = verify(base, load_adapter(adapter_dir), merged)  # doctest: +SKIP
        >>> report.passed  # doctest: +SKIP
        True
    """
    with keep_layout(base), preserved(base, merged):
        return _verify(base, adapter, merged, probes, tolerance or Tolerance(), check_outputs, seed)


def _verify(
    base: nn.Module,
    adapter: Adapter,
    merged: nn.Module,
    probes: Probes | None,
    tol: Tolerance,
    check_outputs: CheckOutputs,
    seed: int,
) -> VerificationReport:
    from loramerge.peft_glue import adapter_mode, check_compatible  # peft: imported on first use

    kinds = check_compatible(base, adapter)
    check_compatible(merged, adapter)
    check_supported(base)
    quantized = bool(quantized_layers(base))
    if quantized:
        # attaching the adapter below takes a state dict, which makes bitsandbytes convert CPU-layout
        # weights back (changing them slightly): let that happen before anything is measured
        base.state_dict()
    base_params: dict[str, torch.Tensor] = (
        _dequantized_params(base, seed) if quantized else dict(base.named_parameters(remove_duplicate=False))
    )
    merged_params = dict(merged.named_parameters(remove_duplicate=False))
    layers: list[LayerCheck] = []
    judged: list[tuple[LayerProbe, torch.Tensor]] = []
    touched: set[str] = set()
    for name, mod in adapter.modules.items():
        kind = kinds[name]
        update = LoraUpdate(
            kind, mod.update.lora_A, mod.update.lora_B, mod.scale, mod.update.magnitude, mod.update.bias
        )
        saved = adapter.replaced.get(f"{name}.weight")
        base_w = saved.to(base_params[f"{name}.weight"].dtype) if saved is not None else base_params[f"{name}.weight"]
        merged_w = merged_params[f"{name}.weight"]
        base_b: torch.Tensor | None = base_params.get(f"{name}.bias")
        if f"{name}.bias" in adapter.replaced:
            base_b = adapter.replaced[f"{name}.bias"].to(merged_w.dtype)
        merged_b = merged_params.get(f"{name}.bias")
        touched.update({f"{name}.weight", f"{name}.bias"})
        rel, max_ulp, reason = weight_space_check(kind, base_w, merged_w, [update], tol)
        probe = LayerProbe(name, kind, base_w, base_b.detach() if base_b is not None else None, [update], seed)
        out = probe.outputs(merged_w.detach(), merged_b.detach() if merged_b is not None else None)
        layers.append(probe.check(out, tol, rel, max_ulp, reason, probe.storage(merged_w)))
        judged.append((probe, out))
    if not quantized and judged:  # PEFT's own layers, attached to the base as adapter mode runs them
        with adapter_mode(base, [adapter]) as peft_model:
            inner = cast(nn.Module, cast(Any, peft_model).base_model.model)
            oracles = [peft_layer_output(inner.get_submodule(p.name), p) for p, _ in judged]
        layers = [oracle_check(c, out, o) for c, (_, out), o in zip(layers, judged, oracles, strict=True)]
    changed: list[str] = []
    checked = 0
    merged_state = merged.state_dict()
    # a dequantizing merge converts every tensor of a quantized base to the merged dtype
    base_state = base.state_dict() if not quantized else base_params
    token_rows = dict(adapter.token_rows)
    for pname, entry in adapter.token_rows.items():  # a tied output head looks the same rows up
        owner = base_params.get(pname)
        token_rows.update({n: entry for n, p in base_params.items() if owner is not None and p is owner})
    for pname, tensor in base_state.items():
        if pname in touched:
            continue
        other = merged_state.get(pname)
        expected = adapter.replaced[pname].to(tensor.dtype) if pname in adapter.replaced else tensor
        if pname in token_rows:  # trainable tokens: PEFT's rows replace the base's
            ids, new_rows = token_rows[pname]
            expected = tensor.index_copy(0, ids.to(tensor.device), new_rows.to(tensor))
        if quantized and other is not None and expected.is_floating_point():
            expected = expected.to(other.dtype)
        checked += 1
        if other is None or other.shape != expected.shape or not torch.equal(other.to(expected.device), expected):
            changed.append(pname)
    notes: list[str] = []
    outputs = None
    batch = probe_batch(base, check_outputs, probes, seed, notes)
    if batch is not None:
        routes: list[torch.Tensor] = []
        merged_out = run_model(merged, batch, routes)
        adapted = [merged_params[f"{name}.weight"] for name in adapter.modules]
        with adapter_mode(base, [adapter]) as peft_model:
            ref = reference_outputs(peft_model, batch)
        if ref.note:
            notes.append(ref.note)
        if quantized:  # judged in the merged dtype; tensors rounded by the conversion count as storage
            ref = dataclasses.replace(ref, dtype=model_dtype(merged))
            adapted += [
                merged_params[n]
                for n, v in base_params.items()
                if n in merged_params and loses_precision(v, merged_params[n].dtype)
            ]
        outputs = output_check(
            merged_out, ref, tol, batch, lambda: storage_baseline(merged, batch, adapted, seed), routes
        )
    passed = all(c.passed for c in layers) and not changed and (outputs is None or outputs.passed)
    return VerificationReport(
        operation="verify",
        passed=passed,
        tolerance=tol,
        layers=tuple(layers),
        outputs=outputs,
        unchanged_checked=checked,
        unexpected_changes=tuple(sorted(changed)),
        notes=tuple(notes),
    )
