"""Server scorer: the reference model as served by a running vLLM OpenAI-compatible server
(one replica, or a fleet behind a load balancer). HTTP only: the client needs no vLLM.

Tokenization stays local (``--model``'s tokenizer and chat template); the server gets
token-id prompts. Before any scoring a probe checks that the server is the one meant:
``/v1/models`` serves ``--server-model`` (default: its only model), ``/version``, and
``/tokenize`` of a probe text gives the local tokenizer's ids (where a server has no
``/tokenize``, the ids it reports for the same text as a completion prompt). The probe's
per-token log-probs go into the manifest and, rounded, into the cache key: a later run or
``compare`` sees when the served model changed, and a fleet of identical replicas behind
different URLs gives the same cache (the URL is recorded nowhere).

Scoring: ``/v1/completions`` with many token-id prompts per request, ``max_tokens=1``,
``prompt_logprobs=0``; each position's value is taken by its token id, never as "the
first entry". Where the server offers the token-in/token-out endpoint with selected-token
prompt log-probs (``/inference/v1/generate``, ``prompt_logprob_token_ids``: vLLM's
``--enable-scale-out`` on a Model Runner V2 build) and the probe's values agree, that
cheaper path is used, one sequence per request. At most ``--max-concurrent-requests``
requests are in flight (a thread pool, see http_json)."""

from __future__ import annotations

import base64
import io
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from precompute.scoring import Pair
from precompute.scoring.http_json import HTTPStatusError, JsonClient, RetryPolicy
from shared.errors import ConfigError, RowScoreError, ServerError
from shared.fingerprint import sha256_json

log = logging.getLogger(__name__)

API_KEY_VARS = ("KTO_SERVER_API_KEY", "OPENAI_API_KEY")
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789"
# vLLM's server sends -inf log-probs as -9999.0 (JSON has no infinity): not a value
SERVER_NEG_INF = -9999.0
# probe log-probs enter the cache key rounded to this many decimals: replicas on other
# hardware differ in the last float bits, another model or dtype by far more than 0.01
PROBE_DECIMALS = 2


def api_key_from_env(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    for name in API_KEY_VARS:
        if env.get(name):
            return env[name]
    return None


def normalize_url(url: str) -> str:
    """http(s)://host[:port][/prefix] without a trailing / or /v1; no credentials in it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--server-url {url!r}: expected http://HOST:PORT or https://...")
    if parts.username or parts.password:
        raise ConfigError("--server-url must not hold credentials; put the API key in the "
                          "environment variable KTO_SERVER_API_KEY instead")
    base = url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


@dataclass(frozen=True)
class ServedModel:
    """What the probe found: what decides the server's values, and the evidence."""
    model: str
    version: str
    max_model_len: int | None
    tokenizer_check: str  # "tokenize" or "completion prompt" (no /tokenize)
    path: str  # "selected-token" or "prompt_logprobs"
    probe_token_ids: tuple[int, ...]
    probe_logprobs: tuple[float, ...]

    def identity(self) -> dict[str, Any]:
        """For the cache key: served name, version, rounded probe values (not the URL)."""
        rounded = [round(v, PROBE_DECIMALS) + 0.0 for v in self.probe_logprobs]
        return {"model": self.model, "version": self.version,
                "probe_sha256": sha256_json({"ids": list(self.probe_token_ids),
                                             "logprobs": rounded})}

    def record(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version,
                "max_model_len": self.max_model_len, "tokenizer_check": self.tokenizer_check,
                "path": self.path, "probe": {"text": PROBE_TEXT,
                                             "token_ids": list(self.probe_token_ids),
                                             "logprobs": list(self.probe_logprobs)}}


def served_model_name(answer: Any, wanted: str | None, url: str) -> tuple[str, int | None]:
    models = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ServerError(f"server {url}: /v1/models answered {str(answer)[:120]}, not a "
                          "model list; is it an OpenAI-compatible server?")
    names = [str(m.get("id")) for m in models]
    if wanted is None:
        if len(names) != 1:
            raise ConfigError(f"server {url} serves {len(names)} models {names}; choose one "
                              "with --server-model")
        wanted = names[0]
    if wanted not in names:
        raise ConfigError(f"server {url} does not serve --server-model {wanted!r}; it serves "
                          f"{names}")
    limit = models[names.index(wanted)].get("max_model_len")
    return wanted, limit if isinstance(limit, int) else None


def portable_values(choice: Any, pair: Pair, index: int) -> np.ndarray:
    """The completion tokens' log-probs in one /v1/completions choice, each taken by its
    token id from its own position; a RowScoreError names what is wrong."""
    prompt, completion = pair
    entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
    length = len(prompt) + len(completion)
    if not isinstance(entries, list) or len(entries) != length:
        seen = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise RowScoreError(index, f"the server's prompt_logprobs hold {seen} positions, the "
                                   f"sequence has {length} tokens")
    values = np.empty(len(completion), dtype=np.float64)
    for i, token in enumerate(completion):
        pos = len(prompt) + i
        entry = entries[pos]
        if not isinstance(entry, dict):
            raise RowScoreError(index, f"the server's answer has no log-probs at position {pos}")
        value = entry.get(str(token))
        logprob = value.get("logprob") if isinstance(value, dict) else None
        if logprob is None:
            raise RowScoreError(index, f"the server's log-probs at position {pos} do not hold "
                                       f"the sequence's token {token} (they hold "
                                       f"{sorted(entry)[:3]}): another tokenizer or model?")
        values[i] = checked_value(logprob, index, pos)
    return values


def checked_value(value: Any, index: int, pos: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value == SERVER_NEG_INF or value > 0:
        raise RowScoreError(index, f"the server's log-prob at position {pos} is {value!r}, not "
                                   "a finite log-probability (check the served model and dtype)")
    return float(value)


def selected_values(answer: Any, pair: Pair, index: int) -> np.ndarray:
    """The per-token values of a token-in/token-out answer: ``prompt_token_id_logprobs`` is
    a base64 ``.npy`` array [completion tokens, 1] (loaded without pickle)."""
    encoded = answer.get("prompt_token_id_logprobs") if isinstance(answer, dict) else None
    if not isinstance(encoded, str):
        raise RowScoreError(index, "the server's answer has no prompt_token_id_logprobs")
    try:
        values = np.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)
    except ValueError as err:
        raise RowScoreError(index, f"unreadable prompt_token_id_logprobs ({err})") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size != len(pair[1]):
        raise RowScoreError(index, f"the server scored {values.size} tokens, the completion "
                                   f"has {len(pair[1])}")
    for i, v in enumerate(values):
        checked_value(float(v), index, len(pair[0]) + i)
    return values


def first_difference(theirs: Any, ours: list[int]) -> str:
    if not isinstance(theirs, list):
        return f"the server answered {str(theirs)[:60]} instead of token ids"
    i = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
             min(len(theirs), len(ours)))
    server, local = (ids[i] if i < len(ids) else "(end)" for ids in (theirs, ours))
    return (f"{len(theirs)} ids on the server, {len(ours)} here, first different at position "
            f"{i}: server {server}, local {local}")


class ServerScorer:
    name = "server"

    def __init__(self, url: str, tokenizer: Any, *, served_model: str | None = None,
                 api_key: str | None = None, max_concurrent_requests: int = 4,
                 prompts_per_request: int = 8, policy: RetryPolicy | None = None):
        self.url = normalize_url(url)
        self.client = JsonClient(self.url, api_key, policy or RetryPolicy())
        self.prompts_per_request = prompts_per_request
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent_requests,
                                        thread_name_prefix="kto-server")
        self.served = self._probe(tokenizer, served_model)
        log.info("server %s: model %s, vLLM %s, %s path", self.url, self.served.model,
                 self.served.version, self.served.path)

    def _probe(self, tokenizer: Any, wanted: str | None) -> ServedModel:
        self.model, limit = served_model_name(self.client.get("/v1/models"), wanted, self.url)
        version = self._version()
        ids = [int(t) for t in tokenizer(PROBE_TEXT)["input_ids"]]
        check = self._check_tokenizer(ids)
        pair = (ids[:1], ids[1:])
        values = self._portable_values(pair)
        path = "prompt_logprobs"
        fast = self._selected_probe(pair)
        if fast is not None and np.allclose(fast, values, rtol=0, atol=1e-4):
            path = "selected-token"
        elif fast is not None:
            log.warning("server %s: the selected-token path disagrees with prompt_logprobs "
                        "(max |diff| %.2e); using prompt_logprobs", self.url,
                        float(np.abs(fast - values).max()))
        return ServedModel(self.model, version, limit, check, path, tuple(ids),
                           tuple(float(v) for v in values))

    def _version(self) -> str:
        try:
            answer = self.client.get("/version")
        except HTTPStatusError as err:
            if err.status != 404:
                raise
            return "unknown"
        return str(answer.get("version", "unknown")) if isinstance(answer, dict) else "unknown"

    def _check_tokenizer(self, ids: list[int]) -> str:
        try:
            answer = self.client.post("/tokenize", {"model": self.model, "prompt": PROBE_TEXT})
            theirs, how = answer.get("tokens") if isinstance(answer, dict) else None, "tokenize"
        except HTTPStatusError as err:
            if err.status not in (404, 405, 501):
                raise
            log.warning("server %s has no /tokenize (HTTP %d); checking its tokenizer through "
                        "the token ids of a text completion prompt instead", self.url,
                        err.status)
            answer = self.client.post("/v1/completions", {
                "model": self.model, "prompt": PROBE_TEXT, "max_tokens": 1,
                "return_token_ids": True})
            choice = (answer.get("choices") or [{}])[0] if isinstance(answer, dict) else {}
            theirs, how = choice.get("prompt_token_ids"), "completion prompt"
        if theirs != ids:
            raise ConfigError(
                f"server {self.url} ({self.model}) tokenizes the probe text {PROBE_TEXT!r} "
                f"otherwise than the local tokenizer (--model/--tokenizer): "
                f"{first_difference(theirs, ids)}. It serves another tokenizer or model; point "
                "--model at the served model's tokenizer or --server-url at the right server")
        return how

    def _selected_probe(self, pair: Pair) -> np.ndarray | None:
        try:
            return selected_values(self._generate(pair), pair, 0)
        except HTTPStatusError as err:
            log.info("server %s: no selected-token path (HTTP %d: %s); using prompt_logprobs",
                     self.url, err.status, err.detail)
            return None
        except RowScoreError as err:
            log.info("server %s: no selected-token path (%s); using prompt_logprobs",
                     self.url, err.reason)
            return None

    def _generate(self, pair: Pair) -> Any:
        prompt, completion = pair
        return self.client.post("/inference/v1/generate", {
            "model": self.model, "token_ids": [*prompt, *completion],
            "sampling_params": {"max_tokens": 1, "detokenize": False,
                                "prompt_logprob_start": len(prompt) - 1,
                                "prompt_logprob_token_ids": [[t] for t in completion]}})

    def _portable_values(self, pair: Pair) -> np.ndarray:
        return portable_values(self._completions([pair], 0)[0], pair, 0)

    def _completions(self, pairs: Sequence[Pair], first: int) -> list[Any]:
        """The answer's choices in prompt order (choice ``index`` i answers prompt i)."""
        answer = self.client.post("/v1/completions", {
            "model": self.model, "prompt": [[*p, *c] for p, c in pairs], "max_tokens": 1,
            "prompt_logprobs": 0})
        choices = answer.get("choices") if isinstance(answer, dict) else None
        last = first + len(pairs) - 1
        if not isinstance(choices, list) or len(choices) != len(pairs):
            seen = len(choices) if isinstance(choices, list) else "no"
            raise RowScoreError(first, f"the server answered {seen} choices for a request of "
                                       f"{len(pairs)} sequences ({first}..{last})")
        by_index = {c.get("index"): c for c in choices if isinstance(c, dict)}
        if set(by_index) != set(range(len(pairs))):
            seen = sorted(by_index, key=str)[:8]
            raise RowScoreError(first, f"the server's choice indices {seen} are not "
                                       f"0..{len(pairs) - 1} (sequences {first}..{last})")
        return [by_index[i] for i in range(len(pairs))]

    def _score_request(self, pairs: Sequence[Pair], first: int) -> list[float]:
        if self.served.path == "selected-token":
            return [float(selected_values(self._generate(p), p, first + i).sum())
                    for i, p in enumerate(pairs)]
        return [float(portable_values(c, p, first + i).sum())
                for i, (c, p) in enumerate(zip(self._completions(pairs, first), pairs,
                                               strict=True))]

    def check_length(self, longest: int) -> None:
        """vLLM scores at most max_model_len - 1 tokens (one output token is requested)."""
        limit = self.served.max_model_len
        if limit is not None and longest + 1 > limit:
            raise ConfigError(f"sequences reach {longest} tokens but server {self.url} serves "
                              f"{self.model} with max_model_len {limit}; lower --max-length "
                              f"to {limit - 1} or less")

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        step = 1 if self.served.path == "selected-token" else self.prompts_per_request
        futures = [self._pool.submit(self._score_request, pairs[i:i + step], i)
                   for i in range(0, len(pairs), step)]
        try:
            return np.array([v for f in futures for v in f.result()], dtype=np.float64)
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
