"""Checkpoints: OUTPUT/checkpoint-STEP/ holds accelerate's state (model, optimizer,
scheduler, every process's RNG) and trainer_state.json with the step, from which
the data position follows (the epoch order is a function of seed and epoch), and the
run's settings, so that a resume with other settings can be refused.

A checkpoint is written under a hidden temporary name and renamed into place when
complete: a kill at any moment leaves either the whole checkpoint or none."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from shared.cache import write_json
from shared.errors import ConfigError, KtoError, StorageError, writing
from shared.manifest import load_json_object

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Every checkpoint-N folder, complete or not, by step."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*")
             if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (with trainer_state.json), by step."""
    return [p for p in checkpoint_dirs(out) if (p / STATE).is_file()]


def read_trainer_state(path: Path) -> dict[str, Any]:
    if not (path / STATE).is_file():
        raise ConfigError(f"--resume-from-checkpoint {path}: not a complete checkpoint "
                          f"(no {STATE})")
    try:
        state = load_json_object(path / STATE, STATE)
    except KtoError as err:
        raise ConfigError(f"{err}; resume from another checkpoint") from None
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{path / STATE}: field 'global_step' is {step!r}: expected a "
                          "step number; resume from another checkpoint")
    return state


class Checkpointer:
    def __init__(self, accelerator, out: Path, total_limit: int, run: dict[str, Any]):
        self.acc, self.out, self.total_limit, self.run = accelerator, out, total_limit, run

    def save(self, step: int, epoch: float) -> Path:
        final = self.out / f"checkpoint-{step}"
        if (final / STATE).is_file():  # this run already saved this step (after a resume)
            return final
        partial = self.out / f".checkpoint-{step}.partial"
        try:
            with writing(final):
                self._write(partial, final, step, epoch)
        except StorageError:
            shutil.rmtree(partial, ignore_errors=True)  # free what the failed write took
            raise
        self.acc.wait_for_everyone()
        return final

    def _write(self, partial: Path, final: Path, step: int, epoch: float) -> None:
        if self.acc.is_main_process and partial.exists():
            shutil.rmtree(partial)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(partial))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            write_json(partial / STATE, {"global_step": step, "epoch": epoch, "run": self.run})
            if final.exists():  # an incomplete one from before
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()

    def _prune(self) -> None:
        if self.total_limit > 0:
            for old in list_checkpoints(self.out)[:-self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> int:
        """Load a checkpoint chosen by run_folder.plan_run; returns its step."""
        step = read_trainer_state(path)["global_step"]
        try:
            self.acc.load_state(str(path))
        except Exception as err:  # torch, safetensors and pickle each raise their own
            raise ConfigError(f"cannot load the checkpoint {path} ({type(err).__name__}: "
                              f"{str(err)[:200]}): it is damaged or from another setup; resume "
                              "from an earlier one (--resume-from-checkpoint PATH) or start "
                              "over with --overwrite-output-dir") from None
        log.info("resumed from %s at step %d", path, step)
        return step
