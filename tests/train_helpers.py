"""Helpers for training tests: tiny policies, caches and in-process runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import build_cache
from tiny import save_tiny, write_jsonl

from train.config import TrainConfig
from train.trainer import Trainer, cached_reference


def polite_data(path: Path, prompts: range) -> Path:
    """An unambiguous desirable behaviour: a polite reply is desirable, a rude one not."""
    records = []
    for i in prompts:
        prompt = f"Customer {i} asks about order {i * 7 % 100}."
        records.append({"prompt": prompt, "completion": "Thank you, happy to help!",
                        "label": True})
        records.append({"prompt": prompt, "completion": "Go away, not my problem.",
                        "label": False})
    return write_jsonl(path, records)


def make_policy(root: Path, seed: int) -> Path:
    return save_tiny(root / f"policy-seed{seed}", seed=seed)


def run_training(model: Path, cache: Path, output: Path, reference=None, **overrides):
    config = TrainConfig(model=str(model), cache=str(cache), output=str(output),
                         **{"learning_rate": 1e-3, "per_device_train_batch_size": 4,
                            "logging_steps": 1, "max_steps": 4, **overrides})
    trainer = Trainer(config, reference or cached_reference)
    trainer.setup()
    try:
        trainer.train()
        trainer.save()
    finally:
        trainer.cleanup()
    return read_metrics(output), final_weights(output)


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output / "model.safetensors"))


def build_polite_cache(reference: Path, root: Path, prompts: range, name: str) -> Path:
    data = polite_data(root / f"{name}.jsonl", prompts)
    build_cache(reference, [data], root / name, shard_size=64)
    return root / name


def launch_two_processes(options: list[str], output: Path) -> subprocess.CompletedProcess:
    """kto-train in two CPU processes (gloo DDP). accelerate 1.15: `--cpu --num_processes 2`
    starts ONE process unless given an MPI hostfile; its torchrun path (--multi_gpu) with
    kto-train's cpu=True gives gloo DDP."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "train.cli", *options, "--output", str(output)],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
