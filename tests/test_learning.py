"""It learns: an unambiguous synthetic behaviour on held-out prompts, and held-out
margins on the real kto_en_demo data (tiny random model; docs/training.md shows a run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import KTO_DEMO, build_cache, read_cache
from train_helpers import build_polite_cache, run_training

from precompute.scoring.hf import HFScorer


def test_polite_replies_gain_on_held_out_prompts(tiny_dir, tmp_path):
    train_cache = build_polite_cache(tiny_dir, tmp_path, range(0, 32), "train")
    eval_cache = build_polite_cache(tiny_dir, tmp_path, range(500, 510), "eval")
    metrics, _ = run_training(tiny_dir, train_cache, tmp_path / "out", max_steps=16,
                              learning_rate=1e-3, beta=0.1, logging_steps=4)
    _, held_out = read_cache(eval_cache)
    rows = held_out.to_pylist()
    pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    gain = HFScorer(str(tmp_path / "out"), "float32", 4096).score(pairs) - np.array(
        [r["ref_logps"] for r in rows])
    by_prompt: dict[tuple, dict[bool, float]] = {}
    for r, g in zip(rows, gain, strict=True):
        by_prompt.setdefault(tuple(r["prompt_ids"]), {})[r["label"]] = g
    assert len(by_prompt) == 10
    # every unseen prompt: the polite reply gained log-prob relative to the rude one
    assert all(v[True] - v[False] > 1.0 for v in by_prompt.values()), by_prompt


@pytest.mark.real_data
def test_real_data_held_out_margins_rise(tiny_dir, tmp_path):
    records = json.loads(KTO_DEMO.read_text())
    (tmp_path / "train.json").write_text(json.dumps(records[:250]))
    (tmp_path / "eval.json").write_text(json.dumps(records[250:]))
    opts = {"max_length": 512, "max_prompt_length": 256}
    build_cache(tiny_dir, [tmp_path / "train.json"], tmp_path / "c-train", **opts)
    build_cache(tiny_dir, [tmp_path / "eval.json"], tmp_path / "c-eval", **opts)
    metrics, _ = run_training(tiny_dir, tmp_path / "c-train", tmp_path / "out",
                              max_steps=20, learning_rate=1e-3, logging_steps=10,
                              eval_cache=str(tmp_path / "c-eval"), eval_steps=10)
    margins = [m["eval_rewards/margins"] for m in metrics if "eval_loss" in m]
    assert margins[0] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 0
    assert margins[-1] > margins[0] + 0.1, margins


def test_tiny_demo_runs_end_to_end(tmp_path):
    """`make demo-tiny` as a user runs it: both CLIs in their own processes, their logs
    in OUT/logs, progress bars and the summary on the terminal."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "train.demo", "--tiny", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "trained 24 steps; held-out (64 rows) at step 0 -> step 24:" in lines
    assert not [line for line in lines if "WARNING" in line or "Traceback" in line]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "kto-precompute-eval.log", "kto-precompute-train.log", "kto-train.log"]
    evals = [json.loads(line) for line in (tmp_path / "policy" / "metrics.jsonl")
             .read_text().splitlines() if "eval_loss" in line]
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] + 1.0
