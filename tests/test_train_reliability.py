"""kto-train never mixes two runs in one folder, never resumes with other settings, never
takes a step with a non-finite loss term or gradient, survives a cut metrics line, and
stops on a scheduler's signal with a checkpoint and no temporary files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_weights_close
from reliability_helpers import assert_clean_error
from train_helpers import build_polite_cache, final_weights, make_policy, read_metrics

from train.cli import main
from train.config import TrainConfig
from train.guard import NonFiniteGradientError, NonFiniteLossError
from train.trainer import Trainer, cached_reference

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-rel")
    return {"root": root, "policy": make_policy(root, seed=1),
            "cache": build_polite_cache(tiny_dir, root, range(0, 24), "cache"),
            "other_cache": build_polite_cache(tiny_dir, root, range(40, 64), "other")}


def args(setup, out, *extra, cache=None):
    return ["--model", str(setup["policy"]), "--cache", str(cache or setup["cache"]),
            "--output", str(out), "--learning-rate", "1e-3", "--per-device-train-batch-size",
            "4", "--logging-steps", "1", *extra]


def train(setup, out, *extra, **kw):
    return CliRunner().invoke(main, args(setup, out, *extra, **kw))


def checkpoints(out):
    return sorted(p.name for p in Path(out).glob("checkpoint-*"))


def snapshot(out):
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}


# ---- items 1 and 5: one run per folder, resume only with the same settings -------------
def test_second_run_into_a_used_folder_is_refused_or_replaced(setup, tmp_path):
    out = tmp_path / "x"
    a = train(setup, out, "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "2")
    assert a.exit_code == 0, a.output
    before = snapshot(out)
    b = train(setup, out, "--max-steps", "4", "--save-steps", "1", "--save-total-limit", "2")
    assert_clean_error(b, f"{out} holds the checkpoints of an earlier run",
                       "--resume-from-checkpoint latest", "--overwrite-output-dir")
    assert snapshot(out) == before and checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    c = train(setup, out, "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "2",
              "--overwrite-output-dir")
    assert c.exit_code == 0, c.output
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]  # B's own, pruned among B's
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_resume_with_other_settings_is_refused_and_changes_nothing(setup, tmp_path):
    out = tmp_path / "x"
    assert train(setup, out, "--max-steps", "4", "--save-steps", "2").exit_code == 0
    before = snapshot(out)
    result = CliRunner().invoke(main, [
        "--model", str(setup["policy"]), "--cache", str(setup["other_cache"]),
        "--output", str(out), "--learning-rate", "2e-3", "--per-device-train-batch-size", "2",
        "--beta", "0.2", "--logging-steps", "1", "--max-steps", "4", "--save-steps", "2",
        "--resume-from-checkpoint", "latest"])
    line = assert_clean_error(result, "checkpoint-4: the run was started with other settings")
    for name in ("beta: 0.1 then, 0.2 now", "cache:", "learning_rate: 0.001 then, 0.002 now",
                 "per_device_train_batch_size: 4 then, 2 now"):
        assert name in line
    assert snapshot(out) == before  # train_config.json and metrics.jsonl untouched


def test_resume_of_the_same_finished_run_is_a_no_op(setup, tmp_path):
    """The pipelines rerun training with --resume-from-checkpoint latest: allowed, and the
    final model is the run's own."""
    out = tmp_path / "x"
    assert train(setup, out, "--max-steps", "4", "--save-steps", "2").exit_code == 0
    first = final_weights(out)
    again = train(setup, out, "--max-steps", "4", "--save-steps", "2",
                  "--resume-from-checkpoint", "latest")
    assert again.exit_code == 0, again.output
    assert_weights_close(final_weights(out), first)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_output_may_not_be_the_policy_or_inside_the_cache(setup):
    assert_clean_error(train(setup, setup["policy"], "--max-steps", "1"),
                       "is the policy's own folder")
    assert_clean_error(train(setup, setup["cache"] / "run", "--max-steps", "1"),
                       "is inside --cache")


# ---- item 7: a metrics line cut by a kill ------------------------------------------------
def test_resume_drops_a_metrics_line_cut_by_a_kill(setup, tmp_path):
    import shutil

    out = tmp_path / "x"
    assert train(setup, out, "--max-steps", "4", "--save-steps", "2").exit_code == 0
    shutil.rmtree(out / "checkpoint-4")  # as if killed in step 4 while writing its record
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    result = train(setup, out, "--max-steps", "4", "--save-steps", "2",
                   "--resume-from-checkpoint", "latest")
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_a_damaged_metrics_line_in_the_middle_is_named(setup, tmp_path):
    out = tmp_path / "x"
    assert train(setup, out, "--max-steps", "4", "--save-steps", "2").exit_code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert_clean_error(train(setup, out, "--max-steps", "4", "--save-steps", "2",
                             "--resume-from-checkpoint", "latest"),
                       "metrics.jsonl: line 2 is not a metrics record")


# ---- item 2: the non-finite guard --------------------------------------------------------
def trainer_for(setup, out, reference=cached_reference, **overrides):
    config = TrainConfig(model=str(setup["policy"]), cache=str(setup["cache"]), output=str(out),
                         learning_rate=1e-3, per_device_train_batch_size=4, logging_steps=1,
                         max_steps=4, **overrides)
    trainer = Trainer(config, reference)
    trainer.setup()
    return trainer


def weights(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_nan_row_stops_the_run_before_any_weight_changes(setup, tmp_path):
    """One NaN ref_logps among four rows: the NaN-skipping mean keeps the loss finite, yet
    the row's gradient is NaN. Step 3 must not be taken: weights stay those of step 2."""
    seen = []

    def one_nan_at_step_3(batch):
        seen.append(batch["ids"])
        ref = batch["ref_logps"].clone()
        if len(seen) == 3:
            ref[1] = float("nan")
        return ref, batch["ref_kl_logps"]

    trainer = trainer_for(setup, tmp_path / "out", one_nan_at_step_3, save_steps=2)
    try:
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 \(rows of "
                                                     r"this process: \[") as err:
            trainer.train()
        at_error = weights(trainer)
    finally:
        trainer.cleanup()
    assert str(err.value).count("-u-") == 1 and seen[2][1] in str(err.value)  # that row only
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in at_error.values())
    assert_weights_close(at_error, saved)


def test_non_finite_gradient_norm_stops_before_the_optimizer_step(setup, tmp_path):
    trainer = trainer_for(setup, tmp_path / "out")
    first = weights(trainer)
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient norm \(nan\) at "
                                                         r"step 1 .* no weight changed"):
            trainer.train()
        assert_weights_close(weights(trainer), first)
    finally:
        trainer.cleanup()


# ---- item 6: signals ------------------------------------------------------------------------
def run_driver(point, n, signame, argv, tmpdir):
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, str(TESTS / "signal_driver.py"), point, str(n),
                           signame, *argv], capture_output=True, text=True, env=env,
                          cwd=TESTS.parent, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup["root"] / "uninterrupted-8"
    result = train(setup, out, "--max-steps", "8")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_mid_step_saves_a_checkpoint_and_resume_is_exact(setup, uninterrupted, tmp_path,
                                                                signame):
    out, tmpdir = tmp_path / "x", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = run_driver("train-step", 2, signame, args(setup, out, "--max-steps", "8"), tmpdir)
    assert proc.returncode == 128 + getattr(signal, signame), proc.stderr[-2000:]
    assert f"stopped by {signame} after step 3 of 8; checkpoint saved in" in proc.stderr
    assert checkpoints(out) == ["checkpoint-3"] and not (out / "model.safetensors").exists()
    assert not list(tmpdir.iterdir())  # the Arrow copy of the cache is gone
    assert proc.stdout == ""
    resumed = train(setup, out, "--max-steps", "8", "--resume-from-checkpoint", "latest")
    assert resumed.exit_code == 0, resumed.output
    assert_weights_close(final_weights(out), final_weights(uninterrupted))
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 9))


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(setup, uninterrupted,
                                                                      tmp_path):
    """2 processes: only rank 1 gets SIGTERM (in step 3); both stop after step 3 with one
    complete checkpoint, and the resumed run equals the uninterrupted one."""
    out, tmpdir = tmp_path / "x", tmp_path / "tmp"
    tmpdir.mkdir()
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    argv = ["--model", str(setup["policy"]), "--cache", str(setup["cache"]), "--output",
            str(out), "--learning-rate", "1e-3", "--per-device-train-batch-size", "2",
            "--logging-steps", "1", "--max-steps", "8"]
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.run([*launch, str(TESTS / "signal_driver.py"), "train-step-rank1", "2",
                           "SIGTERM", *argv], capture_output=True, text=True, env=env,
                          cwd=TESTS.parent, timeout=600)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "stopped by SIGTERM after step 3 of 8" in proc.stderr  # rank 1
    assert "stopped by a signal on another process after step 3 of 8" in proc.stderr  # rank 0
    assert checkpoints(out) == ["checkpoint-3"]
    assert {p.name for p in (out / "checkpoint-3").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert not [p for p in tmpdir.iterdir() if p.name.startswith("kto-train-")]
    resumed = subprocess.run([*launch, "-m", "train.cli", *argv, "--resume-from-checkpoint",
                              "latest"], capture_output=True, text=True, env=env,
                             cwd=TESTS.parent, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_weights_close(final_weights(out), final_weights(uninterrupted))


def test_sigterm_during_setup_leaves_nothing_behind(setup, tmp_path):
    out, tmpdir = tmp_path / "x", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = run_driver("train-setup", 0, "SIGTERM", args(setup, out, "--max-steps", "2"), tmpdir)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Error: stopped by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmpdir.iterdir()) and not (out / "train_config.json").exists()


def test_external_sigterm_during_training(setup, tmp_path):
    """A real signal from another process at an arbitrary moment of training."""
    out, tmpdir = tmp_path / "x", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "train.cli",
                             *args(setup, out, "--max-steps", "60")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=TESTS.parent, env={**os.environ, "TMPDIR": str(tmpdir)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    [saved] = checkpoints(out)
    step = int(saved.split("-")[1])
    assert 3 <= step < 60 and read_metrics(out)[-1]["step"] == step
    assert not list(tmpdir.iterdir())


# ---- item 13: a full disk during a run ---------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that allows the mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                           capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_finishes(setup, small_disk):
    out = small_disk / "x"
    full = train(setup, out, "--max-steps", "4", "--save-steps", "2")
    assert_clean_error(full, f"cannot write {out / 'checkpoint-2'}: No space left on device",
                       "free space on that disk")
    assert not list(out.glob("*checkpoint-*"))  # the half-written one is gone
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = train(setup, out, "--max-steps", "4", "--save-steps", "2",
                  "--resume-from-checkpoint", "latest")
    assert again.exit_code == 0, again.output
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
