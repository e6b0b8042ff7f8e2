"""--report-to tensorboard | wandb, through accelerate's trackers, under the names TRL users
see. TRL's KTOTrainer logs `loss`, `kl`, `rewards/chosen`, ... and `eval_loss`,
`eval_rewards/chosen`, ...; transformers' TensorBoardCallback and WandbCallback rewrite them
(`rewrite_logs`): `eval_x` becomes `eval/x` and every other key `train/x`. TensorBoard
event files go to OUTPUT/runs/<date>_<host>/ (transformers' default logging_dir;
TENSORBOARD_LOGGING_DIR wins, as there); wandb logs `train/global_step` with every record
and plots all metrics against it, to the project WANDB_PROJECT (default "huggingface", as
transformers)."""

from __future__ import annotations

import math
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

# TRL/transformers names of scalars that are not metrics of a logging window
_NOT_LOGGED = ("step",)


def tracker_values(record: dict[str, Any], report_to: str) -> dict[str, float]:
    """A metrics.jsonl record under transformers' tracker names (its ``rewrite_logs``).
    ``step`` is the x axis, not a value. A metric of a class with no row in the window
    (NaN: rewards/rejected, margins, ...) is left out, as TRL leaves it out."""
    out = {}
    for key, value in record.items():
        if key in _NOT_LOGGED or value is None or (isinstance(value, float)
                                                   and not math.isfinite(value)):
            continue
        name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
        out[name] = value
    if report_to == "wandb":  # as WandbCallback.on_log
        out["train/global_step"] = record["step"]
    return out


def tensorboard_dir() -> str:
    """transformers' default logging_dir below the output: runs/<Mon DD_HH-MM-SS>_<host>
    (an absolute TENSORBOARD_LOGGING_DIR replaces it; accelerate joins it to OUTPUT)."""
    override = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if override:
        return str(Path(override).expanduser().resolve())
    return os.path.join("runs", datetime.now().strftime("%b%d_%H-%M-%S") + "_"
                        + socket.gethostname())


def start_trackers(accelerator, config, out: Path) -> None:
    """Start the chosen tracker with the resolved configuration as its hyperparameters."""
    if config.report_to == "none":
        return
    hparams = {k: v for k, v in config.to_dict().items()
               if isinstance(v, int | float | str | bool)
               and not (isinstance(v, float) and not math.isfinite(v))}
    if config.report_to == "tensorboard":
        accelerator.init_trackers(tensorboard_dir(), config=hparams)
        return
    accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "huggingface"), config=hparams,
                              init_kwargs={"wandb": {"name": out.name}})
    if accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.define_metric("train/global_step")
        run.define_metric("*", step_metric="train/global_step", step_sync=True)
