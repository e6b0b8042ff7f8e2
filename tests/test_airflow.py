"""The Airflow DAG: structure (cheap) and a real end-to-end `airflow dags test` run on
the tiny model, in the separate Airflow environment that `make test` builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "pipelines" / "airflow"
AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin"
pytestmark = pytest.mark.skipif(not (AIRFLOW_BIN / "airflow").exists(),
                                reason="no .venv-airflow: run `make airflow-venv`")


def airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")
    return env


def test_dag_structure(tmp_path):
    proc = subprocess.run([str(AIRFLOW_BIN / "python"), str(ROOT / "tests" /
                                                          "airflow_structure.py"), str(DAGS)],
                          capture_output=True, text=True, env=airflow_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dag = json.loads(proc.stdout.strip().splitlines()[-1])
    assert dag["tasks"] == ["combine", "precompute", "record_summary", "train",
                            "worker_indices"]
    assert dag["downstream"] == {"worker_indices": ["precompute"], "precompute": ["combine"],
                                 "combine": ["train"], "train": ["record_summary"],
                                 "record_summary": []}
    assert dag["mapped"] == ["precompute"] and dag["retries"]["precompute"] == 2
    assert {"model", "data", "output", "num_workers", "train_args",
            "server_url"} <= set(dag["params"])
    assert dag["schedule"] == "None"


def test_dag_worker_command_takes_a_server_url(tmp_path):
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import kto_cache_dag as d; "
            "p = {'model': 'tok dir', 'data': ['a.json'], 'output': '/r', 'num_workers': 2, "
            "'precompute_args': '', 'bin_dir': ''}; "
            "print(json.dumps([d.precompute_command(p, 1), d.precompute_command("
            "{**p, 'server_url': 'http://h:8000'}, 1)]))")
    proc = subprocess.run([str(AIRFLOW_BIN / "python"), "-c", code, str(DAGS)],
                          capture_output=True, text=True, env=airflow_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "--backend server" not in plain and "--server-url" not in plain
    assert served == ("kto-precompute --model 'tok dir' --data a.json --output /r/cache "
                      "--num-workers 2 --worker-index 1 --backend server --server-url "
                      "http://h:8000 ")


def test_dag_runs_end_to_end(tiny_dir, tmp_path):
    env = airflow_env(tmp_path / "airflow-home")
    migrate = subprocess.run([str(AIRFLOW_BIN / "airflow"), "db", "migrate"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": f"Q{i % 9}: {i}?", "completion": f"A {i}.", "label": i % 3 != 0}
        for i in range(40)])
    out = tmp_path / "run"
    conf = {"model": str(tiny_dir), "data": [str(data)], "output": str(out), "num_workers": 3,
            "precompute_args": "--backend hf --shard-size 6",
            "train_args": "--max-steps 2 --learning-rate 1e-3 --logging-steps 1",
            "bin_dir": str(Path(sys.executable).parent)}
    run = subprocess.run([str(AIRFLOW_BIN / "airflow"), "dags", "test", "kto_cache", "--conf",
                          json.dumps(conf)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    logs = run.stdout + run.stderr
    assert all("task_id='precompute', dag_id='kto_cache'" in logs and f"map_index={i}" in logs
               for i in range(3))
    assert sorted(p.name for p in (out / "cache").glob("manifest.worker-*")) == [
        f"manifest.worker-0000{i}-of-00003.json" for i in range(3)]
    assert (out / "policy" / "model.safetensors").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["cache_counts"]["rows"] == 40 and summary["final_metrics"]["step"] == 2
