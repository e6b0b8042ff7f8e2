"""A stand-in for vLLM's OpenAI-compatible server (standard library, in a thread) for the
server backend's fault tests: the routes kto-precompute uses, with log-probs given by a
known function of (position, token), and scripted faults."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


def model_a(pos: int, token: int) -> float:
    return -(((token * 31 + pos * 7) % 97) + 1) / 16.0


def model_b(pos: int, token: int) -> float:
    return -(((token * 13 + pos * 5) % 89) + 1) / 16.0


def expected_sum(fn: Callable[[int, int], float], prompt, completion) -> float:
    return float(sum(fn(len(prompt) + i, t) for i, t in enumerate(completion)))


class FakeServer:
    """``faults``: a list consumed one per /v1/completions scoring request; each an HTTP
    status (int) to answer with, or a name of a damaged answer (see ``_damage``), or None
    for a good answer."""

    def __init__(self, tokenizer, name: str = "tiny", fn=model_a, *, api_key: str | None = None,
                 token_shift: int = 0, tokenize_route: bool = True, selected: bool = False,
                 models: list[str] | None = None):
        self.tokenizer, self.name, self.fn = tokenizer, name, fn
        self.api_key, self.token_shift = api_key, token_shift
        self.tokenize_route, self.selected = tokenize_route, selected
        self.models = models or [name]
        self.faults: list[Any] = []
        self.requests: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def scoring_requests(self) -> int:
        return sum(1 for path, body in self.requests
                   if path == "/v1/completions" and isinstance(body.get("prompt"), list))

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server._serve(self, None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                server._serve(self, json.loads(self.rfile.read(length)))

        return Handler

    def _serve(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        with self.lock:
            self.requests.append((h.path, body))
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _send(h, 401, {"error": {"message": "Unauthorized", "code": 401}})
        route = {"/v1/models": self._models, "/version": lambda b: (200, {"version": "fake-1"}),
                 "/tokenize": self._tokenize, "/v1/completions": self._completions,
                 "/inference/v1/generate": self._generate}.get(h.path)
        if route is None or (h.path == "/tokenize" and not self.tokenize_route):
            return _send(h, 404, {"detail": "Not Found"})
        status, answer = route(body)
        if isinstance(answer, bytes):
            return _send_raw(h, status, answer)
        _send(h, status, answer)

    def _models(self, _):
        return 200, {"object": "list", "data": [{"id": m, "max_model_len": 1024}
                                                for m in self.models]}

    def _ids(self, text: str) -> list[int]:
        return [t + self.token_shift for t in self.tokenizer(text)["input_ids"]]

    def _tokenize(self, body):
        return 200, {"count": len(self._ids(body["prompt"])), "tokens": self._ids(body["prompt"])}

    def _entries(self, ids: list[int]) -> list[Any]:
        return [None] + [{str(t): {"logprob": self.fn(p, t), "rank": 1, "decoded_token": "x"}}
                         for p, t in enumerate(ids) if p > 0]

    def _completions(self, body):
        if body.get("model") != self.name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}}
        if isinstance(body["prompt"], str):  # the tokenizer probe without /tokenize
            ids = self._ids(body["prompt"])
            return 200, {"choices": [{"index": 0, "text": "", "prompt_token_ids": ids,
                                      "prompt_logprobs": self._entries(ids)}]}
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, int):
            return fault, {"error": {"message": f"fault {fault}"}}
        choices = [{"index": i, "text": "", "prompt_logprobs": self._entries(ids)}
                   for i, ids in enumerate(body["prompt"])]
        if fault == "not_json":
            return 200, b"<html>proxy error</html>"
        return 200, {"choices": _damage(fault, choices[::-1])}  # any order: by index

    def _generate(self, body):
        if not self.selected:
            return 403, {"error": {"message": "Scale-out endpoints are disabled."}}
        ids, params = body["token_ids"], body["sampling_params"]
        start = params["prompt_logprob_start"]
        values = np.array([[self.fn(start + 1 + i, t[0])]
                           for i, t in enumerate(params["prompt_logprob_token_ids"])],
                          dtype=np.float32)
        assert [t[0] for t in params["prompt_logprob_token_ids"]] == ids[start + 1:]
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        return 200, {"prompt_token_id_logprobs": base64.b64encode(buffer.getvalue()).decode()}


def _damage(fault: str | None, choices: list[dict]) -> list[dict]:
    """The first-by-index choice damaged as named (its last position, where it matters)."""
    target = next(c for c in choices if c["index"] == 0)
    entries = target["prompt_logprobs"]
    last = entries[-1]
    token = next(iter(last))
    if fault == "drop_choice":
        return [c for c in choices if c is not target]
    if fault == "short":
        target["prompt_logprobs"] = entries[:-1]
    elif fault == "missing_position":
        entries[-1] = None
    elif fault == "wrong_token":
        entries[-1] = {str(int(token) + 1): last[token]}
    elif fault == "nan":
        last[token]["logprob"] = float("nan")
    elif fault == "neg_inf":
        last[token]["logprob"] = -9999.0
    elif fault is not None:
        raise ValueError(fault)
    return choices


def _send(h: BaseHTTPRequestHandler, status: int, value: Any) -> None:
    _send_raw(h, status, json.dumps(value).encode())


def _send_raw(h: BaseHTTPRequestHandler, status: int, raw: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(raw)))
    h.end_headers()
    h.wfile.write(raw)
