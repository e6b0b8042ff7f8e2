"""kto-train on the tiny local models: cached reference == live reference, resume
after kill -9 == uninterrupted, refusals, non-finite loss, metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_trajectories_close, assert_weights_close
from train_helpers import (
    build_polite_cache,
    final_weights,
    launch_two_processes,
    make_policy,
    read_metrics,
    run_training,
)

from shared.logprobs import sequence_logps
from train.cli import main
from train.trainer import NonFiniteLossError

TESTS = Path(__file__).parent
TRAJECTORY = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen",
              "logps/rejected")


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cache = build_polite_cache(tiny_dir, root, range(0, 24), "train-cache")
    return {"root": root, "cache": cache, "policy": make_policy(root, seed=1)}


def test_cached_reference_equals_live_reference(setup, tiny_dir):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def live(batch):
        def logps(seqs):
            logits = ref_model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                               position_ids=seqs["position_ids"]).logits  # all positions
            return sequence_logps(logits, seqs["input_ids"], seqs["score_mask"].long()).double()
        return logps(batch["target"]), logps(batch["kl"])

    root = setup["root"]
    cached_m, cached_w = run_training(setup["policy"], setup["cache"], root / "cached")
    live_m, live_w = run_training(setup["policy"], setup["cache"], root / "live", reference=live)
    assert len(cached_m) == 4
    assert_trajectories_close(cached_m, live_m, TRAJECTORY)
    assert abs(cached_m[0]["rewards/chosen"]) > 1e-2  # the policy differs from the reference
    assert_weights_close(cached_w, live_w)


def test_fused_adamw_equals_per_parameter_adamw(setup):
    """--optim adamw_torch_fused (the default, faster) takes the same steps as the loop."""
    root = setup["root"]
    fused_m, fused_w = run_training(setup["policy"], setup["cache"], root / "fused")
    loop_m, loop_w = run_training(setup["policy"], setup["cache"], root / "loop",
                                  optim="adamw_torch")
    assert_trajectories_close(fused_m, loop_m, (*TRAJECTORY, "grad_norm"))
    assert_weights_close(fused_w, loop_w)
    first = final_weights(setup["policy"])
    assert max(float((fused_w[k] - first[k]).abs().max()) for k in first) > 1e-3  # it moved


def test_optim_flag_chooses_the_adamw_kernel(setup):
    """The test above passes even if --optim were ignored; this one does not."""
    from transformers import AutoModelForCausalLM

    from train.config import TrainConfig
    from train.setup import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(setup["policy"])
    for optim, fused in (("adamw_torch_fused", True), ("adamw_torch", False)):
        config = TrainConfig(model="m", cache="c", output="o", optim=optim)
        assert build_optimizer(model, config).defaults["fused"] is fused


def test_eval_steps_without_eval_cache_is_refused():
    """transformers' Trainer refuses evaluation steps without an eval set; silently
    training without evaluation would hide the user's mistake."""
    from shared.errors import ConfigError
    from train.config import TrainConfig

    with pytest.raises(ConfigError, match="--eval-steps 5 needs --eval-cache"):
        TrainConfig(model="m", cache="c", output="o", eval_steps=5)
    TrainConfig(model="m", cache="c", output="o", eval_steps=5, eval_cache="e")  # accepted


def test_resume_after_kill_equals_uninterrupted(setup):
    root = setup["root"]
    args = ["--model", str(setup["policy"]), "--cache", str(setup["cache"]),
            "--learning-rate", "1e-3", "--per-device-train-batch-size", "4",
            "--logging-steps", "1", "--max-steps", "6", "--save-steps", "3"]
    clean = root / "uninterrupted"
    assert CliRunner().invoke(main, [*args, "--output", str(clean)]).exit_code == 0
    crashed = root / "crashed"
    tmpdir = root / "TMPDIR"
    tmpdir.mkdir()
    proc = subprocess.run([sys.executable, str(TESTS / "train_crash_driver.py"), "4", *args,
                           "--output", str(crashed)], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmpdir)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not list(tmpdir.iterdir())  # the cache's copy went when setup was done
    assert (crashed / "checkpoint-3").is_dir() and not (crashed / "model.safetensors").exists()
    result = CliRunner().invoke(main, [*args, "--output", str(crashed),
                                       "--resume-from-checkpoint", "latest"])
    assert result.exit_code == 0, result.output
    assert_weights_close(final_weights(crashed), final_weights(clean))
    resumed, uninterrupted = read_metrics(crashed), read_metrics(clean)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert_trajectories_close(resumed, uninterrupted, (*TRAJECTORY, "learning_rate"))


def test_damaged_shard_is_refused_by_name(setup, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    shard = sorted(cache.glob("shard-*.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = CliRunner().invoke(main, ["--model", str(setup["policy"]), "--cache", str(cache),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"shard {shard.name} is damaged" in result.output


def test_tokenizer_mismatch_is_refused(setup, tmp_path):
    other = tmp_path / "other-policy"
    shutil.copytree(setup["policy"], other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    result = CliRunner().invoke(main, ["--model", str(other), "--cache", str(setup["cache"]),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "was tokenized with another tokenizer" in result.output


def test_non_finite_loss_stops_and_names_rows(setup, tmp_path):
    def broken(batch):
        return torch.full_like(batch["ref_logps"], float("nan")), batch["ref_kl_logps"]

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 \(rows of this "
                                                 r"process: \['\d+-u-[0-9a-f]{12}'"):
        run_training(setup["policy"], setup["cache"], tmp_path / "out", reference=broken)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_metrics_records_and_eval_prefix(setup, tiny_dir, tmp_path):
    eval_cache = build_polite_cache(tiny_dir, tmp_path, range(100, 104), "eval-cache")
    metrics, _ = run_training(setup["policy"], setup["cache"], tmp_path / "out",
                              eval_cache=str(eval_cache), eval_steps=2)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and [m["step"] for m in evals] == [0, 2, 4]
    expected = {"step", "epoch", "loss", "kl", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "logps/chosen", "logps/rejected", "count/chosen",
                "count/rejected", "learning_rate", "grad_norm", "tokens_per_second"}
    assert set(train[0]) == expected
    assert evals[0]["eval_count/chosen"] + evals[0]["eval_count/rejected"] == 8
    assert np.isclose(train[0]["rewards/margins"],
                      train[0]["rewards/chosen"] - train[0]["rewards/rejected"])
    assert (tmp_path / "out" / "train_config.json").is_file()


def test_two_processes_equal_one_with_the_same_global_batch(setup):
    common = ["--model", str(setup["policy"]), "--cache", str(setup["cache"]),
              "--learning-rate", "1e-3", "--logging-steps", "1", "--max-steps", "4"]
    root = setup["root"]
    one = CliRunner().invoke(main, [*common, "--per-device-train-batch-size", "4",
                                    "--output", str(root / "one-process")])
    assert one.exit_code == 0, one.output
    proc = launch_two_processes([*common, "--per-device-train-batch-size", "2"],
                                root / "two-processes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, single = read_metrics(root / "two-processes"), read_metrics(root / "one-process")
    assert [m["epoch"] for m in two] == [m["epoch"] for m in single]  # same global batch
    assert_trajectories_close(two, single, (*TRAJECTORY, "count/chosen", "grad_norm"))
    assert_weights_close(final_weights(root / "two-processes"),
                         final_weights(root / "one-process"))


@pytest.mark.parametrize("n_d,n_u,w_d,w_u,expect", [
    (150, 150, 1.0, 1.0, None),
    (100, 300, 1.0, 1.0, "set --desirable-weight between 3.000 and 4.000"),
    (300, 100, 1.0, 1.0, "set --desirable-weight between 0.333 and 0.444"),
    (100, 300, 3.5, 1.0, None),
])
def test_class_balance_warning_names_the_weight(n_d, n_u, w_d, w_u, expect):
    from train.config import TrainConfig
    from train.setup import class_balance_warning

    config = TrainConfig(model="m", cache="c", output="o", desirable_weight=w_d,
                         undesirable_weight=w_u)
    msg = class_balance_warning({"desirable": n_d, "undesirable": n_u}, config)
    assert msg is None if expect is None else expect in msg


def test_lora_trains_adapters_and_merges(setup, tmp_path):
    pytest.importorskip("peft")
    metrics, merged = run_training(setup["policy"], setup["cache"], tmp_path / "lora",
                                   lora_r=4, merge_lora=True, max_steps=3)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    base = final_weights(setup["policy"])
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # only LoRA-targeted layers moved
    assert metrics[-1]["rewards/chosen"] != metrics[0]["rewards/chosen"]


def test_yaml_config_with_flags_winning(setup, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {setup['policy']}\ncache: {setup['cache']}\nbeta: 0.3\n"
                      "max-steps: 2\nper_device_train_batch_size: 4\n")
    result = CliRunner().invoke(main, ["--config", str(config), "--output",
                                       str(tmp_path / "out"), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    import json

    resolved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert (resolved["beta"], resolved["max_steps"]) == (0.3, 1)
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1]


def test_accumulation_invariant_without_kl_term(setup, tmp_path):
    """apo_zero_unpaired has no batch-level z, so batch 4 x accumulation 1 must equal
    batch 2 x accumulation 2 (with kto, z is per micro-batch as in TRL, so it differs)."""
    common = {"loss_type": "apo_zero_unpaired", "max_steps": 3}
    a_m, a_w = run_training(setup["policy"], setup["cache"], tmp_path / "a",
                            per_device_train_batch_size=4, **common)
    b_m, b_w = run_training(setup["policy"], setup["cache"], tmp_path / "b",
                            per_device_train_batch_size=2, gradient_accumulation_steps=2,
                            **common)
    assert_trajectories_close(a_m, b_m, ("loss", "rewards/chosen", "logps/rejected"))
    assert_weights_close(a_w, b_w)


def test_gradient_checkpointing_is_on_by_default_and_takes_effect(setup):
    """TRL's default; the test below would pass if the flag were ignored."""
    from train.config import TrainConfig
    from train.setup import load_policy

    on = load_policy(TrainConfig(model=str(setup["policy"]), cache="c", output="o"))
    off = load_policy(TrainConfig(model=str(setup["policy"]), cache="c", output="o",
                                  gradient_checkpointing=False))
    assert on.is_gradient_checkpointing and not off.is_gradient_checkpointing


def test_gradient_checkpointing_changes_nothing(setup, tmp_path):
    a_m, a_w = run_training(setup["policy"], setup["cache"], tmp_path / "a", max_steps=2,
                            gradient_checkpointing=False)
    b_m, b_w = run_training(setup["policy"], setup["cache"], tmp_path / "b", max_steps=2,
                            gradient_checkpointing=True)
    assert_trajectories_close(a_m, b_m, TRAJECTORY)
    assert_weights_close(a_w, b_w)


def test_bf16_autocast_runs_and_saves_float32(setup, tmp_path):
    out = tmp_path / "bf16"
    proc = subprocess.run(  # own process: accelerate's precision is fixed per process
        [sys.executable, "-m", "train.cli", "--model", str(setup["policy"]), "--cache",
         str(setup["cache"]), "--output", str(out), "--bf16", "--max-steps", "2",
         "--learning-rate", "1e-3", "--logging-steps", "1"],
        capture_output=True, text=True, cwd=TESTS.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    # stdout is the JSON summary alone (deepspeed, installed for the tests, logs to stdout
    # when transformers imports it during the save: kto-train sends that to stderr)
    assert json.loads(proc.stdout)["steps_run"] == 2
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    assert all(w.dtype == torch.float32 for w in final_weights(out).values())


def test_save_total_limit_keeps_the_newest_checkpoints(setup, tmp_path):
    run_training(setup["policy"], setup["cache"], tmp_path / "out", max_steps=4, save_steps=1,
                 save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-4"]


def test_eval_only_scores_a_trained_policy_without_training(setup, tiny_dir, tmp_path):
    eval_cache = build_polite_cache(tiny_dir, tmp_path, range(100, 104), "eval-cache")
    args = ["--cache", str(setup["cache"]), "--eval-cache", str(eval_cache), "--eval-only"]
    base = CliRunner().invoke(main, ["--model", str(tiny_dir), "--output",
                                     str(tmp_path / "base"), *args])
    assert base.exit_code == 0, base.output
    [record] = read_metrics(tmp_path / "base")
    assert record["step"] == 0 and abs(record["eval_rewards/margins"]) < 1e-3
    assert not (tmp_path / "base" / "model.safetensors").exists()


SHARDED = {  # accelerate launch flags: FSDP2 and DeepSpeed ZeRO-3, as the pipelines' configs
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
              "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
              "--fsdp_reshard_after_forward", "true"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false",
              "--zero3_save_16bit_model", "true", "--gradient_clipping", "1.0",
              "--offload_optimizer_device", "none", "--offload_param_device", "none"],
}


def sharded_launch(kind: str, args: list[str]) -> subprocess.CompletedProcess:
    """2 CPU processes (gloo) under accelerate's FSDP2 or DeepSpeed ZeRO-3, through
    tests/sharded_driver.py (see its docstring)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         *SHARDED[kind], str(TESTS / "sharded_driver.py"), *args],
        capture_output=True, text=True, cwd=TESTS.parent, timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("kind", ["fsdp2", "zero3"])
def test_sharded_two_processes_equal_one_and_resume(setup, kind):
    """Parameters, gradients and optimizer state sharded over 2 processes (TRL's
    precompute crashes under FSDP2, trl#6470; kto-train has no reference to shard): the
    chunked head inside the sharded root's forward, checkpoints, the gathered final save.
    """
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    common = ["--model", str(setup["policy"]), "--cache", str(setup["cache"]),
              "--learning-rate", "1e-3", "--logging-steps", "1", "--max-steps", "4"]
    root = setup["root"]
    single_dir = root / "sharded-one"
    if not (single_dir / "model.safetensors").is_file():
        one = CliRunner().invoke(main, [*common, "--per-device-train-batch-size", "4",
                                        "--output", str(single_dir)])
        assert one.exit_code == 0, one.output
    two = sharded_launch(kind, [*common, "--per-device-train-batch-size", "2",
                                "--save-steps", "2", "--output", str(root / f"{kind}-two")])
    assert two.returncode == 0, two.stderr[-3000:]
    single, sharded = read_metrics(single_dir), read_metrics(root / f"{kind}-two")
    assert_trajectories_close(sharded, single, (*TRAJECTORY, "count/chosen", "grad_norm"))
    assert_weights_close(final_weights(root / f"{kind}-two"), final_weights(single_dir))
    resumed = root / f"{kind}-resumed"
    shutil.copytree(root / f"{kind}-two" / "checkpoint-2", resumed / "checkpoint-2")
    again = sharded_launch(kind, [*common, "--per-device-train-batch-size", "2", "--output",
                                  str(resumed), "--resume-from-checkpoint", "latest"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_weights_close(final_weights(resumed), final_weights(root / f"{kind}-two"))


def test_zero3_gradient_accumulation_equals_one_process(setup):
    """DeepSpeed steps only at the end of an accumulation (accelerate's `accumulate`
    tells it where): 2 processes x 1 row x 2 micro-batches equal 1 process x 4 rows.
    apo_zero_unpaired: without a batch-level z the split of a step does not matter."""
    pytest.importorskip("deepspeed")
    common = ["--model", str(setup["policy"]), "--cache", str(setup["cache"]),
              "--learning-rate", "1e-3", "--logging-steps", "1", "--max-steps", "3",
              "--loss-type", "apo_zero_unpaired"]
    root = setup["root"]
    one = CliRunner().invoke(main, [*common, "--per-device-train-batch-size", "4",
                                    "--output", str(root / "ga-one")])
    assert one.exit_code == 0, one.output
    two = sharded_launch("zero3", [*common, "--per-device-train-batch-size", "1",
                                   "--gradient-accumulation-steps", "2",
                                   "--output", str(root / "ga-zero3")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert_trajectories_close(read_metrics(root / "ga-zero3"), read_metrics(root / "ga-one"),
                              ("loss", "rewards/chosen", "logps/rejected", "learning_rate"))
    assert_weights_close(final_weights(root / "ga-zero3"), final_weights(root / "ga-one"))
