"""A layer's output computed from a given weight, for each layer kind: what the per-layer probes
evaluate, exactly and in any dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loramerge.numerics import delta
from loramerge.numerics.delta import Kind, _outputs_on_rows, view2d

__all__ = ["apply_weight"]


def apply_weight(
    kind: Kind,
    weight: torch.Tensor,
    x: torch.Tensor,
    dtype: torch.dtype | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The layer's function (without bias) on probe inputs: ``x @ W^T`` in the kind's layout.

    With ``dtype`` the product is computed in that dtype, converting the weight in chunks of output
    features (never a full-size copy), and ``transform`` (if given) is applied to each converted
    chunk first; without ``dtype``, in the weight's own dtype.
    """
    w = view2d(weight.detach())
    if kind == "embedding":
        rows = w[x]
        if dtype is None:
            return rows
        rows = rows.to(dtype)
        return transform(rows) if transform is not None else rows
    on_rows = _outputs_on_rows(kind)
    if dtype is None:
        xd = x.to(w.dtype)
        return xd @ w.t() if on_rows else xd @ w
    xd = x.to(dtype)
    n_out = w.shape[0] if on_rows else w.shape[1]
    n_in = w.shape[1] if on_rows else w.shape[0]
    step = max(1, delta.CHUNK_ELEMENTS // max(1, n_in))
    parts = []
    for start in range(0, n_out, step):
        chunk = (w[start : start + step] if on_rows else w[:, start : start + step]).to(dtype)
        if transform is not None:
            chunk = transform(chunk)
        parts.append(xd @ chunk.t() if on_rows else xd @ chunk)
    return torch.cat(parts, dim=1)
