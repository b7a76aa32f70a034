"""Talking to the Hugging Face Hub: which endpoint, and what its failures mean for a user.

Every stage that reaches the Hub (download now; problem sets and publishing later) goes
through this module for two things: the endpoint, read from ``HF_ENDPOINT`` when asked (not
at import, unlike ``huggingface_hub.constants``, so a test or a mirror set after import still
counts), and :func:`hub_errors`, which turns huggingface_hub's and httpx2's exceptions into
one-line :class:`~mathq.errors.DownloadError` messages that name the fix (its network part,
:func:`transport_error`, also words the upload's failures).

The token is never handled here: huggingface_hub reads ``HF_TOKEN`` (or the stored login)
itself and sends it as a bearer header. mathq only asks *whether* one is configured, to pick
a hint, so no message can ever contain it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import TypeVar

from mathq.errors import DownloadError, MathqError

ENDPOINT_ENV = "HF_ENDPOINT"
TOKEN_ENV = "HF_TOKEN"
OFFLINE_ENV = "HF_HUB_OFFLINE"
DEFAULT_ENDPOINT = "https://huggingface.co"

E = TypeVar("E", bound=MathqError)


def hub_endpoint() -> str:
    """``$HF_ENDPOINT`` without a trailing slash, or the public Hub."""
    return (os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")


def token_configured() -> bool:
    """Whether huggingface_hub will send a token (``HF_TOKEN`` or a stored login)."""
    from huggingface_hub import get_token

    return get_token() is not None


def _auth_hint() -> str:
    if token_configured():
        return f"the token in {TOKEN_ENV} (or your stored login) may lack access to it"
    return f"for a private or gated repo, set {TOKEN_ENV} to a read token"


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str, endpoint: str, *,
               repo_hint: str = "check hf_repo in the recipe") -> Iterator[None]:
    """Re-raise Hub and network failures inside the block as one-line DownloadErrors.

    ``repo_hint`` says where the repo id came from, for the message of a missing repo.

    The messages are built here from the failure's kind and HTTP status only, never from
    the library's text, so they stay short and cannot echo request headers.
    """
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as e:
        raise DownloadError(
            f"{repo_id} is gated on {endpoint}",
            f"accept its terms on the repo's page, then set {TOKEN_ENV} to a token of that account",
        ) from e
    except RevisionNotFoundError as e:
        raise DownloadError(
            f"revision {revision!r} not found in {repo_id} on {endpoint}",
            "pass an existing branch, tag or commit with --revision",
        ) from e
    except RepositoryNotFoundError as e:
        raise DownloadError(
            f"repository {repo_id} not found on {endpoint}",
            f"{repo_hint}; {_auth_hint()}",
        ) from e
    except RemoteEntryNotFoundError as e:
        raise DownloadError(
            f"{endpoint} listed a file of {repo_id} that it then could not serve",
            "try again later; if HF_ENDPOINT points at a mirror, the mirror may be incomplete",
        ) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status in (401, 403):
            hint = (f"check {TOKEN_ENV}: the Hub refused it" if token_configured()
                    else f"set {TOKEN_ENV} to a read token")
            raise DownloadError(f"{endpoint} refused access to {repo_id} (HTTP {status})",
                                hint) from e
        raise DownloadError(f"{endpoint} answered HTTP {status} for {repo_id}",
                            "try again later; finished files are kept and a rerun resumes") from e
    except OfflineModeIsEnabled as e:
        raise DownloadError(f"{OFFLINE_ENV} is set, so the Hub cannot be reached",
                            f"unset {OFFLINE_ENV} to download") from e
    except HFValidationError as e:
        raise DownloadError(f"{repo_id!r} is not a valid Hub repo id",
                            "use the form owner/name in hf_repo") from e
    except httpx2.TransportError as e:
        raise transport_error(
            e, endpoint, DownloadError,
            timeout_hint="rerun later; finished files are kept and a rerun resumes",
            failed_hint="rerun; finished files are kept and a rerun resumes") from e
    except json.JSONDecodeError as e:  # a server that is not the Hub answered
        raise DownloadError(f"{endpoint} answered something that is not the Hub's JSON",
                            f"check {ENDPOINT_ENV}: it must name the Hub or a mirror of its "
                            "API") from e


def transport_error(e: Exception, endpoint: str, error: type[E], *, timeout_hint: str,
                    failed_hint: str) -> E:
    """The one-line ``error`` for httpx2's transport failure ``e`` talking to ``endpoint``.

    Downloads and uploads fail on the network alike (no connection, a timeout, a dropped
    transfer) and differ only in what a rerun keeps, which the hints say; so
    :func:`hub_errors` and the Hub upload share these messages. They name the endpoint and
    the failure's kind, never the library's text.
    """
    import httpx2

    if isinstance(e, httpx2.ConnectError):
        return error(f"cannot connect to {endpoint}",
                     f"check your network, or {ENDPOINT_ENV} if you use a mirror")
    if isinstance(e, httpx2.TimeoutException):
        return error(f"{endpoint} timed out", timeout_hint)
    return error(f"the connection to {endpoint} failed ({type(e).__name__})", failed_hint)
