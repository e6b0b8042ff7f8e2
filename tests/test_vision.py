"""Vision-language KTO on a tiny LLaVA-style model built here: the input shapes with
images, images in the cache (verified, decodable by datasets), the hf scorer against a
naive one-sequence-at-a-time oracle, training from the cache equal to training with a
live reference, resume after kill -9, and the refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import MLLM_DEMO, build_cache, read_cache
from helpers import assert_trajectories_close, assert_weights_close
from tiny import write_jsonl
from tiny_vision import TOKENS_PER_IMAGE, random_image, save_tiny_llava
from train_helpers import final_weights, launch_two_processes, read_metrics, run_training
from vision_oracle import check_against_oracle

from shared.errors import InputError
from shared.images import decode

TESTS = Path(__file__).parent
TRAJECTORY = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen",
              "logps/rejected")
ANSWERS = ("A red square on a blue field.", "Two cats asleep on a sofa.",
           "A mountain lake at dawn.", "A bowl of ripe oranges.")


def png(path: Path, seed: int, width: int = 40, height: int = 36) -> Path:
    random_image(seed, width, height).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {"root": root, "reference": save_tiny_llava(root / "reference", seed=0),
            "policy": save_tiny_llava(root / "policy", seed=1)}


def factory_records(root: Path, n: int) -> Path:
    """LLaMA-Factory's shape: ``messages`` with <image> in the text, ``images`` as paths
    relative to the data file, a label; one and two images per record."""
    (root / "img").mkdir(exist_ok=True)
    records = []
    for i in range(n):
        images = [f"img/{i}.png"] + ([f"img/{i}b.png"] if i % 3 == 0 else [])
        png(root / images[0], i, 40 + i, 36)
        if len(images) > 1:
            png(root / images[1], 100 + i, 30, 50)
        question = "<image>What is this?" if len(images) == 1 else "<image>and<image>: which?"
        answer = ANSWERS[i % 4] if i % 2 == 0 else ANSWERS[(i + 1) % 4]
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}],
                        "images": images, "label": i % 2 == 0})
    path = root / "factory.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def vcache(vlm):
    data = factory_records(vlm["root"], 16)
    out = vlm["root"] / "cache"
    build_cache(vlm["reference"], [data], out, shard_size=8)
    return out


# ---- inputs ------------------------------------------------------------------------------
def test_the_three_input_shapes_with_images(vlm, tmp_path):
    """TRL's typed content with ``image`` bytes, LLaMA-Factory's messages with paths, and
    RLHF-V style pairs with ``images`` as datasets Image values: each row gets its images,
    expanded to 16 tokens each."""
    img = png(tmp_path / "a.png", 1)
    raw = img.read_bytes()
    trl = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "Describe it."}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": t}]}],
            "label": lab, "image": raw} for t, lab in (("A square.", True), ("A cat.", False))]
    factory = [{"messages": [{"role": "user", "content": "<image>Describe it."},
                             {"role": "assistant", "content": "A lake."}],
                "images": ["a.png"], "label": True}]
    pairs = [{"conversations": [{"from": "human", "value": "<image>Describe it."}],
              "chosen": {"from": "gpt", "value": "Oranges."},
              "rejected": {"from": "gpt", "value": "Nothing."},
              "images": [{"bytes": raw, "path": None}]}]
    files = []
    for name, records in (("trl", trl), ("factory", factory), ("pairs", pairs)):
        files.append(write_jsonl(tmp_path / f"{name}.jsonl", records) if name == "factory" else
                     _parquet(tmp_path / f"{name}.parquet", records))
    build_cache(vlm["reference"], files, tmp_path / "cache")
    manifest, table = read_cache(tmp_path / "cache")
    assert table.num_rows == 5 and manifest["images"]["distinct"] == 1
    for row in table.to_pylist():
        assert row["image_tokens"] == [TOKENS_PER_IMAGE]
        assert row["prompt_ids"].count(manifest["processor"]["image_token_id"]) == 16
        assert row["images"][0]["bytes"] == raw and row["images"][0]["path"] is None


def _parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_pil_images_of_a_saved_dataset(vlm, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({
        "prompt": ["<image>Describe it.", "<image>Describe it."],
        "completion": ["A lake.", "A cat."], "label": [True, False],
        "images": [[random_image(3)], [random_image(4)]]},
        features=datasets.Features({"prompt": datasets.Value("string"),
                                    "completion": datasets.Value("string"),
                                    "label": datasets.Value("bool"),
                                    "images": datasets.List(datasets.Image())}))
    ds.save_to_disk(str(tmp_path / "saved"))
    build_cache(vlm["reference"], [tmp_path / "saved"], tmp_path / "cache")
    _, table = read_cache(tmp_path / "cache")
    stored = decode(table["images"][0].as_py()[0]["bytes"])
    assert list(stored.getdata()) == list(random_image(3).getdata())  # lossless (PNG)


@pytest.mark.parametrize("case,reason", [
    ("two placeholders, one image", "placeholders and images differ"),
    ("missing file", "image not found"),
    ("not an image", "image not decodable"),
    ("image in the completion", "image placeholder in the completion"),
])
def test_bad_image_records_are_named_and_skippable(vlm, tmp_path, case, reason):
    png(tmp_path / "ok.png", 0)
    (tmp_path / "bad.png").write_bytes(b"GIF89a, truncated")
    good = {"messages": [{"role": "user", "content": "<image>Hi"},
                         {"role": "assistant", "content": "Hello."}], "images": ["ok.png"]}
    bad = json.loads(json.dumps(good))
    if case == "two placeholders, one image":
        bad["messages"][0]["content"] = "<image><image>Hi"
    elif case == "missing file":
        bad["images"] = ["nowhere.png"]
    elif case == "not an image":
        bad["images"] = ["bad.png"]
    else:
        bad["messages"][1]["content"] = "Hello <image>"
    records = [{**good, "label": True}, {**bad, "label": False}, {**good, "label": False}]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(InputError) as err:
        build_cache(vlm["reference"], [data], tmp_path / "strict")
    assert "record 1, field 'images" in str(err.value) or "record 1, field 'completion'" in str(
        err.value)
    assert reason in str(err.value)
    summary = build_cache(vlm["reference"], [data], tmp_path / "skip", skip_invalid=True)
    assert summary["invalid_by_reason"] == {reason: 1} and summary["rows"] == 2


def test_truncation_never_cuts_an_image(vlm, tmp_path):
    png(tmp_path / "a.png", 0)
    long_question = "<image>" + " Please look closely at this picture." * 4
    records = [{"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "content": "A lake."}],
                "images": ["a.png"], "label": lab}
               for q, lab in ((long_question, True), ("<image>Hi", False), ("<image>Yo", True))]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    summary = build_cache(vlm["reference"], [data], tmp_path / "cache", max_length=40,
                          max_prompt_length=30, skip_invalid=True)
    assert summary["invalid_by_reason"] == {"truncation would cut an image": 1}
    _, table = read_cache(tmp_path / "cache")
    assert all(r.count(1024) == 16 for r in table["prompt_ids"].to_pylist())


def test_images_for_a_text_model_are_an_invalid_record(tiny_dir, tmp_path):
    png(tmp_path / "a.png", 0)
    rec = {"prompt": "<image>Hi", "completion": "Hello.", "images": ["a.png"]}
    data = write_jsonl(tmp_path / "d.jsonl", [{**rec, "label": True}, {**rec, "label": False}])
    with pytest.raises(InputError, match="record 0, field 'images': images for a text-only"):
        build_cache(tiny_dir, [data], tmp_path / "cache")


# ---- the cache -----------------------------------------------------------------------------
def test_cache_is_self_contained_and_datasets_decodes_its_images(vcache, vlm, tmp_path):
    import datasets

    moved = tmp_path / "moved"
    shutil.copytree(vcache, moved)
    source_bytes = sum(p.stat().st_size for p in (vlm["root"] / "img").iterdir())
    shutil.rmtree(vlm["root"] / "img")  # the source images are gone: the cache needs none
    try:
        manifest, table = read_cache(moved)
        ds = datasets.load_dataset(str(moved), split="train")
        assert ds.num_rows == table.num_rows == 16
        first = ds[0]["images"][0]
        assert first.size == (40, 36) and ds[0]["image_tokens"] == [16, 16]
        assert manifest["images"] == {"count": 22, "distinct": 22, "distinct_bytes": source_bytes}
        assert not any("img/" in json.dumps(r["images"], default=str) for r in
                       table.select(["images"]).to_pylist())
    finally:
        factory_records(vlm["root"], 16)


@pytest.mark.parametrize("edit,message", [
    ("bytes", "row 0 image 0's bytes do not match its SHA-256"),
    ("bytes and hash", "images were replaced"),
])
def test_verify_catches_a_replaced_image(vcache, tmp_path, edit, message):
    """A shard rewritten with one image's bytes changed (and its hash, too) and the shard
    checksum updated in the manifest: a consistent edit of everything else."""
    from shared.cache import write_shard
    from shared.fingerprint import sha256_file
    from shared.manifest import cache_key_of

    cache = tmp_path / "cache"
    shutil.copytree(vcache, cache)
    shard = sorted(cache.glob("shard-*.parquet"))[0]
    rows = pq.read_table(shard).to_pylist()
    image = rows[0]["images"][0]
    other = io.BytesIO()
    decode(image["bytes"]).rotate(90).save(other, format="PNG")
    image["bytes"] = other.getvalue()
    if edit == "bytes and hash":
        rows[0]["image_sha256"][0] = hashlib.sha256(image["bytes"]).hexdigest()
    import pyarrow as pa

    manifest = json.loads((cache / "manifest.json").read_text())
    info = write_shard(cache, shard.name, pa.Table.from_pylist(rows), manifest["cache_key"])
    for entry in manifest["shards"]:
        if entry["name"] == shard.name:
            entry["sha256"] = info.sha256
    assert cache_key_of(manifest) == manifest["cache_key"] and sha256_file(shard) == info.sha256
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "precompute.cli", "verify", str(cache)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_processor_settings_are_part_of_the_cache_key(vlm, vcache, tmp_path):
    """Another image resolution is another cache: a rerun into the same folder is refused,
    naming the processor setting."""
    from shared.errors import CacheError

    other = tmp_path / "other"
    save_tiny_llava(other, seed=0, image_size=48)
    with pytest.raises(CacheError, match=r"processor\.settings: .*48"):
        build_cache(other, [vlm["root"] / "factory.json"], vcache, shard_size=8)


# ---- scoring -------------------------------------------------------------------------------
def test_hf_scores_equal_a_naive_oracle(vlm, vcache):
    """Left-padded batches of one- and two-image rows, the chunked head on completion
    positions only, against one sequence at a time (float32)."""
    worst = check_against_oracle(vlm["reference"], vcache)
    assert worst < 1e-4  # what it measures: float32 batching noise, not a 1e-3 slack


@pytest.mark.real_data
def test_llama_factory_mllm_demo_end_to_end(vlm, tmp_path):
    """LLaMA-Factory's multimodal demo as it is (relative paths, two images per record in
    some, real JPEGs), with undesirable rows made from another conversation's answer."""
    path = kto_mllm_demo(tmp_path)
    build_cache(vlm["reference"], [path], tmp_path / "cache")
    manifest, table = read_cache(tmp_path / "cache")
    assert table.num_rows == 12 and manifest["images"]["distinct"] == 3
    check_against_oracle(vlm["reference"], tmp_path / "cache")


def kto_mllm_demo(folder: Path) -> Path:
    """``mllm_demo.json`` with labels: each conversation desirable, and once more with the
    next conversation's answer, undesirable; the images beside it as in the original."""
    records = json.loads(MLLM_DEMO.read_text())
    kto = []
    for i, r in enumerate(records):
        other = records[(i + 1) % len(records)]["messages"][-1]["content"]
        kto.append({**r, "label": True})
        kto.append({"messages": r["messages"][:-1] + [{"role": "assistant", "content": other}],
                    "images": r["images"], "label": False})
    path = folder / "kto_mllm.json"
    path.write_text(json.dumps(kto))
    os.symlink(MLLM_DEMO.parent / "mllm_demo_data", folder / "mllm_demo_data")
    return path


# ---- training ------------------------------------------------------------------------------
LAYOUT_KEYS = ("input_ids", "attention_mask", "position_ids", "score_mask", "seq_index",
               "num_seqs")


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_training_from_the_cache_equals_a_live_reference(vlm, vcache, tmp_path, family):
    """Every step's loss, KL estimate and rewards, and the final weights, with the
    reference log-probs from the cache and from a live reference model fed the batch's own
    image tensors (Idefics3: pixel values and pixel attention mask)."""
    from transformers import AutoModelForImageTextToText

    from shared.logprobs import sequence_logps

    reference, policy, cache = vlm["reference"], vlm["policy"], vcache
    if family == "idefics3":
        from tiny_vision import save_tiny_idefics3

        reference = save_tiny_idefics3(tmp_path / "reference", seed=0)
        policy = save_tiny_idefics3(tmp_path / "policy", seed=1)
        cache = tmp_path / "cache"
        build_cache(reference, [vlm["root"] / "factory.json"], cache, shard_size=8)
    ref_model = AutoModelForImageTextToText.from_pretrained(reference,
                                                            dtype=torch.float32).eval()

    @torch.no_grad()
    def live(batch):
        def logps(seqs):
            images = {k: v for k, v in seqs.items() if k not in LAYOUT_KEYS}
            logits = ref_model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                               position_ids=seqs["position_ids"], **images).logits
            return sequence_logps(logits, seqs["input_ids"], seqs["score_mask"].long()).double()
        return logps(batch["target"]), logps(batch["kl"])

    cached_m, cached_w = run_training(policy, cache, tmp_path / "cached")
    live_m, live_w = run_training(policy, cache, tmp_path / "live", reference=live)
    assert len(cached_m) == 4
    assert_trajectories_close(cached_m, live_m, TRAJECTORY)
    assert abs(cached_m[0]["rewards/chosen"]) > 1e-2  # the policy differs from the reference
    assert_weights_close(cached_w, live_w)


def test_frozen_parts_stay_and_the_language_model_moves(vlm, vcache, tmp_path):
    first = final_weights(vlm["policy"])
    _, frozen = run_training(vlm["policy"], vcache, tmp_path / "frozen", max_steps=2)
    _, free = run_training(vlm["policy"], vcache, tmp_path / "free", max_steps=2,
                                  freeze_vision_tower=False, freeze_multi_modal_projector=False)

    def moved(weights, part):
        return max(float((weights[k] - first[k]).abs().max()) for k in first if part in k)

    assert moved(frozen, "vision_tower") == 0 and moved(frozen, "multi_modal_projector") == 0
    assert moved(frozen, "language_model") > 1e-4
    assert moved(free, "vision_tower") > 0 and moved(free, "multi_modal_projector") > 0


def test_lora_adapts_only_the_language_model(vlm, vcache, tmp_path):
    pytest.importorskip("peft")
    from train.config import TrainConfig
    from train.setup import load_policy

    config = TrainConfig(model=str(vlm["policy"]), cache=str(vcache), output=str(tmp_path),
                         lora_r=4, gradient_checkpointing=True)
    model = load_policy(config, vision=True)
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and "language_model" in n for n in adapted)


def test_resume_after_kill_equals_uninterrupted(vlm, vcache, tmp_path):
    from train.cli import main

    args = ["--model", str(vlm["policy"]), "--cache", str(vcache), "--learning-rate", "1e-3",
            "--per-device-train-batch-size", "2", "--max-steps", "6", "--logging-steps", "1",
            "--save-steps", "1", "--no-bf16"]
    clean = tmp_path / "uninterrupted"
    result = CliRunner().invoke(main, [*args, "--output", str(clean)])
    assert result.exit_code == 0, result.output
    crashed = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, str(TESTS / "train_crash_driver.py"), "4", *args,
                           "--output", str(crashed)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (crashed / "checkpoint-4").is_dir() and not (crashed / "model.safetensors").exists()
    result = CliRunner().invoke(main, [*args, "--output", str(crashed),
                                       "--resume-from-checkpoint", "latest"])
    assert result.exit_code == 0, result.output
    assert_weights_close(final_weights(crashed), final_weights(clean))
    assert_trajectories_close(read_metrics(crashed), read_metrics(clean), TRAJECTORY)
    assert (crashed / "processor_config.json").is_file()


def test_a_policy_with_another_processor_is_refused(vlm, vcache, tmp_path):
    from train.cli import main

    other = tmp_path / "policy-48px"
    save_tiny_llava(other, seed=1, image_size=48)
    result = CliRunner().invoke(main, ["--model", str(other), "--cache", str(vcache),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "another image processor" in result.output and "48" in result.output
    assert not (tmp_path / "out").exists()


def test_two_processes_equal_one_with_the_same_global_batch(vlm, vcache, tmp_path):
    from train.cli import main

    common = ["--model", str(vlm["policy"]), "--cache", str(vcache), "--learning-rate", "1e-3",
              "--logging-steps", "1", "--max-steps", "3", "--no-bf16"]
    one = CliRunner().invoke(main, [*common, "--per-device-train-batch-size", "4",
                                    "--output", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    proc = launch_two_processes([*common, "--per-device-train-batch-size", "2"],
                                tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trajectories_close(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"),
                              (*TRAJECTORY, "grad_norm"))
    assert_weights_close(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"))


def test_packed_batches_equal_padded_ones(vlm, vcache, tmp_path):
    """--padding-free: every row's image tokens in one packed row, the images in order."""
    padded_m, padded_w = run_training(vlm["policy"], vcache, tmp_path / "padded",
                                             padding_free=False)
    packed_m, packed_w = run_training(vlm["policy"], vcache, tmp_path / "packed",
                                             padding_free=True)
    assert_trajectories_close(packed_m, padded_m, TRAJECTORY)
    assert_weights_close(packed_w, padded_w)


def test_without_gradient_checkpointing_the_steps_are_the_same(vlm, vcache, tmp_path):
    on_m, on_w = run_training(vlm["policy"], vcache, tmp_path / "on", max_steps=2)
    off_m, off_w = run_training(vlm["policy"], vcache, tmp_path / "off", max_steps=2,
                                       gradient_checkpointing=False)
    assert_trajectories_close(on_m, off_m, TRAJECTORY)
    assert_weights_close(on_w, off_w)


def test_multimodal_rope_families_are_refused_not_mispositioned():
    from transformers import Qwen2VLConfig

    from shared.errors import ConfigError
    from shared.vision import check_family

    with pytest.raises(ConfigError, match="multimodal rotary positions"):
        check_family(Qwen2VLConfig(), "Qwen/Qwen2-VL-2B-Instruct")
