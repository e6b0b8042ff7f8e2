"""Airflow 3 DAG (Airflow 2.9+ compatible): kto-precompute mapped over N workers,
combine + verify, kto-train, then a summary next to the outputs. It only calls the
command-line tools; each task is one command, so a worker, a GPU pod or a queue can
run it (see README, "Running at scale").

Trigger with a conf, e.g.
    airflow dags trigger kto_cache --conf '{"model": "/models/ref", "data": ["/data/a.json"],
        "output": "/shared/runs/r1", "num_workers": 8}'
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import timedelta
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import Param, dag, task
except ImportError:  # Airflow 2.9+ (task.bash arrived in 2.9)
    from airflow.decorators import dag, task
    from airflow.models.param import Param

PARAMS = {
    "model": Param("", type="string", description="Reference model (path or hub name)."),
    "policy": Param("", type="string", description="Initial policy; empty = the model."),
    "data": Param([], type="array", description="Input files for kto-precompute."),
    # no default: a shared default folder (say under /tmp, writable by every local user)
    # would let anyone plant a checkpoint that the train task's `latest` then resumes
    "output": Param(None, type="string", minLength=1,
                    description="Run folder on storage every worker sees (cache/, policy/); "
                                "required, in a folder only you can write."),
    "num_workers": Param(2, type="integer", minimum=1,
                         description="Precompute workers (mapped tasks)."),
    "server_url": Param("", type="string",
                        description="A running vLLM server to score against (--backend "
                                    "server); empty = each worker runs its own scorer. API "
                                    "key: KTO_SERVER_API_KEY in the workers' environment."),
    "precompute_args": Param("", type="string", description="Extra kto-precompute flags."),
    "train_args": Param("", type="string", description="Extra kto-train flags."),
    "bin_dir": Param("", type="string",
                     description="Folder with kto-precompute/kto-train; empty = on PATH."),
}


def _tool(params: dict, name: str) -> str:
    folder = params["bin_dir"]
    return shlex.quote(str(Path(folder) / name) if folder else name)


def precompute_command(params: dict, worker_index: int) -> str:
    data = " ".join(f"--data {shlex.quote(d)}" for d in params["data"])
    cache = shlex.quote(str(Path(params["output"]) / "cache"))
    url = params.get("server_url") or ""
    server = f"--backend server --server-url {shlex.quote(url)} " if url else ""
    return (f"{_tool(params, 'kto-precompute')} --model {shlex.quote(params['model'])} {data} "
            f"--output {cache} --num-workers {int(params['num_workers'])} "
            f"--worker-index {int(worker_index)} {server}{params['precompute_args']}")


def combine_command(params: dict) -> str:
    tool, cache = _tool(params, "kto-precompute"), shlex.quote(str(Path(params["output"]) /
                                                                   "cache"))
    return f"{tool} combine {cache} && {tool} verify {cache}"


def train_command(params: dict) -> str:
    out = Path(params["output"])
    policy = shlex.quote(params["policy"] or params["model"])
    return (f"{_tool(params, 'kto-train')} --model {policy}"
            f" --cache {shlex.quote(str(out / 'cache'))}"
            f" --output {shlex.quote(str(out / 'policy'))}"
            f" --resume-from-checkpoint latest {params['train_args']}")


@dag(dag_id="kto_cache", schedule=None, params=PARAMS, catchup=False, tags=["kto"],
     default_args={"retry_delay": timedelta(seconds=10)})
def kto_cache():
    @task
    def worker_indices(params=None) -> list[int]:
        """Turns the num_workers parameter into the list the precompute tasks map over."""
        return list(range(int(params["num_workers"])))

    # A retried worker reuses its complete shards. On a GPU cluster give each worker one
    # GPU: a pool with one slot per GPU (KTO_PRECOMPUTE_POOL) and/or a cap per run.
    @task.bash(retries=2, pool=os.environ.get("KTO_PRECOMPUTE_POOL", "default_pool"),
               max_active_tis_per_dagrun=int(os.environ.get("KTO_MAX_PARALLEL_WORKERS", "0"))
               or None)
    def precompute(worker_index: int, params=None) -> str:
        return precompute_command(params, worker_index)

    @task.bash
    def combine(params=None) -> str:
        return combine_command(params)

    @task.bash
    def train(params=None) -> str:
        return train_command(params)

    @task
    def record_summary(params=None) -> dict:
        """OUTPUT/run_summary.json: the cache's counts and the last training metrics."""
        out = Path(params["output"])
        manifest = json.loads((out / "cache" / "manifest.json").read_text())
        lines = (out / "policy" / "metrics.jsonl").read_text().splitlines()
        summary = {"output": str(out), "cache_counts": manifest["counts"],
                   "cache_key": manifest["cache_key"], "shards": manifest["num_shards"],
                   "final_metrics": json.loads(lines[-1]) if lines else None,
                   "policy": str(out / "policy")}
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    workers = precompute.expand(worker_index=worker_indices())
    workers >> combine() >> train() >> record_summary()


kto_cache()
