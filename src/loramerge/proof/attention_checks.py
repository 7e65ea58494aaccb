"""The check of a merged ``nn.MultiheadAttention`` against PEFT's own attention layer.

PEFT adapts an attention's packed query/key/value projection and its ``out_proj`` together, and
its layer cannot be run on a linear layer's probes. So the whole attention is probed: seeded
random sequences through PEFT's layer in adapter mode (in the model's dtype, and on a copy widened
to fp64, the reference) before the merge, and through the merged attention after it, judged by the
tolerance rule. The weights PEFT's layer moves while it runs are kept as they were
(:func:`~loramerge.plan.peft_glue.attention_kept`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from loramerge.numerics.tolerance import Tolerance, relative_errors
from loramerge.plan.attention import attention_kept
from loramerge.proof.model_runs import _seed_for
from loramerge.proof.reports import LayerCheck

__all__ = ["AttentionProbe"]


def _run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cast(torch.Tensor, layer(x, x, x, need_weights=False)[0])


@dataclass(frozen=True)
class AttentionProbe:
    """PEFT's attention layer in adapter mode on seeded sequences, measured before the merge.

    Attributes:
        name: The attention's module path.
        x: The probe sequences (query, key and value), in the attention's dtype.
        reference: Adapter mode's output on a copy of PEFT's layer widened to fp64.
        adapter: Adapter mode's output in the attention's dtype.
    """

    name: str
    x: torch.Tensor
    reference: torch.Tensor
    adapter: torch.Tensor

    @classmethod
    def of(cls, name: str, layer: nn.Module, seed: int) -> AttentionProbe:
        """Probe PEFT's attention ``layer`` (the wrapper adapter mode runs) at ``name``."""
        attention = cast(Any, layer).get_base_layer()
        dtype = attention.in_proj_weight.dtype
        shape = (2, 6, attention.embed_dim) if attention.batch_first else (6, 2, attention.embed_dim)
        gen = torch.Generator().manual_seed(_seed_for(name, seed))
        x = torch.randn(shape, generator=gen).to(dtype)
        with attention_kept(layer):
            adapter = _run(layer, x)
            reference = _run(copy.deepcopy(layer).to(torch.float64), x.double())
        return cls(name, x, reference, adapter)

    def check(self, merged: nn.Module, tol: Tolerance) -> LayerCheck:
        """The merged attention (plain ``nn.MultiheadAttention``) on the same sequences, under the rule."""
        out = _run(merged, self.x)
        err, _ = relative_errors(out, self.reference)
        adapter_err, _ = relative_errors(self.adapter, self.reference)
        limit = tol.limit(adapter_err, self.x.dtype)
        passed = math.isfinite(err) and err <= limit
        reason = "" if passed else f"output error {err:.3g} against PEFT's own attention layer exceeds {limit:.3g}"
        dtype = str(self.x.dtype).replace("torch.", "")
        return LayerCheck(
            name=f"{self.name} (attention)",
            kind="attention",
            dtype=dtype,
            residual=math.nan,
            max_ulp=math.nan,
            probe_error=err,
            adapter_error=adapter_err,
            storage_error=math.nan,
            limit=limit,
            passed=passed,
            reason=reason,
        )
