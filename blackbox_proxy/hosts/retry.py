"""The one retry policy of the hosted clients, carried by tenacity, and error translation.

Both clients build their ``tenacity.Retrying`` / ``tenacity.AsyncRetrying`` from :func:`_policy`,
so the sync and async paths cannot drift. Its numbers are in ``_constants.py``:

- connection errors, timeouts, a 200 whose body is not valid JSON (cut off on the way) and the
  statuses in ``RETRYABLE_STATUS`` are retried, at most ``max_retries`` times after the first
  attempt (``MAX_RETRIES`` unless the client says otherwise);
- each wait is the server's ``retry-after-ms`` / ``retry-after`` (up to ``MAX_RETRY_AFTER``),
  else exponential backoff from ``INITIAL_RETRY_DELAY`` doubling to ``MAX_RETRY_DELAY`` with
  ``RETRY_JITTER``; the call gives up when the next wait would take the time since its start past
  ``MAX_TOTAL_RETRY_WAIT``;
- a 200 whose logprobs are missing or truncated (:class:`HostedResponseError` from the parser)
  is asked again at once, ``MALFORMED_RESPONSE_RETRIES`` times, whatever ``max_retries`` says;
- what is given up on leaves as this library's error (:func:`translate`), with a message that
  says the fix and never the API key.

What it leaves out: the SDK's own retries (the clients turn them off) and anything a host does
differently (no dialect changes the policy).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from .. import _constants as C
from .._logging import redact
from ..backoff import backoff, server_delay
from ..errors import (
    HostedAPIError,
    HostedAuthenticationError,
    HostedBadRequestError,
    HostedConnectionError,
    HostedModelNotFoundError,
    HostedRateLimitError,
    HostedResponseError,
)

if TYPE_CHECKING:
    import tenacity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """Where calls go, for messages: what :func:`translate` and the policy need of a client."""

    base_url: str
    model: str
    mode: str
    timeout: float
    max_retries: int
    secret: str | None = field(default=None, repr=False)  # masked in every message


def _transport_errors() -> tuple[type[BaseException], ...]:
    import openai

    return (openai.OpenAIError, json.JSONDecodeError)


def _header(exc: BaseException, name: str) -> str | None:
    try:
        return exc.response.headers.get(name)  # type: ignore[attr-defined]
    except AttributeError:
        return None


def retry_delay(exc: BaseException, attempt: int, rng: random.Random) -> float | None:
    """Seconds to wait before retrying after ``exc`` (attempt 1, 2...), or None: do not retry.

    Retried: connection errors and timeouts, a 200 whose body is not valid JSON (cut off on the
    way), and the statuses in ``RETRYABLE_STATUS``. The server's ``retry-after-ms`` or
    ``retry-after`` (seconds) is honoured up to ``MAX_RETRY_AFTER``; otherwise jittered
    exponential backoff.
    """
    import openai

    if isinstance(exc, (openai.APIConnectionError, json.JSONDecodeError)):  # includes APITimeoutError
        pass
    elif isinstance(exc, openai.APIStatusError):
        if exc.status_code not in C.RETRYABLE_STATUS:
            return None
        told = server_delay(lambda name: _header(exc, name))
        if told is not None:
            return told
    else:
        return None
    return backoff(attempt, rng)


class _Tally:
    """One call's failures, by kind, and tenacity's three questions about the last one.

    tenacity asks, after each failed attempt, ``retry`` (is this failure ours to judge), then
    ``wait`` (how long before the next attempt), then ``stop`` (give up instead); a stop ends in
    ``give_up``, otherwise ``log`` runs before the sleep. Transport failures and incomplete
    answers are counted apart: each kind has its own limit.
    """

    def __init__(self, site: Site, rng: random.Random) -> None:
        self.site = site
        self.rng = rng
        self.failures = 0  # transport failures: connection, timeout, status, broken JSON
        self.incomplete = 0  # 200s whose logprobs the parser refused
        self.delay: float | None = None  # the wait after the last transport failure; None: not retryable

    def retry(self, state: "tenacity.RetryCallState") -> bool:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, HostedResponseError):
            self.incomplete += 1
            return True
        if isinstance(exc, _transport_errors()):
            self.failures += 1
            return True
        return False  # a success, or an error that is not the host's (it goes up unchanged)

    def wait(self, state: "tenacity.RetryCallState") -> float:
        exc = state.outcome.exception()
        if isinstance(exc, HostedResponseError):
            return 0.0
        self.delay = retry_delay(exc, self.failures, self.rng)
        return self.delay or 0.0

    def stop(self, state: "tenacity.RetryCallState") -> bool:
        if isinstance(state.outcome.exception(), HostedResponseError):
            return self.incomplete > C.MALFORMED_RESPONSE_RETRIES
        # the time since the start counts the calls too: the cap is on how long a call may take
        return (self.delay is None or self.failures > self.site.max_retries
                or state.seconds_since_start + self.delay > C.MAX_TOTAL_RETRY_WAIT)

    def log(self, state: "tenacity.RetryCallState") -> None:
        exc = state.outcome.exception()
        if isinstance(exc, HostedResponseError):
            logger.warning("incomplete answer from the hosted API (%s); asking again", exc)
        else:
            logger.info("hosted API call failed (%s); retry %d in %.2f s", type(exc).__name__, self.failures,
                        state.upcoming_sleep)

    def give_up(self, state: "tenacity.RetryCallState") -> NoReturn:
        exc = state.outcome.exception()
        if isinstance(exc, HostedResponseError):
            raise HostedResponseError(f"{exc}; asked {self.incomplete} times: check that the server at "
                                      f"{self.site.base_url} returns complete logprobs") from None
        raise translate(exc, self.site) from None


def _policy(site: Site, rng: random.Random) -> dict[str, Any]:
    """The policy as tenacity arguments; a fresh tally per call (calls run concurrently)."""
    tally = _Tally(site, rng)
    return dict(retry=tally.retry, wait=tally.wait, stop=tally.stop, before_sleep=tally.log,
                retry_error_callback=tally.give_up)


def retrying(site: Site, rng: random.Random) -> "tenacity.Retrying":
    """The policy for one synchronous call: ``retrying(site, rng)(fn)``."""
    import tenacity

    return tenacity.Retrying(**_policy(site, rng))


def async_retrying(site: Site, rng: random.Random) -> "tenacity.AsyncRetrying":
    """The policy for one asynchronous call: ``await async_retrying(site, rng)(async_fn)``."""
    import tenacity

    return tenacity.AsyncRetrying(**_policy(site, rng))


# ----- error translation ------------------------------------------------------------------------


def one_line(text: str, secret: str | None) -> str:
    """One line, at most 400 characters, with the secret masked in every spelling we know.

    >>> one_line("bad key sk-abc123\\n  (twice: 'sk-abc123')", "sk-abc123")
    "bad key *** (twice: '***')"
    """
    text = str(text)
    if secret:
        for form in {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1]}:
            text = text.replace(form, "***")
    text = redact(" ".join(text.split()))
    return text[:400]


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", None) or exc)


def translate(exc: BaseException, site: Site) -> HostedAPIError:
    """Map an SDK exception to this library's error tree, with a message that says the fix."""
    import openai

    key = site.secret
    where = f"the hosted API at {site.base_url}"
    if isinstance(exc, json.JSONDecodeError):
        return HostedResponseError(
            f"{where} kept answering with a body or streamed event that is not valid JSON (cut off?); check the "
            "server and its proxies"
        )
    if isinstance(exc, openai.APITimeoutError):
        return HostedConnectionError(
            f"{where} did not answer within {site.timeout:g} s; check that it is up, or raise the timeout"
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return HostedConnectionError(
            f"cannot reach {where} ({one_line(type(cause).__name__ + ': ' + str(cause), key)}); "
            "check --base-url (or OPENAI_BASE_URL) and that the server is running"
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = one_line(_server_message(exc), key)
        if status in (401, 403):
            return HostedAuthenticationError(
                f"{where} rejected the API key ({status}: {message}); pass --api-key or set OPENAI_API_KEY",
                status_code=status,
            )
        if status == 404:
            endpoint = "/v1/completions" if site.mode == "completions" else "/v1/chat/completions"
            return HostedModelNotFoundError(
                f"{where} answered 404 for model {site.model!r} ({message}); check --model, and --mode "
                f"(this server may not have the {endpoint} endpoint)",
                status_code=status,
            )
        if status == 429:
            return HostedRateLimitError(
                f"{where} kept rate-limiting after {site.max_retries} retries ({message}); lower the request rate "
                "or retry later",
                status_code=status,
            )
        if status in (400, 422):
            hint = ""
            if "logprob" in message.lower():
                hint = "; lower --top-k to what this server allows"
            return HostedBadRequestError(f"{where} refused the request ({status}: {message}){hint}", status_code=status)
        return HostedAPIError(f"{where} failed ({status}: {message}); retry later", status_code=status)
    return HostedAPIError(f"{where} failed: {one_line(str(exc), key)}")
