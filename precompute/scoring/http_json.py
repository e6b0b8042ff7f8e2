"""JSON over HTTP for the server scorer, with retries: the standard library only.

Why ``urllib`` and a thread pool (in ``server.py``), not requests, httpx or aiohttp: the
client sends at most ``--max-concurrent-requests`` large POSTs at a time and waits for the
server's forward passes; its own cost is decoding the answers' JSON, not the HTTP stack
(benchmarks/server.py measures both). Threads release the GIL while they wait on a
socket, a new connection per request costs well under a millisecond next to a request
that scores thousands of tokens, and the standard library adds no dependency to a client
that otherwise needs neither vLLM nor an event loop.

Retried, with exponential backoff and full jitter, for at most ``retry_seconds`` after a
request's first failure: a refused or reset connection, a timeout, HTTP 429 and 5xx (a
server starting, restarting or overloaded; a load balancer without a healthy replica).
Anything else (400, 401, 404, 422, an answer that is not JSON) fails at once. Redirects
are not followed: the API key must not travel to another address."""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from shared.errors import ServerError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
KEY_HINT = "set KTO_SERVER_API_KEY (or OPENAI_API_KEY) to the key the server expects"


@dataclass(frozen=True)
class RetryPolicy:
    retry_seconds: float = 300.0  # give up this long after a request's first failure
    request_timeout: float = 600.0  # one attempt's socket timeout
    first_delay: float = 0.5
    max_delay: float = 10.0


class HTTPStatusError(ServerError):
    """The server answered with an HTTP error status that is not worth retrying."""

    def __init__(self, url: str, status: int, message: str, detail: str = ""):
        self.status, self.detail = status, detail
        super().__init__(message)


class _Retryable(Exception):
    def __init__(self, what: str):
        self.what = what


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max_delay, first_delay * 2**attempt)], so that many
    workers retrying one server do not arrive together."""
    return rng.uniform(0, min(policy.max_delay, policy.first_delay * 2 ** attempt))


class JsonClient:
    def __init__(self, base_url: str, api_key: str | None, policy: RetryPolicy):
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._rng = random.Random()

    def get(self, path: str) -> Any:
        return self.call("GET", path, None)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, json.dumps(body).encode())

    def call(self, method: str, path: str, data: bytes | None) -> Any:
        url = self.base_url + path
        first_failure, attempt = None, 0
        while True:
            try:
                return self._once(method, url, data)
            except _Retryable as err:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                left = self.policy.retry_seconds - (now - first_failure)
                if left <= 0:
                    raise ServerError(
                        f"server {self.base_url}: {method} {path} failed {attempt + 1} time(s) "
                        f"over {now - first_failure:.1f} s (--server-timeout "
                        f"{self.policy.retry_seconds:g}); last: {err.what}. Check that the "
                        "server is up and reachable, then rerun: finished shards are kept"
                    ) from None
                delay = min(backoff_delay(attempt, self.policy, self._rng), left)
                log.warning("server %s: %s %s: %s; retrying in %.1f s", self.base_url, method,
                            path, err.what, delay)
                time.sleep(delay)
                attempt += 1

    def _once(self, method: str, url: str, data: bytes | None) -> Any:
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers)
        try:
            with self._opener.open(request, timeout=self.policy.request_timeout) as answer:
                body = answer.read()
        except urllib.error.HTTPError as err:
            raise self._status_error(url, err) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            # refused, reset, DNS, timeout (socket.timeout is an OSError)
            reason = getattr(err, "reason", err)
            if isinstance(reason, socket.timeout | TimeoutError):
                reason = f"no answer within {self.policy.request_timeout:g} s"
            raise _Retryable(f"{type(err).__name__}: {reason}") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ServerError(f"server {self.base_url}: {url} answered with something that is "
                              f"not JSON ({err}): {body[:120]!r}") from None

    def _status_error(self, url: str, err: urllib.error.HTTPError) -> Exception:
        detail = _error_text(err)
        if err.code in RETRY_STATUSES:
            return _Retryable(f"HTTP {err.code} {detail}".strip())
        if err.code in (401, 403):
            return HTTPStatusError(url, err.code, f"server {self.base_url} refused the request "
                                   f"(HTTP {err.code}: {detail or 'unauthorized'}); {KEY_HINT}",
                                   detail)
        return HTTPStatusError(url, err.code, f"server {self.base_url}: {url} answered HTTP "
                               f"{err.code}: {detail or err.reason}", detail)


def _error_text(err: urllib.error.HTTPError) -> str:
    """The server's own message: vLLM and OpenAI send {"error": {"message": ...}} (or
    {"message": ...}, {"detail": ...}); anything else, its first 200 characters."""
    try:
        raw = err.read()
    except OSError:
        return ""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:200].decode("utf-8", "replace").strip()
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            inner = inner.get("message", inner.get("detail", inner))
        return str(inner)[:200]
    return str(value)[:200]
