"""How :class:`~lightning_peft.zoo.hub.HubZoo` talks to the Hub: its errors, its timeout and what bounds each request.

Faults are one :class:`HubError` line that names the endpoint and what to check. Every call first sends one request
with a short timeout (:func:`probe`; ``timeout``, default ``$LIGHTNING_PEFT_HUB_TIMEOUT`` or 10 s) and no retries, so
a closed port or a server that never answers fails within that time instead of after the client's retries (a stalled
server would otherwise hang: the client's own default is no timeout); while the call runs, every request to the
endpoint is bounded by the same timeout (:func:`bounded`). :func:`translate` turns huggingface_hub's and its HTTP
client's exceptions into those lines. Nothing here knows what a zoo entry is: that is :mod:`lightning_peft.zoo.hub`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "HubError",
    "HubUnreachableError",
    "bounded",
    "one_line",
    "probe",
    "resolve_timeout",
    "translate",
    "transport_errors",
    "unreachable",
]

TIMEOUT_ENV = "LIGHTNING_PEFT_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0


class HubError(RuntimeError):
    """The Hub refused or could not be reached; the message says which."""


class HubUnreachableError(HubError):
    """Nothing answered at the endpoint (refused, timed out, no route): the message names it and what to check."""


def resolve_timeout(value: float | None) -> float:
    """``value`` seconds, else ``$LIGHTNING_PEFT_HUB_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`; checked to be positive."""
    if value is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            value = float(raw) if raw.strip() else DEFAULT_TIMEOUT
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"the Hub timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def one_line(err: BaseException, limit: int = 300) -> str:
    """An error's message on one line, at most ``limit`` characters (the client's messages span lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' own network errors (huggingface_hub 2.x: httpx2; 1.x: httpx; 0.x: requests)."""
    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    with contextlib.suppress(ImportError, AttributeError):
        found.append(importlib.import_module("requests").Timeout)
    return tuple(found)


def unreachable(url: str, timeout: float, err: BaseException) -> HubUnreachableError:
    """The one-line error for a request to ``url`` that got no answer (refused, or none within ``timeout``)."""
    kind = type(err).__name__
    reason = one_line(err)
    if "timeout" in kind.lower() or "timed out" in reason.lower():
        what = f"did not answer within {timeout:g} s ({kind})"
        hint = f"if it is only slow, raise the timeout (HubZoo(timeout=...), --timeout or ${TIMEOUT_ENV}); else "
    else:
        what = f"cannot be reached ({kind}: {reason})"
        hint = ""
    return HubUnreachableError(
        f"the Hub at {url} {what}: {hint}check the endpoint (--endpoint / HF_ENDPOINT), the network and any "
        "proxy, or set HF_HUB_OFFLINE=1 to work from the cache"
    )


def translate(err: Exception, url: str, timeout: float, repo_id: str, revision: str | None = None) -> Exception:
    """``err`` of huggingface_hub (or its HTTP client) as one :class:`HubError` line about ``repo_id`` at ``url``;
    an error that is not the Hub's is returned as it is."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, HubError):
        return err
    if type(err).__name__ == "LocalTokenNotFoundError":  # an OSError: before the network errors
        return HubError(
            f"no Hub token for {repo_id}: log in with `hf auth login`, set HF_TOKEN, or pass a token (and a "
            "namespace, to publish without asking the Hub who you are)"
        )
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"revision {revision!r} of {repo_id} does not exist on the Hub at {url}")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(f"{repo_id} was not found on the Hub at {url} (or it is private and your token cannot see it)")
    if isinstance(err, LocalEntryNotFoundError | OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass
        return HubError(f"the Hub at {url} cannot be reached and {repo_id} is not in the local cache ({one_line(err)})")
    if isinstance(err, EntryNotFoundError):
        return HubError(f"{repo_id} lacks a file the entry needs: {one_line(err)}")
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            return HubError(f"no permission for {repo_id} (HTTP {status}): log in with `hf auth login` or pass a token")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__  # no server page
        return HubError(f"the Hub at {url} answered HTTP {status} for {repo_id}: {first}")
    if isinstance(err, transport_errors() + (ConnectionError, TimeoutError)):
        return unreachable(url, timeout, err)
    if isinstance(err, OSError):
        return HubError(f"the Hub at {url} cannot be reached ({type(err).__name__}: {one_line(err)})")
    return err


def probe(url: str, timeout: float) -> None:
    """One request to ``url`` with ``timeout`` and no retries: fail fast when nothing answers (skipped offline)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(url + "/", timeout=timeout)
    except transport_errors() + (ConnectionError, TimeoutError) as err:
        raise unreachable(url, timeout, err) from err


@contextlib.contextmanager
def bounded(url: str, timeout: float) -> Iterator[None]:
    """Meanwhile, every request huggingface_hub sends to ``url`` (the endpoint) times out after ``timeout`` seconds.

    And the client's retries after a network failure (same method and URL again, no answer to the first)
    stop at once with :class:`HubUnreachableError`: they would sleep 1 + 2 + 4 + 8 + 8 s between
    attempts. Retries after an HTTP answer (429, 5xx) go on as the client wants.
    """
    from huggingface_hub.utils import get_session

    session = get_session()
    hooks = getattr(session, "event_hooks", None)  # httpx clients (huggingface_hub >= 1); requests has none
    if not isinstance(hooks, dict) or "request" not in hooks or "response" not in hooks:
        yield
        return
    prefix, limit = url, timeout
    unanswered: set[tuple[str, str]] = set()

    def bound(request: Any) -> None:
        url = str(request.url)
        if not url.startswith(prefix):
            return
        if (request.method, url) in unanswered:
            raise HubUnreachableError(
                f"the Hub at {prefix} stopped answering ({request.method} {url} got no answer within "
                f"{limit:g} s): check the endpoint and the network, or raise the timeout (HubZoo(timeout=...), "
                f"--timeout or ${TIMEOUT_ENV})"
            )
        unanswered.add((request.method, url))
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            k: limit if given.get(k) is None else min(given[k], limit) for k in ("connect", "read", "write", "pool")
        }

    def answered(response: Any) -> None:
        unanswered.discard((response.request.method, str(response.request.url)))

    hooks["request"].append(bound)
    hooks["response"].append(answered)
    try:
        yield
    finally:
        for kind, hook in (("request", bound), ("response", answered)):
            with contextlib.suppress(ValueError):
                hooks[kind].remove(hook)
