"""The exception and warning hierarchy of loramerge.

Every error raised on purpose by loramerge derives from :class:`LoraMergeError`. Most also
derive from the builtin exception a caller would naturally catch (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loramerge.proof.reports import VerificationReport

__all__ = [
    "AdapterConfigError",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "InvalidArgumentError",
    "LoraMergeError",
    "LoraMergeWarning",
    "NonFiniteMergeError",
    "OutputWriteError",
    "UnmergeImpossibleError",
    "UnsafeFormatError",
    "UnsafePathError",
    "UnsupportedAdapterError",
    "VerificationError",
]


class LoraMergeError(Exception):
    """Root of every error loramerge raises on purpose."""


class InvalidArgumentError(LoraMergeError, ValueError, TypeError):
    """An argument or option has a value loramerge cannot use (``max_shard_size="abc"``,
    ``Tolerance(factor=0)``, an unknown dtype, ...); the message names it and what it accepts."""


class AdapterNotFoundError(LoraMergeError, FileNotFoundError):
    """A model or adapter directory, or a file it must contain, does not exist."""


class AdapterConfigError(LoraMergeError, ValueError):
    """An ``adapter_config.json`` is malformed or inconsistent with the adapter's tensors."""


class UnsupportedAdapterError(LoraMergeError, NotImplementedError):
    """The adapter uses a PEFT feature that loramerge cannot merge exactly."""


class AdapterMismatchError(LoraMergeError, ValueError):
    """The adapter does not fit the model: missing modules, wrong layer types or wrong shapes."""


class UnsafeFormatError(LoraMergeError, ValueError):
    """A pickle-based weight file (``.bin``/``.pt``) was found but pickle was not allowed."""


class UnsafePathError(LoraMergeError, ValueError):
    """A file name read from a file (an index, ``loramerge.json``, lineage metadata) is not a plain
    name of a regular file inside its directory: a separator, ``..``, an absolute path or a link out."""


class UnsupportedQuantizationError(LoraMergeError, NotImplementedError):
    """The base model is quantized with a method loramerge cannot dequantize exactly (GPTQ, AWQ, ...)."""


class NonFiniteMergeError(LoraMergeError, ArithmeticError):
    """The merged weights would contain NaN or Inf, or overflow the weight's dtype.

    Raised before any weight of the model is changed.
    """


class UnmergeImpossibleError(LoraMergeError, ValueError):
    """The base weights cannot be recovered from the merged model and the saved adapter alone."""


class VerificationError(LoraMergeError, AssertionError):
    """A verification ran and found the result out of tolerance.

    Attributes:
        report: The full :class:`~loramerge.VerificationReport` that failed.
        result: The :class:`~loramerge.MergeResult` or :class:`~loramerge.UnmergeResult` whose
            verification failed, when the operation got that far (the model has then already been
            changed in place), else ``None``.
    """

    def __init__(self, message: str, report: VerificationReport, result: object | None = None):
        super().__init__(message)
        self.report = report
        self.result = result


class OutputWriteError(LoraMergeError, OSError):
    """Writing the output failed (for example the disk is full); nothing is left behind."""


class LoraMergeWarning(UserWarning):
    """Something the caller can fix, or should know, happened (for example tied weights were untied)."""
