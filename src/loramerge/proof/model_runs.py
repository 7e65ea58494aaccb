"""Running a whole model for verification: seeded probe inputs, runs in eval mode without
gradients, and whether the whole-model check fits in memory (its widened runs:
:mod:`loramerge.proof.widened_runs`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal, cast

import torch
from torch import nn

from loramerge.errors import LoraMergeError
from loramerge.numerics.tolerance import reference_dtype
from loramerge.preserve import preserved

logger = logging.getLogger(__name__)


Probes = Mapping[str, torch.Tensor]
CheckOutputs = bool | Literal["auto"]


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


def _other_outputs(output: Any, main: torch.Tensor) -> list[torch.Tensor]:
    """The floating tensors a model call returned besides ``main`` (a tuple's, list's or mapping's
    elements, one level down)."""
    if isinstance(output, Mapping):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        return []
    return [v for v in values if isinstance(v, torch.Tensor) and v is not main and v.is_floating_point()]


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
    tolerance rule sees thousands of outputs (both flattened into one vector). A model that has none
    (a module of one's own returning a tuple or a dict) is judged by the largest floating tensor it
    returned instead: a single number (a sum, a pooled score) is one sample of adapter mode's
    rounding error, which can be near zero by luck, and appended to the rest it would still
    dominate the relative error (measured: 3 correct fp32 merges in 20 seeds failed when a model
    returned ``(h.sum(), h)``). With ``routes``,
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
                else:  # a module of one's own: the largest tensor it returned is judged instead
                    main = max([main, *_other_outputs(out, main)], key=lambda t: t.numel())
        return main.detach().to("cpu")


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


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")
