"""Reading from the Hugging Face Hub: a local directory for a repo id (a download through the HF
cache), and the :class:`HubError` messages for what can go wrong on the way.

The low half of :mod:`loramerge.operations.hub`: loading adapters and bases needs it, while pushing and
verifying pushed models (which load, merge and verify) build on it, so that nothing imports in a
circle.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramerge.errors import LoraMergeError

__all__ = ["DOWNLOAD_PATTERNS", "HubError", "hub_errors", "hub_path", "looks_like_repo_id"]

logger = logging.getLogger(__name__)

#: What a download fetches: weights (safetensors only), configs, tokenizer and chat-template files.
DOWNLOAD_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.jinja",
    "README.md",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class HubError(LoraMergeError):
    """A Hub operation failed: authentication, permission, a missing repo or revision, or the server."""


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def looks_like_repo_id(value: str | Path) -> bool:
    """Whether ``value`` names a Hub repo (``namespace/name``) rather than a local path."""
    text = str(value)
    return not Path(text).exists() and bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


@contextmanager
def hub_errors(what: str, repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn the client's errors into :class:`HubError` messages that say what to do (never with the token)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except RuntimeError as e:  # the client wraps failed LFS uploads: judge by the error inside
        if isinstance(e.__cause__, HfHubHTTPError):
            raise _http_error(what, repo_id, rev, e.__cause__) from e
        inner = e.__cause__ or e.__context__ or e
        raise HubError(
            f"{what}: the transfer for {repo_id!r}{rev} failed ({type(inner).__name__}: {inner}); the connection "
            "dropped or the server failed mid-transfer. Re-run the same call: what was uploaded is not sent again."
        ) from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its parent
        raise HubError(
            f"{what}: the Hub could not be reached for {repo_id!r}{rev} and nothing is cached for it "
            "(no network, or HF_HUB_OFFLINE=1). Check the connection, or download it first."
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what}: {repo_id!r} has no revision {revision!r}. Check the branch, tag or commit.") from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{what}: repository {repo_id!r} not found{rev}, or it is private and no valid token was given "
            "(pass token=, set HF_TOKEN, or log in with `hf auth login`)."
        ) from e
    except EntryNotFoundError as e:
        raise HubError(f"{what}: a file is missing in {repo_id!r}{rev}: {e.args[0] if e.args else e}") from e
    except HfHubHTTPError as e:
        raise _http_error(what, repo_id, rev, e) from e
    except Exception as e:  # the HTTP client's own connection errors (httpx: ... < TransportError)
        if not any(c.__name__ in ("TransportError", "ConnectionError") for c in type(e).__mro__):
            raise
        raise HubError(
            f"{what}: could not connect to the Hub for {repo_id!r} ({type(e).__name__}: {e}). Check the network and "
            "the endpoint (endpoint= / HF_ENDPOINT)."
        ) from e


def _http_error(what: str, repo_id: str, rev: str, error: Exception) -> HubError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return HubError(
            f"{what}: the Hub rejected the token (401) for {repo_id!r}. Pass a valid token=, set HF_TOKEN, "
            "or log in again."
        )
    if status == 403:
        return HubError(
            f"{what}: the token has no permission for {repo_id!r} (403). Use a token with write access to that namespace."
        )
    if status is not None and status >= 500:
        return HubError(
            f"{what}: the Hub server failed ({status}) for {repo_id!r}{rev}. Nothing was committed; run the same "
            "call again: files already uploaded are not sent twice."
        )
    return HubError(f"{what}: the Hub answered {status} for {repo_id!r}{rev}.")


def hub_path(
    source: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local directory for ``source``: itself when it exists, else a download of the Hub repo it
    names (only safetensors weights, configs and tokenizer files; through the HF cache)."""
    if Path(source).exists() or not looks_like_repo_id(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        with hub_errors("download", str(source), revision):
            local = snapshot_download(
                str(source),
                revision=revision,
                token=token,
                endpoint=_endpoint(endpoint),
                cache_dir=cache_dir,
                allow_patterns=DOWNLOAD_PATTERNS,
            )
    except HubError as e:  # a mistyped local path looks like a repo id too: say both
        raise HubError(f"{str(source)!r} is not a local directory, and as a Hub repo id: {e}") from e
    logger.info("downloaded %s (%s) to %s", source, revision or "main", local)
    return Path(local)
