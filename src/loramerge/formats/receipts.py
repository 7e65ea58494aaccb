"""Unmerge receipts: what restores the base bit for bit after a merge.

Unmerging computes ``round(W_merged − ΔW)``, which differs from the original ``W`` in a few
elements by one step or so (the merge's rounding cannot be undone from the merged value alone).
A receipt stores, per adapted tensor, the difference between the original and that plain unmerge,
counted in representable steps (the float bit patterns mapped to an ordered integer line), as
int8 compressed with zlib; the rare larger differences (e.g. across zero) are kept exactly beside
it. With a receipt, :func:`apply` gives the original tensor byte for byte, and the SHA-256 of the
original, stored in the receipt, proves it. DoRA norms and the original values of tensors the
adapter replaced (``modules_to_save``) travel in the receipt too.

On disk a receipt is one safetensors file (``loramerge-receipt.safetensors`` beside a merged
checkpoint, or wherever :meth:`Receipt.save` puts it).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramerge.errors import InvalidArgumentError, LoraMergeError

__all__ = ["Receipt", "ReceiptError", "TensorReceipt", "load_receipt"]

FORMAT = "loramerge-receipt/1"
FILENAME = "loramerge-receipt.safetensors"
_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_ESCAPE = -128


class ReceiptError(LoraMergeError, ValueError):
    """A receipt that does not belong to this adapter or model, or is corrupt."""


def _key(t: torch.Tensor) -> torch.Tensor:
    """Each float's position on an ordered integer line: adjacent representable values differ by 1
    (−0.0 and +0.0 are distinct)."""
    width = t.element_size()
    bits = t.detach().contiguous().view(_INTS[width]).to(torch.int64)
    sign_mask = 1 << (8 * width - 1)
    magnitude = bits & (sign_mask - 1)
    return torch.where(bits < 0, -magnitude - 1, magnitude)


def _from_key(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = torch.empty((), dtype=dtype).element_size()
    sign_mask = 1 << (8 * width - 1)
    magnitude = torch.where(key < 0, -key - 1, key)
    bits = torch.where(key < 0, magnitude | sign_mask, magnitude)
    if width < 8:  # back into the signed integer range of the width
        bits = torch.where(bits >= sign_mask, bits - 2 * sign_mask, bits)
    return bits.to(_INTS[width]).view(dtype)


def tensor_sha256(t: torch.Tensor) -> str:
    from loramerge.formats.shard_writer import tensor_digest

    return tensor_digest(t)


@dataclass
class TensorReceipt:
    """The correction for one tensor: ``original = plain unmerge + steps``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    steps: bytes  # zlib of int8 steps; _ESCAPE where the exact key is in the escapes
    escape_index: torch.Tensor  # int64 flat indices
    escape_key: torch.Tensor  # int64 ordered keys of the original
    sha256: str  # of the original tensor

    @property
    def nbytes(self) -> int:
        return len(self.steps) + self.escape_index.numel() * 16


def encode(original: torch.Tensor, recovered: torch.Tensor) -> TensorReceipt:
    """The receipt that turns ``recovered`` (a plain unmerge) into ``original``."""
    if original.shape != recovered.shape or original.dtype != recovered.dtype:
        raise ValueError("original and recovered must have the same shape and dtype")
    want = _key(original.cpu()).reshape(-1)
    diff = want - _key(recovered.cpu()).reshape(-1)
    far = diff.abs() > 127
    steps = torch.where(far, torch.full_like(diff, _ESCAPE), diff).to(torch.int8)
    index = far.nonzero().reshape(-1)
    return TensorReceipt(
        original.dtype,
        tuple(original.shape),
        zlib.compress(steps.numpy().tobytes(), 6),
        index,
        want[index],
        tensor_sha256(original),
    )


def apply(recovered: torch.Tensor, receipt: TensorReceipt, name: str) -> torch.Tensor:
    """``recovered`` corrected by ``receipt``: the original tensor, checked against its SHA-256."""
    if tuple(recovered.shape) != receipt.shape or recovered.dtype != receipt.dtype:
        raise ReceiptError(
            f"{name}: the receipt is for a {receipt.dtype} tensor of shape {receipt.shape}, not "
            f"{recovered.dtype} {tuple(recovered.shape)}; it belongs to another model."
        )
    try:
        raw = zlib.decompress(receipt.steps)
    except zlib.error as e:
        raise ReceiptError(f"{name}: the receipt's data is corrupt ({e}).") from e
    steps = torch.frombuffer(bytearray(raw), dtype=torch.int8).to(torch.int64)
    if steps.numel() != recovered.numel():
        raise ReceiptError(f"{name}: the receipt's data is corrupt (wrong length).")
    key = _key(recovered.cpu()).reshape(-1) + steps
    key[receipt.escape_index] = receipt.escape_key
    out = _from_key(key, recovered.dtype).reshape(recovered.shape).to(recovered.device)
    if tensor_sha256(out) != receipt.sha256:
        raise ReceiptError(
            f"{name}: with the receipt applied the tensor still differs from the original (SHA-256 mismatch): "
            "the receipt is corrupt, or the merged model or adapter is not the one it was written for."
        )
    return out


@dataclass
class Receipt:
    """Everything an unmerge needs to restore the base exactly.

    Attributes:
        adapter_sha256: Fingerprint of the adapter merged (:func:`loramerge.lineage.adapter_fingerprint`).
        tensors: Corrections by tensor name.
        dora_norms: DoRA norms by module name.
        originals: Original values of tensors the adapter replaced, by tensor name.
    """

    adapter_sha256: str
    tensors: dict[str, TensorReceipt] = field(default_factory=dict)
    dora_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of correction data (compressed steps and escapes, norms, originals)."""
        return (
            sum(t.nbytes for t in self.tensors.values())
            + sum(t.numel() * t.element_size() for t in self.dora_norms.values())
            + sum(t.numel() * t.element_size() for t in self.originals.values())
        )

    def check_adapter(self, fingerprint: str) -> None:
        """Refuse a receipt written for another adapter."""
        if fingerprint != self.adapter_sha256:
            raise ReceiptError(
                "this receipt was written when another adapter was merged (adapter SHA-256 "
                f"{self.adapter_sha256[:12]}..., this one {fingerprint[:12]}...); use the receipt of this merge."
            )

    def save(self, path: str | Path) -> Path:
        """Write the receipt as one safetensors file (atomically)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, object] = {"format": FORMAT, "adapter_sha256": self.adapter_sha256, "tensors": {}}
        for i, (name, t) in enumerate(sorted(self.tensors.items())):
            tensors[f"t{i}.steps"] = torch.frombuffer(bytearray(t.steps), dtype=torch.uint8)
            tensors[f"t{i}.escape_index"] = t.escape_index.contiguous()
            tensors[f"t{i}.escape_key"] = t.escape_key.contiguous()
            meta["tensors"][name] = {  # type: ignore[index]
                "slot": i,
                "dtype": str(t.dtype).replace("torch.", ""),
                "shape": list(t.shape),
                "sha256": t.sha256,
            }
        for kind, values in (("dora", self.dora_norms), ("original", self.originals)):
            for name, value in values.items():
                tensors[f"{kind}:{name}"] = value.detach().cpu().contiguous()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "pt", "loramerge": json.dumps(meta)})
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


def load_receipt(path: str | Path) -> Receipt:
    """Read a receipt written by :meth:`Receipt.save`.

    Example:
        >>> receipt = load_receipt("merged/loramerge-receipt-001.safetensors")  # doctest: +SKIP
        >>> unmerge(model, adapter, receipt=receipt)  # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("loramerge", "{}"))
            if meta.get("format") != FORMAT:
                raise ReceiptError(f"{str(path)!r} is not a loramerge receipt ({FORMAT}).")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ReceiptError(f"{str(path)!r} could not be read as a receipt ({e}).") from e
    receipt = Receipt(meta["adapter_sha256"])
    dtypes = {str(d).replace("torch.", ""): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    for name, info in meta["tensors"].items():
        slot = info["slot"]
        receipt.tensors[name] = TensorReceipt(
            dtypes[info["dtype"]],
            tuple(info["shape"]),
            tensors[f"t{slot}.steps"].numpy().tobytes(),
            tensors[f"t{slot}.escape_index"],
            tensors[f"t{slot}.escape_key"],
            info["sha256"],
        )
    for key, value in tensors.items():
        if key.startswith("dora:"):
            receipt.dora_norms[key.removeprefix("dora:")] = value
        elif key.startswith("original:"):
            receipt.originals[key.removeprefix("original:")] = value
    return receipt


def as_receipt(value: Receipt | str | Path | Mapping[str, object]) -> Receipt:
    """A receipt from a :class:`Receipt` or a path."""
    if isinstance(value, Receipt):
        return value
    if isinstance(value, (str, Path)):
        return load_receipt(value)
    raise InvalidArgumentError(f"receipt= takes a Receipt or a path, not {type(value).__name__}")
