"""loramerge: merge, unmerge and verify LoRA adapters, proving every merge numerically.

The lifecycle, one function each::

    base = load_base("base/")                  # safetensors only unless allow_pickle=True
    adapter = load_adapter("adapter/")         # typed, validated view of a PEFT adapter
    model = attach(base, adapter)              # adapter mode (a PeftModel), after a fit check
    result = merge(model)                      # in place, fp32 math, one rounding, verified
    report = verify(base2, adapter, merged)    # weight-space + output checks, any time later
    back = unmerge(merged, adapter)            # remove a saved adapter in any process
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from loramerge.errors import (
    AdapterConfigError,
    AdapterMismatchError,
    AdapterNotFoundError,
    InvalidArgumentError,
    LoraMergeError,
    LoraMergeWarning,
    NonFiniteMergeError,
    OutputWriteError,
    UnmergeImpossibleError,
    UnsafeFormatError,
    UnsafePathError,
    UnsupportedAdapterError,
    UnsupportedQuantizationError,
    VerificationError,
)

if TYPE_CHECKING:
    from loramerge.formats.adapter import Adapter, AdapterModule, load_adapter
    from loramerge.formats.lineage_records import LineageError, lineage
    from loramerge.formats.loading import load_base
    from loramerge.formats.publish import OutputBusyError
    from loramerge.formats.receipts import Receipt, ReceiptError, load_receipt
    from loramerge.numerics.tolerance import Tolerance
    from loramerge.operations.benchmark import BenchReport, bench
    from loramerge.operations.checkpoint import CheckpointMergeReport, merge_checkpoint
    from loramerge.operations.checkpoint_unmerge import unmerge_checkpoint
    from loramerge.operations.checkpoint_verify import verify_checkpoint
    from loramerge.operations.hub import HubError, push_to_hub
    from loramerge.operations.hub_verify import HubVerification, verify_hub
    from loramerge.operations.inmemory import merge
    from loramerge.operations.inmemory_unmerge import unmerge
    from loramerge.operations.rounds import RoundResult, next_round, unmerge_rounds
    from loramerge.operations.verification import verify
    from loramerge.plan.peft_glue import attach
    from loramerge.plan.quant_spec import QuantSpec
    from loramerge.proof.model_runs import make_probes
    from loramerge.proof.reports import LayerCheck, OutputCheck, VerificationReport
    from loramerge.proof.results import MergeResult, UnmergeResult

# Everything but the errors is imported on first use: torch, safetensors, transformers and peft take
# seconds to import, which `loramerge --version`, `--help` and a typo in a command do not need.
_LAZY = {
    **dict.fromkeys(("Adapter", "AdapterModule", "load_adapter"), "loramerge.formats.adapter"),
    **dict.fromkeys(("BenchReport", "bench"), "loramerge.operations.benchmark"),
    "merge_checkpoint": "loramerge.operations.checkpoint",
    "unmerge_checkpoint": "loramerge.operations.checkpoint_unmerge",
    "verify_checkpoint": "loramerge.operations.checkpoint_verify",
    **dict.fromkeys(("HubError", "push_to_hub"), "loramerge.operations.hub"),
    **dict.fromkeys(("HubVerification", "verify_hub"), "loramerge.operations.hub_verify"),
    "merge": "loramerge.operations.inmemory",
    "unmerge": "loramerge.operations.inmemory_unmerge",
    **dict.fromkeys(("LineageError", "lineage"), "loramerge.formats.lineage_records"),
    "load_base": "loramerge.formats.loading",
    "attach": "loramerge.plan.peft_glue",
    "OutputBusyError": "loramerge.formats.publish",
    "QuantSpec": "loramerge.plan.quant_spec",
    **dict.fromkeys(("Receipt", "ReceiptError", "load_receipt"), "loramerge.formats.receipts"),
    **dict.fromkeys(("LayerCheck", "OutputCheck", "VerificationReport"), "loramerge.proof.reports"),
    **dict.fromkeys(("CheckpointMergeReport", "MergeResult", "UnmergeResult"), "loramerge.proof.results"),
    **dict.fromkeys(("RoundResult", "next_round", "unmerge_rounds"), "loramerge.operations.rounds"),
    "Tolerance": "loramerge.numerics.tolerance",
    **dict.fromkeys(("make_probes", "verify"), "loramerge.operations.verification"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"loramerge.{name}") is not None:  # a subpackage: loramerge.operations, ...
        return importlib.import_module(f"loramerge.{name}")
    raise AttributeError(f"module 'loramerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


try:
    __version__ = version("loramerge")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Adapter",
    "AdapterConfigError",
    "AdapterMismatchError",
    "AdapterModule",
    "AdapterNotFoundError",
    "BenchReport",
    "CheckpointMergeReport",
    "HubError",
    "HubVerification",
    "InvalidArgumentError",
    "LayerCheck",
    "LineageError",
    "LoraMergeError",
    "LoraMergeWarning",
    "MergeResult",
    "NonFiniteMergeError",
    "OutputBusyError",
    "OutputCheck",
    "OutputWriteError",
    "QuantSpec",
    "Receipt",
    "ReceiptError",
    "RoundResult",
    "Tolerance",
    "UnmergeImpossibleError",
    "UnmergeResult",
    "UnsafeFormatError",
    "UnsafePathError",
    "UnsupportedAdapterError",
    "UnsupportedQuantizationError",
    "VerificationError",
    "VerificationReport",
    "__version__",
    "attach",
    "bench",
    "lineage",
    "load_adapter",
    "load_base",
    "load_receipt",
    "make_probes",
    "merge",
    "merge_checkpoint",
    "next_round",
    "push_to_hub",
    "unmerge",
    "unmerge_checkpoint",
    "unmerge_rounds",
    "verify",
    "verify_checkpoint",
    "verify_hub",
]
