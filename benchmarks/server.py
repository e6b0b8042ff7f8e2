"""Scoring against a running vLLM server (--backend server) vs the in-process vLLM engine
(--backend vllm), on the same machine, model and sequences; and where the server client's
time goes.

Starts one OpenAI-compatible vLLM server (``python -m vllm.entrypoints.openai.api_server``,
the in-process scorer's CPU settings), then runs kto-precompute with --backend vllm, with
--backend server and 1 worker, and with 2 workers (--num-workers 2, both at once, against
the one server). Throughput is scored tokens over the scoring phase (for 2 workers: all
tokens over the longer worker's scoring phase). Then, one request at a time on a sample of
the same sequences, it splits a request's time into waiting for the answer (the server's
forward pass, its JSON encoding and the transfer), decoding the answer's JSON and summing
the completion's values.

    python benchmarks/server.py --out runs/bench/server
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_args,
    checked,
    command_line,
    data_files,
    data_slice,
    machine,
    measure,
    resolve_model,
    table,
    write,
)

from precompute.scoring.server import portable_values  # noqa: E402
from precompute.scoring.vllm_backend import cpu_env_defaults  # noqa: E402
from shared.dataset import open_cache  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_len: int, dtype: str, log: Path,
                 rpc: Path) -> subprocess.Popen:
    env = {**os.environ, **cpu_env_defaults(1), "VLLM_RPC_BASE_PATH": str(rpc)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "ref", "--host", "127.0.0.1", "--port", str(port), "--dtype",
         dtype, "--max-model-len", str(max_len), "--enforce-eager"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the vLLM server exited; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            time.sleep(1)
    sys.exit(f"the vLLM server did not start; see {log}")


def precompute_cmd(model: Path, data: list[str], out: Path, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output", str(out),
            "--dtype", args.dtype, "--max-length", str(args.max_length), "--overwrite",
            *[a for d in data for a in ("--data", d)], *extra]


def summary_of(m) -> dict:
    s = json.loads(m.stdout)
    return {"tokens": s["tokens_scored_now"], "scoring_seconds": s["scoring_seconds"],
            "wall_seconds": round(m.seconds, 2)}


def two_workers(model: Path, data: list[str], out: Path, args, server: list[str]) -> dict:
    procs = [subprocess.Popen(precompute_cmd(model, data, out, args, *server, "--num-workers",
                                             "2", "--worker-index", str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            sys.exit(f"worker failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout))
    return {"tokens": sum(r["tokens_scored_now"] for r in results),
            "scoring_seconds": max(r["scoring_seconds"] for r in results)}


def request_breakdown(url: str, pairs: list, per_request: int) -> dict:
    """One request at a time: seconds waiting for the answer, decoding JSON, summing."""
    wait = decode = total = 0.0
    nbytes = tokens = 0
    for i in range(0, len(pairs), per_request):
        chunk = pairs[i:i + per_request]
        body = json.dumps({"model": "ref", "prompt": [[*p, *c] for p, c in chunk],
                           "max_tokens": 1, "prompt_logprobs": 0}).encode()
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as answer:
            raw = answer.read()
        t1 = time.perf_counter()
        choices = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
        t2 = time.perf_counter()
        for j, (choice, pair) in enumerate(zip(choices, chunk, strict=True)):
            portable_values(choice, pair, i + j).sum()
        t3 = time.perf_counter()
        wait, decode, total = wait + t1 - t0, decode + t2 - t1, total + t3 - t2
        nbytes += len(raw)
        tokens += sum(len(p) + len(c) for p, c in chunk)
    return {"requests": -(-len(pairs) // per_request), "tokens": tokens,
            "answer_bytes": nbytes, "bytes_per_token": round(nbytes / tokens, 1),
            "wait_seconds": round(wait, 3), "json_decode_seconds": round(decode, 3),
            "sum_seconds": round(total, 3)}


def cache_pairs(cache: Path, limit: int) -> list:
    t = open_cache(cache, columns=["prompt_ids", "completion_ids"]).table.slice(0, limit)
    return list(zip(t["prompt_ids"].to_pylist(), t["completion_ids"].to_pylist(), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--records", type=int, default=24, help="first N records of each file")
    add_model_args(ap)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--breakdown-sequences", type=int, default=32)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, shape = resolve_model(args, args.out.parent)
    data = data_slice(args.out / "data", args.records, data_files(args.data))
    info = machine(args.dtype)
    rpc = args.out / "rpc"
    rpc.mkdir(exist_ok=True)
    env = {**os.environ, "VLLM_RPC_BASE_PATH": str(rpc)}
    runs = {"vllm": summary_of(checked(measure(precompute_cmd(
        model, data, args.out / "cache-vllm", args, "--backend", "vllm"), env=env),
        "kto-precompute --backend vllm"))}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    server = start_server(model, port, args.max_length + 1, args.dtype, args.out / "server.log",
                          rpc)
    start_seconds = round(time.monotonic() - t0, 1)
    flags = ["--backend", "server", "--server-url", url]
    try:
        runs["server, 1 worker"] = summary_of(checked(measure(precompute_cmd(
            model, data, args.out / "cache-server", args, *flags)), "--backend server"))
        runs["server, 2 workers"] = two_workers(model, data, args.out / "cache-server-2", args,
                                                flags)
        pairs = cache_pairs(args.out / "cache-server", args.breakdown_sequences)
        breakdown = {n: request_breakdown(url, pairs, n) for n in (1, 8)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    rows = [[name, f"{r['tokens'] / r['scoring_seconds']:.0f}", str(r["tokens"]),
             f"{r['scoring_seconds']:.1f}"] for name, r in runs.items()]
    md = (f"`{command_line()}`: {shape.describe()}, {args.dtype}, one vLLM server (started in "
          f"{start_seconds} s), same sequences for every run.\n\n"
          + table(["scorer", "tokens/s (scoring phase)", "tokens", "scoring s"], rows)
          + "\nOne request at a time, "
          f"{args.breakdown_sequences} sequences:\n\n"
          + table(["prompts per request", "wait for answer s", "JSON decode s", "sum s",
                   "answer bytes per token"],
                  [[str(n), str(b["wait_seconds"]), str(b["json_decode_seconds"]),
                    str(b["sum_seconds"]), str(b["bytes_per_token"])]
                   for n, b in breakdown.items()]))
    result = {"command": command_line(), "machine": info, "shape": shape,
              "server_start_seconds": start_seconds, "runs": runs, "breakdown": breakdown,
              "args": vars(args) | {"out": str(args.out)}}
    write(args.out, "server", result, md)
    print(md)


if __name__ == "__main__":
    main()
