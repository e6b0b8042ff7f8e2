"""Damaged inputs beyond the cache and the data: damaged model files and
checkpoints, option values that failed deep inside a run, each a clean line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from reliability_helpers import assert_clean_error
from test_precompute import synthetic
from train_helpers import build_polite_cache, make_policy

from precompute.cli import main as precompute_main
from shared.weights import safetensors_problem
from train.cli import main as train_main


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("more")
    return {"root": root, "policy": make_policy(root, seed=1),
            "cache": build_polite_cache(tiny_dir, root, range(0, 12), "cache")}


def truncated_copy(model, where):
    shutil.copytree(model, where)
    weights = where / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300_000])
    return where


def test_truncated_weights_are_named_before_any_work(setup, tiny_dir, tmp_path):
    assert safetensors_problem(tiny_dir / "model.safetensors") is None
    bad = truncated_copy(tiny_dir, tmp_path / "bad-model")
    data = synthetic(tmp_path, n=4)
    result = CliRunner().invoke(precompute_main, ["--model", str(bad), "--data", str(data),
                                                  "--output", str(tmp_path / "c"),
                                                  "--backend", "hf"])
    assert_clean_error(result, f"{bad / 'model.safetensors'} is damaged (300000 bytes",
                       "copy or download it again")
    bad_policy = truncated_copy(setup["policy"], tmp_path / "bad-policy")
    result = CliRunner().invoke(train_main, ["--model", str(bad_policy), "--cache",
                                             str(setup["cache"]), "--output",
                                             str(tmp_path / "t")])
    assert_clean_error(result, f"{bad_policy / 'model.safetensors'} is damaged")


def run_args(setup, out, *extra):
    return ["--model", str(setup["policy"]), "--cache", str(setup["cache"]), "--output",
            str(out), "--per-device-train-batch-size", "4", "--max-steps", "4",
            "--save-steps", "2", *extra]


@pytest.mark.parametrize("damage,fragment", [
    (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 16),
     "model.safetensors: SHA-256 differs"),
    (lambda c: (c / "trainer_state.json").write_text("{cut"), "is not a valid trainer_state"),
    (lambda c: (c / "trainer_state.json").write_text(json.dumps({"global_step": "4"})),
     "field 'global_step' is '4'"),
])
def test_a_damaged_checkpoint_is_named_with_the_fix(setup, tmp_path, damage, fragment):
    out = tmp_path / "x"
    assert CliRunner().invoke(train_main, run_args(setup, out)).exit_code == 0
    damage(out / "checkpoint-4")
    result = CliRunner().invoke(train_main, run_args(setup, out, "--resume-from-checkpoint",
                                                     "latest"))
    assert_clean_error(result, fragment)


@pytest.mark.parametrize("option,value,fragment", [
    ("--undesirable-weight", "0", None),  # divided by zero in the class-balance warning
    ("--desirable-weight", "-1", "must be >= 0"),
    ("--save-steps", "-2", "--save-steps must be >= 0"),
])
def test_option_values_fail_early_or_work(setup, tmp_path, option, value, fragment):
    result = CliRunner().invoke(train_main, run_args(setup, tmp_path / "x", option, value))
    if fragment is None:
        assert result.exit_code == 0, result.output
    else:
        assert_clean_error(result, fragment)


def test_a_second_job_on_the_same_output_is_refused(setup, tiny_dir, tmp_path):
    """A double submission or a requeue while the first job runs: the folder lock (held
    here, as the first job would) refuses the second before it writes anything."""
    from shared.lock import FolderLock

    out = tmp_path / "t"
    out.mkdir()
    with FolderLock(out / ".kto-train.lock", "first"):
        result = CliRunner().invoke(train_main, run_args(setup, out))
        assert_clean_error(result, f"--output {out} is in use by pid {os.getpid()}")
    assert not (out / "train_config.json").exists()
    assert CliRunner().invoke(train_main, run_args(setup, out)).exit_code == 0  # released
    assert not (out / ".kto-train.lock").exists()  # and removed: no stray file in --output
    data = synthetic(tmp_path, n=4)
    cache = tmp_path / "c"
    cache.mkdir()
    with FolderLock(cache / ".kto-precompute-worker-00000.lock", "first"):
        result = CliRunner().invoke(precompute_main, ["--model", str(tiny_dir), "--data",
                                                      str(data), "--output", str(cache),
                                                      "--backend", "hf"])
        assert_clean_error(result, f"--output {cache} (worker 0) is in use by pid")


def test_the_lock_of_a_killed_job_is_released(tmp_path):
    code = ("import sys, time; sys.path.insert(0, '.'); from shared.lock import FolderLock; "
            f"FolderLock(__import__('pathlib').Path('{tmp_path}/.lock'), 'x').acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == "locked"
    from shared.errors import ConfigError
    from shared.lock import FolderLock

    with pytest.raises(ConfigError, match="in use by pid"):
        FolderLock(tmp_path / ".lock", "x").acquire()
    proc.kill()
    proc.wait()
    FolderLock(tmp_path / ".lock", "x").acquire().release()


def test_stdout_closed_early_is_quiet(setup):
    proc = subprocess.Popen([sys.executable, "-m", "precompute.cli", "verify",
                             str(setup["cache"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    proc.stdout.close()  # as `| head` would, before anything is printed
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in stderr and "Exception" not in stderr


def test_a_config_file_that_is_not_utf8_is_one_line(setup, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"beta: 0.1\nnote: caf\xe9\n")
    result = CliRunner().invoke(train_main, ["--config", str(config), *run_args(setup,
                                                                              tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"cannot read {config}" in result.output


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    """Lustre without -o flock answers flock() with ENOSYS: no lock, a warning, no crash
    (simulated: this machine's filesystems all support locks)."""
    import errno
    import fcntl

    from shared.lock import FolderLock

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    FolderLock(tmp_path / ".lock", "x").acquire().release()
    assert "cannot lock" in caplog.text and "Function not implemented" in caplog.text


def test_out_of_memory_is_one_line_with_the_knobs():
    import click
    import torch

    from shared.cli import user_errors

    @user_errors
    def command():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")

    with pytest.raises(click.ClickException) as info:
        command()
    assert info.value.message.startswith("out of accelerator memory (CUDA out of memory.")
    message = info.value.message
    assert "--batch-tokens" in message and "--gradient-checkpointing" in message


def test_eval_cache_smaller_than_one_batch_over_all_processes_is_refused(caplog):
    from shared.errors import KtoError
    from train.trainer import eval_span_check

    eval_span_check(3, 4, 1)  # one process: every row, in a short last batch
    with pytest.raises(KtoError, match="fewer than one evaluation batch"):
        eval_span_check(6, 4, 2)
    eval_span_check(10, 2, 2)
    assert "evaluating 8 of the eval cache's 10 rows" in caplog.text
