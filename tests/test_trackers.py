"""--report-to tensorboard / wandb write what TRL's KTOTrainer writes: the same tag names
for the metrics both compute (checked against a real TRL run with both trackers), the
values of metrics.jsonl, and TensorBoard files where transformers puts them. wandb runs
offline (WANDB_MODE=offline): its run file is read back record by record."""

from __future__ import annotations

import glob
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import build_polite_cache, make_policy, read_metrics, run_training

from train.trackers import tracker_values

pytest.importorskip("tensorboard")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trl_kto import cache_dataset, pretokenized_trainer  # noqa: E402

# metrics both kto-train and TRL's KTOTrainer log, under the names TRL's trackers show
SHARED = {f"{mode}/{m}" for mode in ("train", "eval") for m in (
    "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
    "logps/rejected")} | {"train/epoch", "train/grad_norm", "train/learning_rate"}
# kto-train's own (kto-spec's count/*, throughput); TRL logs logits/*, entropy, num_tokens
OURS_ONLY = {"train/count/chosen", "train/count/rejected", "eval/count/chosen",
             "eval/count/rejected", "train/tokens_per_second"}
RUN = {"max_steps": 4, "logging_steps": 1, "eval_steps": 2}


@pytest.fixture(scope="module")
def caches(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return {"root": root, "policy": make_policy(root, seed=1),
            "train": build_polite_cache(tiny_dir, root, range(0, 12), "train-cache"),
            "eval": build_polite_cache(tiny_dir, root, range(100, 104), "eval-cache")}


@pytest.fixture(scope="module")
def trl_run(caches, tokenizer):
    """TRL's KTOTrainer with report_to tensorboard and wandb (offline) on the same rows."""
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig

    out = caches["root"] / "trl"
    with pytest.MonkeyPatch.context() as mp:
        _offline_wandb(mp, out)
        config = KTOConfig(output_dir=str(out), per_device_train_batch_size=4,
                           per_device_eval_batch_size=4, eval_strategy="steps",
                           precompute_ref_log_probs=True, train_sampling_strategy="sequential",
                           report_to=["tensorboard", "wandb"], disable_tqdm=True,
                           use_cpu=True, bf16=False, save_strategy="no", **RUN)
        policy = AutoModelForCausalLM.from_pretrained(caches["policy"], dtype=torch.float32)
        trainer = pretokenized_trainer()(
            model=policy, args=config, train_dataset=cache_dataset(caches["train"]),
            eval_dataset=cache_dataset(caches["eval"]), processing_class=tokenizer)
        trainer.train()
        import wandb

        wandb.finish()  # flush and close TRL's run file before the tests read it (a race)
    return out


def _offline_wandb(mp: pytest.MonkeyPatch, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(directory),
                       "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        mp.setenv(key, value)


def tensorboard_scalars(runs: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in glob.glob(str(runs / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def wandb_history(directory: Path) -> list[dict[str, float]]:
    """The history records of the one offline run under ``directory``. The run file is
    LevelDB's log format (32 KiB blocks of CRC, length, type, data) after a 7-byte
    header; each record is a wandb ``Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(str(directory / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw, pos, pending, history = Path(path).read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        pending = (b"" if kind in (1, 2) else pending) + raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.history.item})
    return history


def test_tracker_names_are_transformers_rewrite_logs():
    from transformers.integrations.integration_utils import rewrite_logs

    record = {"step": 3, "epoch": 0.5, "loss": 0.4, "rewards/chosen": 1.0,
              "rewards/rejected": math.nan, "learning_rate": 1e-3}
    evaluation = {"step": 3, "epoch": 0.5, "eval_loss": 0.3, "eval_rewards/margins": 2.0}
    expected = rewrite_logs({k: v for k, v in record.items()
                             if k != "step" and not (isinstance(v, float) and math.isnan(v))})
    assert tracker_values(record, "tensorboard") == expected
    assert tracker_values(evaluation, "tensorboard") == rewrite_logs(
        {"epoch": 0.5, "eval_loss": 0.3, "eval_rewards/margins": 2.0})
    assert tracker_values(record, "wandb") == {**expected, "train/global_step": 3}


def test_tensorboard_tags_and_values_match_trl(caches, trl_run):
    out = caches["root"] / "ours-tb"
    run_training(caches["policy"], caches["train"], out, eval_cache=str(caches["eval"]),
                 report_to="tensorboard", **RUN)
    [ours_dir] = (out / "runs").iterdir()  # OUTPUT/runs/<date>_<host>, as transformers
    [trl_dir] = (trl_run / "runs").iterdir()
    ours, theirs = tensorboard_scalars(ours_dir), tensorboard_scalars(trl_dir)
    assert set(ours) & set(theirs) == SHARED
    assert set(ours) - set(theirs) == OURS_ONLY
    for record in read_metrics(out):
        for tag, value in tracker_values(record, "tensorboard").items():
            assert ours[tag][record["step"]] == pytest.approx(value, rel=1e-6), tag
    assert sorted(ours["eval/loss"]) == [0, 2, 4] and sorted(ours["train/loss"]) == [1, 2, 3, 4]


def test_wandb_offline_logs_trls_names(caches, trl_run, monkeypatch):
    pytest.importorskip("wandb")
    out = caches["root"] / "ours-wandb"
    _offline_wandb(monkeypatch, out)  # (wandb reads its settings once per process)
    proc = subprocess.run(
        [sys.executable, "-m", "train.cli", "--model", str(caches["policy"]), "--cache",
         str(caches["train"]), "--eval-cache", str(caches["eval"]), "--output", str(out),
         "--learning-rate", "1e-3", "--report-to", "wandb",
         *[a for k, v in RUN.items() for a in (f"--{k.replace('_', '-')}", str(v))]],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = wandb_history(out), wandb_history(trl_run)
    names = {k for h in ours for k in h if not k.startswith("_")}
    trl_names = {k for h in theirs for k in h if not k.startswith("_")}
    assert names & trl_names == SHARED | {"train/global_step"}
    assert names - trl_names == OURS_ONLY
    logged = {(h["train/global_step"], k): v for h in ours for k, v in h.items()}
    for record in read_metrics(out):
        for tag, value in tracker_values(record, "wandb").items():
            assert logged[(record["step"], tag)] == pytest.approx(value, rel=1e-9), tag


def test_a_refused_run_writes_no_tracker_files(caches):
    """Trackers start only once the run may use --output: a second run refused by the
    folder check leaves the first run's folder as it was."""
    from click.testing import CliRunner

    from train.cli import main

    out = caches["root"] / "refused"
    args = ["--model", str(caches["policy"]), "--cache", str(caches["train"]), "--output",
            str(out), "--learning-rate", "1e-3", "--per-device-train-batch-size", "4"]
    assert CliRunner().invoke(main, [*args, "--max-steps", "1"]).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    refused = CliRunner().invoke(main, [*args, "--max-steps", "2", "--report-to", "tensorboard"])
    assert refused.exit_code == 1 and "--overwrite-output-dir" in refused.output
    assert sorted(p.name for p in out.iterdir()) == before and not (out / "runs").exists()
