"""The real vLLM CPU engine (not a fake) against transformers and the naive oracle,
in float32, within 1e-3 nats per sequence sum; and both real demo files through it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_cache
from helpers import assert_close, naive_logps

from precompute.scoring.hf import HFScorer
from precompute.scoring.vllm_backend import selected_request, sum_prompt_logprobs, sum_selected

pytestmark = pytest.mark.vllm
TESTS = Path(__file__).parent
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed")


@pytest.fixture(scope="module")
def vllm_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm")
    proc = subprocess.run([sys.executable, str(TESTS / "vllm_driver.py"), str(tiny_dir),
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@needs_vllm
def test_vllm_equals_transformers_equals_naive(vllm_run, tiny_dir, model):
    data = json.loads((vllm_run / "synthetic.json").read_text())
    pairs = [tuple(p) for p in data["pairs"]]
    naive = naive_logps(model, pairs)
    hf = HFScorer(str(tiny_dir), "float32", batch_tokens=4096).score(pairs)
    assert_close(data["scores"], naive, what="vLLM vs naive")
    assert_close(hf, naive, what="hf vs naive")
    assert_close(data["scores"], hf, what="vLLM vs hf")
    # the installed vLLM offers flat prompt log-probs and the scorer sums them as a slice
    assert data["flat_offered"] and data["flat_taken"]


@needs_vllm
@pytest.mark.parametrize("name,rows", [("kto", 300), ("dpo", 600)])
def test_real_files_through_vllm_match_hf_cache(vllm_run, hf_real_caches, name, rows):
    v_manifest, v = read_cache(vllm_run / name)
    h_manifest, h = read_cache(hf_real_caches / name)
    assert v_manifest["backend"]["name"] == "vllm" and v.num_rows == rows
    for column in ("id", "prompt_ids", "completion_ids", "kl_completion_ids", "kl_partner"):
        assert v[column].to_pylist() == h[column].to_pylist(), column
    for column in ("ref_logps", "ref_kl_logps"):
        assert_close(v[column].to_numpy(), h[column].to_numpy(), what=f"{name} {column}")


class _Logprob:
    def __init__(self, value):
        self.logprob = value


class _Out:
    pass


def test_prompt_logprobs_reduction_sums_completion_positions_only():
    out = _Out()
    ids = [7, 8, 9, 10, 11]  # prompt [7, 8], completion [9, 10, 11]
    out.prompt_logprobs = [None] + [{t: _Logprob(-float(t))} for t in ids[1:]]
    assert sum_prompt_logprobs(out, ([7, 8], [9, 10, 11])) == -(9 + 10 + 11)


def test_selected_token_request_scores_exactly_the_completion():
    """The GPU-only selected-token API (Model Runner V2): row i predicts prompt token
    start + i + 1, so start = len(prompt) - 1 and one row per completion token."""
    req = selected_request(([7, 8], [9, 10, 11]))
    assert req == {"prompt_logprob_start": 1, "prompt_logprob_token_ids": [[9], [10], [11]]}
    out = _Out()
    out.prompt_token_id_logprobs = np.array([[-1.5], [-2.0], [-0.25]])
    assert sum_selected(out) == -3.75
