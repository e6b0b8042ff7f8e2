"""pipelines/: the Makefile pipeline run for real (make -j 2, 2 workers, tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_cache, read_cache
from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = f"{Path(sys.executable).parent}/"


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-f", str(ROOT / "pipelines" / "Makefile"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def records(n):
    return [{"prompt": f"Question {i % 9}: {i}?", "completion": f"Answer {i}.",
             "label": i % 3 != 0} for i in range(n)]


def test_make_two_workers_equals_single_run_then_trains(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", records(40))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", records(12))
    out = tmp_path / "run"
    args = [f"MODEL={tiny_dir}", f"DATA={data}", f"EVAL_DATA={eval_data}", f"OUT={out}",
            "WORKERS=2", f"BIN={BIN}", "PRECOMPUTE_ARGS=--backend hf --shard-size 6",
            "TRAIN_ARGS=--max-steps 2 --learning-rate 1e-3 --logging-steps 1"]
    done = make("-j", "2", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["worker-0.json",
                                                                 "worker-1.json"]
    build_cache(tiny_dir, [data], tmp_path / "single", shard_size=6)
    single_manifest, single = read_cache(tmp_path / "single")
    piped_manifest, piped = read_cache(out / "cache")
    assert piped.to_pylist() == single.to_pylist()
    assert piped_manifest == single_manifest
    assert (out / "policy" / "model.safetensors").is_file()
    assert "eval_rewards/margins" in (out / "eval" / "metrics.jsonl").read_text()
    rerun = make("-j", "2", *args)  # everything is up to date: no tool runs again
    assert rerun.returncode == 0 and "kto-" not in rerun.stdout, rerun.stdout


def test_failed_worker_leaves_nothing_taken_as_done(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [*records(5), {"prompt": "p", "label": True}])
    out = tmp_path / "run"
    args = [f"MODEL={tiny_dir}", f"DATA={data}", f"OUT={out}", "WORKERS=2", f"BIN={BIN}",
            "PRECOMPUTE_ARGS=--backend hf"]
    failed = make("-j", "2", *args)
    assert failed.returncode != 0
    assert "record 5, field 'completion': missing field" in failed.stderr
    assert not list((out / "parts").glob("*.json"))
    assert not (out / "cache" / "manifest.json").exists()


def test_make_workers_against_a_server_equal_a_single_server_run(tiny_dir, tokenizer,
                                                                  tmp_path):
    """SERVER_URL: both workers score against one (stand-in) vLLM server; combined, the
    cache equals a single run's against it."""
    from fake_vllm_server import FakeServer

    server = FakeServer(tokenizer)
    try:
        data = write_jsonl(tmp_path / "data.jsonl", records(40))
        out = tmp_path / "run"
        done = make("-j", "2", "cache", f"MODEL={tiny_dir}", f"DATA={data}", f"OUT={out}",
                    "WORKERS=2", f"BIN={BIN}", f"SERVER_URL={server.url}",
                    "PRECOMPUTE_ARGS=--shard-size 6")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(f"--backend server --server-url {server.url}") == 2
        build_cache(tiny_dir, [data], tmp_path / "single", backend="server",
                    server_url=server.url, shard_size=6)
    finally:
        server.close()
    single_manifest, single = read_cache(tmp_path / "single")
    piped_manifest, piped = read_cache(out / "cache")
    assert piped.to_pylist() == single.to_pylist() and piped_manifest == single_manifest
    assert piped_manifest["backend"]["server"]["model"] == "tiny"


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("deepspeed_zero3", "DEEPSPEED"),
                                       ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    """accelerate's own loader accepts them (they are not run here: no GPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "pipelines" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_processes == 8
