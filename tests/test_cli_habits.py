"""TRL users' habits on both command lines (TRL's defaults and spellings, one YAML for both
stages, --max-length), data by Hub name, errors that lead somewhere, and the output a user
reads (the final JSON, checkpoint noise kept to the log file)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_cache, read_cache
from reliability_helpers import assert_clean_error
from test_precompute import synthetic
from tiny import write_jsonl
from train_helpers import build_polite_cache, make_policy, read_metrics

from precompute.cli import main as precompute_main
from shared.cli import TerminalFilter
from shared.tokenization import TokenizeOptions
from train.cli import main as train_main
from train.config import TRL_DEFAULTS, TrainConfig

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    return {"root": root, "policy": make_policy(root, seed=1),
            "cache": build_polite_cache(tiny_dir, root, range(0, 24), "train-cache"),
            "eval": build_polite_cache(tiny_dir, root, range(100, 104), "eval-cache")}


def train_args(setup, out, *extra):
    return ["--model", str(setup["policy"]), "--cache", str(setup["cache"]), "--output",
            str(out), "--learning-rate", "1e-3", "--per-device-train-batch-size", "4", *extra]


# ---- TRL's defaults, and where ours differ ----------------------------------------------
def test_defaults_are_trls_except_the_ones_named_with_a_reason(tmp_path):
    """Every kto-train option that TRL 1.16's KTOConfig also has takes TRL's default, except
    those in TRL_DEFAULTS (printed by --help with the reason)."""
    from trl import KTOConfig

    trl = KTOConfig(output_dir=str(tmp_path), use_cpu=True)
    ours = TrainConfig(model="m", cache="c", output="o")
    differ = {f.name for f in dataclasses.fields(TrainConfig) if hasattr(trl, f.name)
              and f.name != "max_length"  # ours: the cache's, whose default is below
              and _plain(f.name, getattr(trl, f.name)) != getattr(ours, f.name)}
    # on CPU: TRL's bf16 is on; save_steps 500 (save_strategy "steps")
    assert differ == set(TRL_DEFAULTS) == {"bf16", "save_steps"}
    assert TokenizeOptions().max_length == trl.max_length == 1024
    assert (ours.learning_rate, ours.per_device_train_batch_size, ours.num_train_epochs) == (
        1e-6, 8, 3.0)
    help_text = " ".join(CliRunner().invoke(train_main, ["--help"]).output.split())
    assert "TRL's default: 500; ours differs because a checkpoint holds" in help_text
    assert "TRL's default: on; ours differs because on CPU" in help_text
    assert "Lengths are fixed when the cache is built" in help_text


def _plain(name: str, value):
    """TRL's value in our terms: enums as their strings, report_to's list as one string, and
    None meaning "keep all" / "no periodic evaluation" as our 0."""
    if name in ("save_total_limit", "eval_steps") and value is None:
        return 0
    if name == "report_to" and isinstance(value, list):
        return ",".join(value) or "none"
    return getattr(value, "value", value)


# ---- TRL's spellings --------------------------------------------------------------------
def test_trl_spellings_are_aliases_in_both_commands(setup, tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(train_main, [
        "--model_name_or_path", str(setup["policy"]), "--cache", str(setup["cache"]),
        "--output_dir", str(out), "--learning_rate", "1e-3", "--per_device_train_batch_size",
        "4", "--max_steps", "1", "--no_gradient_checkpointing", "--logging_steps", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["learning_rate"], saved["per_device_train_batch_size"], saved["max_steps"],
            saved["gradient_checkpointing"]) == (1e-3, 4, 1, False)
    data = synthetic(tmp_path, n=6)
    result = CliRunner().invoke(precompute_main, [
        "--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--cache",
        str(tmp_path / "c"), "--backend", "hf", "--max_length", "64", "--shard_size", "3"])
    assert result.exit_code == 0, result.output
    prep = read_cache(tmp_path / "c")[0]["preprocessing"]
    assert (prep["max_length"], prep["shard_size"]) == (64, 3)


# ---- one YAML for both stages -----------------------------------------------------------
def test_one_yaml_serves_both_commands_and_names_ignored_keys(setup, tiny_dir, tmp_path,
                                                              caplog):
    data = synthetic(tmp_path, n=12)
    config = tmp_path / "kto.yaml"
    config.write_text(
        f"model_name_or_path: {setup['policy']}\ndataset_name: {data}\n"
        f"cache: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'policy'}\nmax_length: 128\n"
        "backend: hf\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 4\nmax_steps: 1\n"
        "seed: 3\n")
    caplog.set_level(logging.INFO, logger="shared.cli")
    # the reference of KTO is the initial policy: one model key for both
    result = CliRunner().invoke(precompute_main, ["--config", str(config)])
    assert result.exit_code == 0, result.output
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert ignored == [f"{config}: ignoring output_dir, learning_rate, "
                       "per_device_train_batch_size, max_steps (kto-train's keys)"]
    manifest = read_cache(tmp_path / "cache")[0]
    assert (manifest["preprocessing"]["max_length"], manifest["preprocessing"]["seed"]) == (128, 3)
    caplog.clear()
    result = CliRunner().invoke(train_main, ["--config", str(config)])
    assert result.exit_code == 0, result.output
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert ignored == [f"{config}: ignoring dataset_name, backend (kto-precompute's keys)"]
    saved = json.loads((tmp_path / "policy" / "train_config.json").read_text())
    assert (saved["learning_rate"], saved["max_length"], saved["seed"]) == (1e-3, 128, 3)


def test_a_key_neither_command_knows_is_an_error_with_a_suggestion(setup, tmp_path):
    config = tmp_path / "kto.yaml"
    config.write_text("learning_rat: 1.0e-3\nwarmup_ratio: 0.1\n")
    for main in (train_main, precompute_main):
        result = CliRunner().invoke(main, ["--config", str(config), "--help"])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "unknown key(s) learning_rat (did you mean learning_rat -> learning_rate?)" in (
            " ".join(result.output.split()))


def test_max_length_must_equal_the_caches(setup, tmp_path):
    result = CliRunner().invoke(train_main, train_args(setup, tmp_path / "a", "--max-steps",
                                                       "1", "--max-length", "1024"))
    assert result.exit_code == 0, result.output
    assert_clean_error(CliRunner().invoke(train_main, train_args(
        setup, tmp_path / "b", "--max-steps", "1", "--max-length", "256")),
        "--max-length 256:", "was built with --max-length 1024", "lengths are fixed when the "
        "cache is built", "kto-precompute --max-length 256")
    assert not (tmp_path / "b").exists()


# ---- data by Hub name -------------------------------------------------------------------
def hub_cache(root: Path) -> Path:
    """A hub cache holding dataset acme/prefs (config "small", splits train and test), as
    huggingface_hub lays it out."""
    repo = root / "datasets--acme--prefs"
    snapshot = repo / "snapshots" / SHA
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    (snapshot / "small").mkdir(parents=True)
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n"
        "    path: small/train.jsonl\n  - split: test\n    path: small/test.jsonl\n---\n")
    for split in ("train", "test"):
        write_jsonl(snapshot / "small" / f"{split}.jsonl", split_records(split))
    return snapshot


def split_records(split: str) -> list[dict]:
    return [{"prompt": f"{split} question {i}?", "completion": f"Answer {i}.",
             "label": i % 2 == 0} for i in range(6)]


def test_hub_dataset_by_name_offline_equals_the_same_rows_from_a_file(tiny_dir, tmp_path):
    snapshot = hub_cache(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    cmd = [str(Path(sys.executable).parent / "kto-precompute"), "--model", str(tiny_dir),
           "--dataset_name", "acme/prefs", "--dataset_config", "small",
           "--dataset_train_split", "test", "--output", str(tmp_path / "hub-cache"),
           "--backend", "hf", "--shard-size", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hub_manifest, hub_table = read_cache(tmp_path / "hub-cache")
    assert hub_manifest["data"]["hub"] == [
        {"dataset": "acme/prefs", "revision": SHA, "config": "small", "split": "test"}]
    file = write_jsonl(tmp_path / "test.jsonl", split_records("test"))
    build_cache(tiny_dir, [file], tmp_path / "file-cache", shard_size=3)
    _, file_table = read_cache(tmp_path / "file-cache")
    for column in ("prompt_ids", "completion_ids", "ref_logps", "ref_kl_logps", "label"):
        assert hub_table[column].to_pylist() == file_table[column].to_pylist(), column
    # the local repository folder, another split: other rows, another cache key
    build_cache(tiny_dir, [snapshot], tmp_path / "folder-cache", shard_size=3,
                dataset_config="small", dataset_split="train")
    folder_manifest, folder_table = read_cache(tmp_path / "folder-cache")
    assert folder_table["prompt_ids"].to_pylist() != hub_table["prompt_ids"].to_pylist()
    assert folder_manifest["cache_key"] != hub_manifest["cache_key"]


def test_unknown_hub_dataset_offline_is_one_line(tiny_dir, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "kto-precompute"), "--model", str(tiny_dir),
           "--data", "acme/missing", "--output", str(tmp_path / "out"), "--backend", "hf"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "acme/missing: no such local path or Hub dataset" in done.stderr
    assert not (tmp_path / "out").exists()


# ---- errors that lead somewhere ---------------------------------------------------------
def no_hub(monkeypatch):
    """Any request to the Hub fails the test: a missing path must not get that far."""
    import huggingface_hub

    def refuse(*_args, **_kwargs):
        raise AssertionError("the Hub was asked")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)


def test_missing_model_path_is_said_at_once(setup, tiny_dir, tmp_path, monkeypatch):
    no_hub(monkeypatch)
    data = synthetic(tmp_path, n=4)
    missing = tmp_path / "models" / "nope"
    assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(missing), "--data", str(data), "--output", str(tmp_path / "c"),
        "--backend", "hf"]), f"--model {missing}: no such folder")
    assert_clean_error(CliRunner().invoke(train_main, [
        "--model", str(missing), "--cache", str(setup["cache"]), "--output",
        str(tmp_path / "o")]), f"--model {missing}: no such folder")
    assert_clean_error(CliRunner().invoke(train_main, [
        "--model", str(setup["policy"]), "--tokenizer", "./nope", "--cache",
        str(setup["cache"]), "--output", str(tmp_path / "o")]), "--tokenizer ./nope: no such "
        "folder")
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_data_are_checked_before_the_weights_are_fingerprinted(tiny_dir, tmp_path,
                                                               monkeypatch):
    import precompute.identity

    hashed = []
    monkeypatch.setattr(precompute.identity, "model_fingerprint",
                        lambda d: hashed.append(d) or "0" * 64)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completon": "a", "label": True}])
    line = assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(tiny_dir), "--data", str(bad), "--output", str(tmp_path / "out"),
        "--backend", "hf"]), "cannot detect the input format",
        "Did you mean --column completion=completon?")
    assert hashed == [] and "--skip-invalid" not in line
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty folder


def test_no_known_format_never_advises_skip_invalid(tiny_dir, tmp_path):
    """With --skip-invalid every record would be skipped: the advice is --column / --format."""
    bad = write_jsonl(tmp_path / "bad.jsonl",
                      [{"prompt": "q", "completon": "a", "label": True}] * 3)
    line = assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(tiny_dir), "--data", str(bad), "--output", str(tmp_path / "out"),
        "--backend", "hf", "--skip-invalid"]), "no record of 3 had a recognisable format",
        "['completon', 'label', 'prompt']", "Did you mean --column completion=completon?",
        "or force --format")
    assert "--skip-invalid" not in line


def test_misspelled_field_of_a_known_format_gets_did_you_mean(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                              {"prompt": "q", "completon": "b", "label": True}])
    assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "out"),
        "--backend", "hf"]), "record 1, field 'completion': missing field",
        "Did you mean --column completion=completon?")
    assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "out"),
        "--backend", "hf", "--column", "completon=answer"]),
        "--column 'completon=answer': expected CANONICAL=SOURCE", "did you mean "
        "completion=answer?")


def test_data_file_given_as_cache_says_to_precompute_it(setup, tmp_path):
    data = synthetic(tmp_path, n=4)
    assert_clean_error(CliRunner().invoke(train_main, [
        "--model", str(setup["policy"]), "--cache", str(data), "--output",
        str(tmp_path / "o")]), f"--cache {data} is a file, not a kto-precompute cache",
        f"kto-precompute --model {setup['policy']} --data {data} --output CACHE_DIR")
    assert not (tmp_path / "o").exists()


def test_tokenizer_mismatch_names_the_reference_and_the_rebuild(setup, tiny_dir, tmp_path):
    other = tmp_path / "other-policy"
    shutil.copytree(setup["policy"], other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    data = read_cache(setup["cache"])[0]["data"]["files"][0]["path"]
    assert_clean_error(CliRunner().invoke(train_main, [
        "--model", str(other), "--cache", str(setup["cache"]), "--output",
        str(tmp_path / "o")]), "was tokenized with another tokenizer",
        f"reference model {tiny_dir}", f"kto-precompute --model {tiny_dir} --tokenizer {other} "
        f"--data {data} --output NEW_CACHE")
    assert not (tmp_path / "o").exists()


def test_rerun_with_other_settings_lists_them(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=6)
    build_cache(tiny_dir, [data], tmp_path / "out", seed=1, max_length=256)
    assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "out"),
        "--backend", "hf", "--seed", "2", "--max-length", "256"]),
        "already holds a cache made with other settings (preprocessing.seed: 1 then, 2 now)")
    assert_clean_error(CliRunner().invoke(precompute_main, [
        "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "out"),
        "--backend", "hf", "--seed", "1", "--max-length", "128", "--max-prompt-length", "64"]),
        "preprocessing.max_length: 256 then, 128 now; preprocessing.max_prompt_length: 128 "
        "then, 64 now")


# ---- the output a user reads ------------------------------------------------------------
def test_final_json_carries_the_final_eval_metrics(setup, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(train_main, train_args(
        setup, out, "--eval-cache", str(setup["eval"]), "--max-steps", "3", "--eval-steps",
        "2"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    last_eval = [m for m in read_metrics(out) if "eval_loss" in m][-1]
    assert last_eval["step"] == 3 and summary["step"] == 3
    assert {k: summary[k] for k in last_eval if k.startswith("eval_")} == {
        k: v for k, v in last_eval.items() if k.startswith("eval_")}
    assert "loss" in summary and "eval_rewards/margins" in summary


def test_checkpoint_noise_goes_to_the_log_file_only(setup, tmp_path):
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "kto-train"), *train_args(
        setup, out, "--max-steps", "2", "--save-steps", "1")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "saved in" not in done.stderr and "accelerate" not in done.stderr
    log_text = (out / "kto-train.log").read_text()
    assert "Model weights saved in" in log_text and "Optimizer state saved in" in log_text
    assert "train.trainer" in log_text or "train.setup" in log_text  # our own lines too


def test_terminal_filter_drops_the_tied_embeddings_warning():
    record = logging.LogRecord("accelerate.utils.other", logging.WARNING, __file__, 1,
                               "Removed shared tensor {'lm_head.weight'} while saving.", (),
                               None)
    kept = logging.LogRecord("train.trainer", logging.WARNING, __file__, 1, "a warning", (),
                             None)
    assert not TerminalFilter().filter(record) and TerminalFilter().filter(kept)
