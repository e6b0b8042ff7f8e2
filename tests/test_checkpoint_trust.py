"""A checkpoint someone hands you runs no code and resumes only into its own run; a
damaged checkpoint is refused by its checksums; links planted in --output are never
written through; a finished run's folder is never changed by a resume from elsewhere."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_helpers import PRECIOUS, assert_clean_error, planted_output
from train_helpers import build_polite_cache, final_weights, make_policy

from train.checkpoint import STATE, folder_checksums, weights_only_loads
from train.cli import main


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    setup = {"root": root, "policy": make_policy(root, seed=1),
             "cache": build_polite_cache(tiny_dir, root, range(0, 24), "cache")}
    run = train(setup, root / "run", *RUN)
    assert run.exit_code == 0, run.output
    return setup


RUN = ("--max-steps", "6", "--save-steps", "2")  # checkpoints 2, 4, 6 and the final model


def train(setup, out, *extra):
    return CliRunner().invoke(main, [
        "--model", str(setup["policy"]), "--cache", str(setup["cache"]), "--output", str(out),
        "--learning-rate", "1e-3", "--per-device-train-batch-size", "4", "--logging-steps",
        "1", *extra])


def copy_run(setup, tmp_path, name="copy") -> Path:
    out = tmp_path / name
    shutil.copytree(setup["root"] / "run", out)
    return out


def everything(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Payload:
    """Unpickling this runs os.system (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def record_files(checkpoint: Path) -> None:
    """What an attacker would do: make the recorded checksums match the planted files."""
    state = json.loads((checkpoint / STATE).read_text())
    state["files"] = folder_checksums(checkpoint)
    (checkpoint / STATE).write_text(json.dumps(state))


def test_a_pickled_object_in_a_checkpoint_is_never_unpickled(setup, tmp_path):
    """The scheduler state accelerate kept as custom_checkpoint_0.pkl was loaded with
    weights_only=False: a crafted file ran a command and training went on."""
    out = copy_run(setup, tmp_path)
    marker = tmp_path / "pwned"
    checkpoint = out / "checkpoint-6"
    with open(checkpoint / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    record_files(checkpoint)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert not marker.exists()
    assert_clean_error(result, "cannot load the checkpoint")  # accelerate: no such object


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_crafted_torch_file_is_refused_without_running_it(setup, tmp_path, name):
    out = copy_run(setup, tmp_path)
    marker = tmp_path / "pwned"
    checkpoint = out / "checkpoint-6"
    torch.save({"state": Payload(marker)}, checkpoint / name)
    record_files(checkpoint)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert not marker.exists()
    if name == "optimizer.bin":  # accelerate skips an unreadable RNG file by design
        assert_clean_error(result, "never unpickles", "checkpoint-6")


def test_weights_only_loads_override_a_caller_asking_for_full_unpickling(tmp_path):
    """DeepSpeed's checkpoint engine calls torch.load(..., weights_only=False)."""
    marker, path = tmp_path / "pwned", tmp_path / "states.pt"
    torch.save({"x": Payload(marker)}, path)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"


def test_a_checkpoint_without_its_run_settings_is_refused(setup, tmp_path):
    out = copy_run(setup, tmp_path)
    for checkpoint in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        state = json.loads((out / checkpoint / STATE).read_text())
        del state["run"]
        (out / checkpoint / STATE).write_text(json.dumps(state))
    before = everything(out)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert_clean_error(result, "records no run settings")
    assert everything(out) == before


def test_a_flipped_bit_in_checkpoint_weights_is_refused_then_earlier_resume_works(setup,
                                                                                  tmp_path):
    """One flipped exponent bit resumed silently to a weight of 2.5e37. The advice
    ("resume from an earlier checkpoint") must work, and `latest` again after it."""
    out = copy_run(setup, tmp_path)
    weights = out / "checkpoint-6" / "model.safetensors"
    good = weights.read_bytes()
    raw = bytearray(good)
    raw[-3] ^= 0x40  # an exponent bit of the last float32 weight
    weights.write_bytes(bytes(raw))
    refused = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert_clean_error(refused, "model.safetensors: SHA-256 differs", "earlier checkpoint")
    earlier = train(setup, out, *RUN, "--resume-from-checkpoint", str(out / "checkpoint-4"))
    assert earlier.exit_code == 0, earlier.output
    assert weights.read_bytes() == good  # the run rewrote the damaged later checkpoint
    again = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert again.exit_code == 0, again.output
    for k, v in final_weights(setup["root"] / "run").items():
        assert torch.equal(final_weights(out)[k], v), k


@pytest.mark.parametrize("change", ["unlisted", "missing"])
def test_a_checkpoint_with_files_added_or_removed_is_refused(setup, tmp_path, change):
    out = copy_run(setup, tmp_path)
    checkpoint = out / "checkpoint-6"
    if change == "unlisted":
        (checkpoint / "pytorch_model.bin").write_bytes(b"planted")
        fragment = "pytorch_model.bin: not written by kto-train"
    else:
        (checkpoint / "optimizer.bin").unlink()
        fragment = "optimizer.bin: missing"
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert_clean_error(result, fragment)


def test_resume_from_another_folders_checkpoint_into_a_finished_run_changes_nothing(setup,
                                                                                     tmp_path):
    """A's final model, train_config.json and metrics were replaced by the other run's."""
    a = tmp_path / "a"
    first = train(setup, a, *RUN, "--beta", "0.2")
    assert first.exit_code == 0, first.output
    before = everything(a)
    other = setup["root"] / "run" / "checkpoint-2"
    for extra in ([], ["--beta", "0.2"]):
        result = train(setup, a, *RUN, "--resume-from-checkpoint", str(other), *extra)
        assert result.exit_code == 1, result.output
        assert "holds a run of its own" in result.output or "other settings" in result.output
        assert everything(a) == before


def test_resume_from_another_folders_checkpoint_into_an_empty_folder(setup, tmp_path):
    out = tmp_path / "continued"
    result = train(setup, out, *RUN, "--resume-from-checkpoint",
                   str(setup["root"] / "run" / "checkpoint-2"))
    assert result.exit_code == 0, result.output
    for k, v in final_weights(setup["root"] / "run").items():
        assert torch.equal(final_weights(out)[k], v), k


@pytest.mark.parametrize("name", [".kto-train.lock", "config.json", "metrics.jsonl"])
def test_a_link_planted_in_the_output_is_refused_and_its_target_intact(setup, tmp_path, name):
    out, victim = planted_output(tmp_path, name)
    result = train(setup, out, "--max-steps", "2")
    assert_clean_error(result, "symbolic link", name)
    assert victim.read_text() == PRECIOUS


def test_a_link_planted_at_a_checkpoint_name_is_refused(setup, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(setup["root"] / "run" / "checkpoint-6", elsewhere)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-9").symlink_to(elsewhere)
    result = train(setup, out, "--max-steps", "10", "--resume-from-checkpoint", "latest")
    assert_clean_error(result, "symbolic link", "checkpoint-9")


def test_an_output_that_is_a_file_is_one_line(setup, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    assert_clean_error(train(setup, path, "--max-steps", "1"), "is a file")


@pytest.mark.parametrize("option", ["--beta", "--learning-rate", "--max-grad-norm",
                                    "--warmup-ratio", "--desirable-weight"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_float_options_are_refused_before_any_work(setup, tmp_path, option, value):
    out = tmp_path / "out"
    result = train(setup, out, option, value)
    assert_clean_error(result, option, "finite")
    assert not out.exists()


def test_a_policy_with_a_smaller_embedding_than_the_cache_is_refused(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["policy"])
    model.resize_token_embeddings(64)
    small = tmp_path / "small"
    model.save_pretrained(small)
    for name in os.listdir(setup["policy"]):
        if name.startswith(("tokenizer", "special", "chat_template")):
            shutil.copy(setup["policy"] / name, small / name)
    result = CliRunner().invoke(main, ["--model", str(small), "--cache", str(setup["cache"]),
                                       "--output", str(tmp_path / "out"), "--max-steps", "1"])
    assert_clean_error(result, "embedding has 64 rows")


def test_an_eval_cache_of_another_reference_is_refused(setup, tiny_dir, tmp_path):
    other_reference = make_policy(tmp_path, seed=7)
    other = build_polite_cache(other_reference, tmp_path, range(30, 38), "eval-other")
    result = train(setup, tmp_path / "out", "--max-steps", "1", "--eval-cache", str(other))
    assert_clean_error(result, "--eval-cache was built differently", "reference model weights")


def damage(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))


def edit_state(checkpoint: Path, edit) -> None:
    state = json.loads((checkpoint / STATE).read_text())
    edit(state)
    (checkpoint / STATE).write_text(json.dumps(state))


def test_a_refused_resume_changes_nothing_in_the_folder(setup, tmp_path):
    """The later checkpoints (good) were removed, and train_config.json rewritten, before
    the named earlier checkpoint was found damaged."""
    out = copy_run(setup, tmp_path)
    damage(out / "checkpoint-2" / "model.safetensors")
    before = everything(out)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", str(out / "checkpoint-2"))
    assert_clean_error(result, "does not match its recorded checksums")
    assert everything(out) == before


def test_overwrite_with_a_damaged_foreign_checkpoint_changes_nothing(setup, tmp_path):
    other = copy_run(setup, tmp_path, "other")
    damage(other / "checkpoint-2" / "model.safetensors")
    out = copy_run(setup, tmp_path)
    before = everything(out)
    result = train(setup, out, *RUN, "--overwrite-output-dir", "--resume-from-checkpoint",
                   str(other / "checkpoint-2"))
    assert_clean_error(result, "does not match its recorded checksums")
    assert everything(out) == before


@pytest.mark.parametrize("name", [".checkpoint-6.partial", "ck6"])
def test_a_folder_of_the_output_not_named_checkpoint_n_is_refused(setup, tmp_path, name):
    out = copy_run(setup, tmp_path)
    (out / "checkpoint-6").rename(out / name)
    before = everything(out)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", str(out / name))
    assert_clean_error(result, "not a checkpoint-N folder")
    assert everything(out) == before


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s["scheduler"].update(last_epoch=10**30), "scheduler state"),
    (lambda s: s["scheduler"].update(base_lrs=[1000.0, 1000.0]), "scheduler state"),
    (lambda s: s["scheduler"].update(optimizer="x"), "other fields"),
    (lambda s: s.update(global_step=10**30), "is 1000000000000000000000000000000, but"),
    (lambda s: s.update(files=[]), "field 'files'"),
])
def test_an_edited_trainer_state_is_refused(setup, tmp_path, edit, fragment):
    """trainer_state.json holds the checksums, so its own values are checked against what
    this run's state after that step must be."""
    out = copy_run(setup, tmp_path)
    edit_state(out / "checkpoint-6", edit)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert_clean_error(result, fragment)


def test_a_step_past_the_runs_end_is_refused(setup, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(setup["root"] / "run" / "checkpoint-6", out / "checkpoint-99")
    edit_state(out / "checkpoint-99", lambda s: s.update(global_step=99))
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert_clean_error(result, "past this run's last step (6)")


def test_a_deeply_nested_trainer_state_is_one_line(setup, tmp_path):
    out = copy_run(setup, tmp_path)
    (out / "checkpoint-6" / STATE).write_text("[" * 100_000 + "]" * 100_000)
    result = train(setup, out, *RUN, "--resume-from-checkpoint", "latest")
    assert_clean_error(result, "nested too deeply", "earlier checkpoint")


def test_a_hard_link_at_the_lock_name_is_refused(setup, tmp_path):
    out, victim = planted_output(tmp_path, ".kto-train.lock", hard=True)
    assert_clean_error(train(setup, out, "--max-steps", "1"), "hard links")
    assert victim.read_text() == PRECIOUS
