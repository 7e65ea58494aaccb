"""Loading a base (or merged) transformers model from a local checkpoint directory, safely."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramerge.errors import AdapterNotFoundError, InvalidArgumentError, LoraMergeWarning, UnsafeFormatError
from loramerge.formats.hub_download import hub_path
from loramerge.formats.io import read_json_object

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["load_base", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
_SAFE = ("model.safetensors", "model.safetensors.index.json")
_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype or a name such as ``"bf16"``; ``None`` stays ``None``.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_base(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    model_class: type[PreTrainedModel] | None = None,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a transformers model from a local checkpoint directory or a Hub repo.

    Args:
        path: Directory with ``config.json`` and ``model.safetensors`` (or a sharded index), or a
            Hub repo id (``namespace/name``) when no such directory exists: only safetensors
            weights, configs and tokenizer files are downloaded (through the HF cache).
        dtype: Dtype to load in; default: the dtype stored in the checkpoint.
        device: Where to put the model.
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (loaded with ``weights_only=True``)
            when no safetensors weights exist. Off by default: pickle can run code.
        model_class: The transformers class to instantiate; default: the first of the config's
            ``architectures``, else ``AutoModelForCausalLM``.
        revision: Hub only: branch, tag or commit (default ``main``).
        token: Hub only: token (default ``HF_TOKEN`` or the stored login).
        endpoint: Hub only: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        **kwargs: Passed on to ``from_pretrained``.

    Returns:
        The model, in eval mode.

    Raises:
        AdapterNotFoundError: The directory, its config or its weights are missing.
        UnsafeFormatError: Only pickle weights exist and ``allow_pickle`` is false.

    Example:
        >>> model = load_base("checkpoints/base", dtype="bf16")  # doctest: +SKIP
    """
    root = hub_path(path, revision=revision, token=token, endpoint=endpoint)
    if not root.is_dir():
        raise AdapterNotFoundError(
            f"model directory {str(root)!r} does not exist; pass a folder written by save_pretrained()."
        )
    config_path = root / "config.json"
    if not config_path.is_file():
        raise AdapterNotFoundError(f"{str(config_path)!r} is missing: {str(root)!r} is not a transformers checkpoint.")
    has_safe = any((root / n).is_file() for n in _SAFE) or any(root.glob("model-*.safetensors"))
    has_pickle = any((root / n).is_file() for n in _PICKLE)
    if not has_safe:
        if has_pickle and not allow_pickle:
            raise UnsafeFormatError(
                f"{str(root)!r} has only pickle weights (pytorch_model.bin), which can run arbitrary code when loaded. "
                "Convert them to safetensors, or pass allow_pickle=True (loaded with weights_only=True) if you trust them."
            )
        if not has_pickle:
            raise AdapterNotFoundError(
                f"{str(root)!r} has no model.safetensors (nor a sharded index); the weights are missing."
            )
    import transformers  # here, not at import: ``import loramerge`` stays fast for the checkpoint tools
    from transformers import AutoModelForCausalLM, PreTrainedModel

    cls: Any = model_class
    if cls is None:
        config = read_json_object(config_path, "config")
        archs = config.get("architectures") or []
        found = getattr(transformers, archs[0], None) if archs else None
        cls = found if isinstance(found, type) and issubclass(found, PreTrainedModel) else AutoModelForCausalLM
    torch_dtype = resolve_dtype(dtype)
    kwargs.setdefault("local_files_only", True)
    kwargs["use_safetensors"] = has_safe
    model: Any = cls.from_pretrained(str(root), dtype=torch_dtype if torch_dtype is not None else "auto", **kwargs)
    model = model.to(device)
    model.eval()
    _carry_lineage(model, root)
    logger.info("loaded %s from %s (%s)", type(model).__name__, root, model.dtype)
    return model  # type: ignore[no-any-return]


def _carry_lineage(model: Any, root: Path) -> None:
    """A checkpoint written by ``merge_checkpoint`` keeps its lineage in ``loramerge.json`` and its
    shards' metadata, not in ``config.json``: put it on the loaded model's config, so that
    :func:`~loramerge.unmerge` checks that the adapter it removes is the last one merged. A record
    that cannot be read is warned about and left out (loading does not depend on it)."""
    from loramerge.formats.lineage_records import CONFIG_KEY, LineageError, lineage, set_model_lineage

    if getattr(model.config, CONFIG_KEY, None) is not None:
        return
    try:
        rounds = lineage(root)
    except LineageError as e:
        warnings.warn(
            f"the lineage of {str(root)!r} is not carried onto the model: {e}", LoraMergeWarning, stacklevel=3
        )
        return
    if rounds:
        set_model_lineage(model, rounds)
