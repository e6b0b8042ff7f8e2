"""Checkpoints: OUTPUT/checkpoint-STEP/ holds accelerate's state (model, optimizer,
scheduler, every process's RNG) and trainer_state.json with the step, from which
the data position follows (the epoch order is a function of seed and epoch)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*")
             if (m := _CKPT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


class Checkpointer:
    def __init__(self, accelerator, out: Path, total_limit: int):
        self.acc, self.out, self.total_limit = accelerator, out, total_limit

    def save(self, step: int, epoch: float) -> Path:
        path = self.out / f"checkpoint-{step}"
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            # written last: a checkpoint without it is incomplete and never resumed from
            (path / "trainer_state.json").write_text(json.dumps(
                {"global_step": step, "epoch": epoch}, indent=2) + "\n")
            self._prune()
        self.acc.wait_for_everyone()
        return path

    def _prune(self) -> None:
        if self.total_limit > 0:
            for old in list_checkpoints(self.out)[:-self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self, spec: str | None) -> int:
        """Load ``latest`` or a path; returns the step to continue from (0 if none)."""
        if not spec:
            return 0
        if spec == "latest":
            found = list_checkpoints(self.out)
            if not found:
                log.info("no checkpoint in %s: starting from step 0", self.out)
                return 0
            path = found[-1]
        else:
            path = Path(spec)
            if not (path / "trainer_state.json").is_file():
                raise ConfigError(f"--resume-from-checkpoint {spec}: not a complete checkpoint "
                                  "(no trainer_state.json)")
        self.acc.load_state(str(path))
        step = json.loads((path / "trainer_state.json").read_text())["global_step"]
        log.info("resumed from %s at step %d", path, step)
        return step
