"""Checkpoints: OUTPUT/checkpoint-STEP/ holds accelerate's state (model weights as
safetensors, optimizer state and every process's RNG state as tensors) and
trainer_state.json with the step (the data position follows from it: the epoch order is
a function of seed and epoch), the scheduler's state, the run's settings (a resume with
other settings is refused) and the SHA-256 of every other file in the folder.

A checkpoint may come from someone else (a shared folder, a download), so loading one
runs no code it holds: the scheduler state is JSON, every torch.load is weights-only
(DeepSpeed's own loader asks for full unpickling: it is overridden), no file is read
before the folder matches its recorded checksums, and a file the checkpoint does not
list, a link, or a checkpoint without its settings is refused.

A checkpoint is written under a hidden temporary name and renamed into place when
complete: a kill at any moment leaves either the whole checkpoint or none."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shared.cache import write_json
from shared.errors import ConfigError, KtoError, StorageError, writing
from shared.files import LinkError, refuse_link
from shared.fingerprint import sha256_file
from shared.manifest import load_json_object
from train.guard import any_process

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"
FORMAT = 2  # 2: file checksums, JSON scheduler state, no pickled objects
EARLIER = ("resume from an earlier checkpoint (--resume-from-checkpoint PATH) or start "
           "over with --overwrite-output-dir")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Every checkpoint-N entry, complete or not, by step (links included: they are
    refused where they are used, never followed)."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*")
             if (m := _CKPT.match(p.name)) and (p.is_dir() or p.is_symlink())]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (with trainer_state.json), by step."""
    return [p for p in checkpoint_dirs(out) if (p / STATE).is_file()]


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, checked for the fields a resume needs."""
    refuse_link(path, "a checkpoint folder")
    if not (path / STATE).is_file():
        raise ConfigError(f"--resume-from-checkpoint {path}: not a complete checkpoint "
                          f"(no {STATE})")
    try:
        state = load_json_object(path / STATE, STATE, fix=f"{EARLIER}")
    except KtoError as err:
        raise ConfigError(str(err)) from None
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{path / STATE}: field 'global_step' is {step!r}: expected a "
                          f"step number; {EARLIER}")
    named = checkpoint_step(path)
    if named is not None and named != step:
        raise ConfigError(f"{path / STATE}: field 'global_step' is {step}, but the folder is "
                          f"the checkpoint of step {named}: edited or misplaced; {EARLIER}")
    if state.get("format") != FORMAT:
        raise ConfigError(f"--resume-from-checkpoint {path}: {STATE} has no file checksums "
                          f"(format {state.get('format')!r}, this version writes {FORMAT}): "
                          "it was written by an older kto-train or by another tool, and cannot "
                          "be checked (nor can the other checkpoints of that run); start over "
                          "with --overwrite-output-dir, or in another --output")
    files = state.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ConfigError(f"{path / STATE}: field 'files' is not an object of file names and "
                          f"SHA-256 digests; {EARLIER}")
    if not isinstance(state.get("scheduler"), dict):
        raise ConfigError(f"{path / STATE}: field 'scheduler' is missing; {EARLIER}")
    return state


def check_scheduler_state(saved: dict[str, Any], fresh: dict[str, Any], step: int,
                          path: Path) -> None:
    """The saved scheduler state must be the state this run's scheduler has after ``step``
    steps in its shape: the same fields, the same base learning rates (they follow from
    --learning-rate, which the run settings fix) and ``step`` steps taken. Its values are
    not covered by the file checksums (they live in trainer_state.json itself)."""
    wrong = sorted(set(saved) ^ set(fresh))
    if wrong:
        raise ConfigError(f"{path / STATE}: the scheduler state has other fields ({wrong}); "
                          f"{EARLIER}")
    if saved.get("base_lrs") != fresh.get("base_lrs") or saved.get("last_epoch") != step:
        raise ConfigError(f"{path / STATE}: the scheduler state (base learning rates "
                          f"{saved.get('base_lrs')}, {saved.get('last_epoch')} steps) is not "
                          f"this run's after step {step} (base learning rates "
                          f"{fresh.get('base_lrs')}): edited; {EARLIER}")


def folder_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but trainer_state.json, by relative path;
    a link anywhere inside is an error."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            refuse_link(path, "a checkpoint's file")
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel != STATE:
                out[rel] = sha256_file(path)
    return out


def checksum_problems(folder: Path, recorded: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint folder and the checksums it recorded."""
    found = folder_checksums(folder)
    problems = [f"{n}: missing" for n in sorted(set(recorded) - set(found))]
    problems += [f"{n}: not written by kto-train" for n in sorted(set(found) - set(recorded))]
    problems += [f"{n}: SHA-256 differs (damaged or edited)" for n in sorted(found)
                 if n in recorded and recorded[n] != found[n]]
    return problems


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside is weights-only: tensors and plain containers, never
    arbitrary objects (DeepSpeed's checkpoint engine asks for full unpickling)."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            yield
    finally:
        torch.load = original


def _deepspeed_state_classes() -> list[type]:
    """The plain state classes a ZeRO optimizer checkpoint holds (an enum and the loss
    scalers, rebuilt from their attributes by the weights-only unpickler, which calls
    no code of the file's choosing); none when DeepSpeed is not in use."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def refuse_sharded_format(path: Path, files: dict[str, Any]) -> None:
    """torch.distributed.checkpoint (FSDP's SHARDED_STATE_DICT) keeps its index as a
    pickle, which cannot be loaded without running what it holds."""
    if any(n.endswith((".metadata", ".distcp")) for n in files):
        raise ConfigError(f"--resume-from-checkpoint {path} is a sharded (DCP) FSDP checkpoint, "
                          "whose index is a pickle that kto-train does not load; train with "
                          "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config")


class Checkpointer:
    def __init__(self, accelerator, out: Path, total_limit: int, run: dict[str, Any],
                 scheduler: Any):
        self.acc, self.out, self.total_limit, self.run = accelerator, out, total_limit, run
        self.scheduler = scheduler
        self.resumed: Path | None = None  # the checkpoint this run was loaded from

    def save(self, step: int, epoch: float) -> Path:
        final = self.out / f"checkpoint-{step}"
        if self.resumed is not None and final.absolute() == self.resumed.absolute():
            return final  # the checkpoint this run resumed from: already this step's state
        partial = self.out / f".checkpoint-{step}.partial"
        try:
            with writing(final):
                self._write(partial, final, step, epoch)
        except StorageError:
            remove_entry(partial)  # free what the failed write took
            raise
        self.acc.wait_for_everyone()
        return final

    def _write(self, partial: Path, final: Path, step: int, epoch: float) -> None:
        if self.acc.is_main_process:
            remove_entry(partial)
            partial.mkdir()  # a new folder: accelerate never writes through a planted link
        self.acc.wait_for_everyone()
        self.acc.save_state(str(partial))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            write_json(partial / STATE, {
                "format": FORMAT, "global_step": step, "epoch": epoch, "run": self.run,
                "scheduler": self.scheduler.state_dict(), "files": folder_checksums(partial)})
            refuse_link(final, "a checkpoint folder")
            remove_entry(final)  # an incomplete one from before
            os.replace(partial, final)
            self._prune()

    def _prune(self) -> None:
        if self.total_limit > 0:
            for old in list_checkpoints(self.out)[:-self.total_limit]:
                remove_entry(old)

    def load(self, path: Path, total_steps: int) -> int:
        """Load a checkpoint chosen by run_folder.plan_run, once its files match their
        recorded checksums (checked by the main process) and its state is this run's at
        its step; returns the step."""
        state = read_trainer_state(path)
        step = state["global_step"]
        if step > total_steps:
            raise ConfigError(f"{path / STATE}: step {step} is past this run's last step "
                              f"({total_steps}): edited; {EARLIER}")
        check_scheduler_state(state["scheduler"], self.scheduler.state_dict(), step, path)
        problems: list[str] = []
        if self.acc.is_main_process:
            try:
                problems = checksum_problems(path, state["files"])
            except LinkError as err:
                problems = [str(err)]
        if any_process(self.acc.gather, bool(problems), self.acc.device):
            listed = "; ".join(problems[:5]) or "see the main process's log"
            raise ConfigError(f"--resume-from-checkpoint {path} does not match its recorded "
                              f"checksums ({listed}); {EARLIER}")
        refuse_sharded_format(path, state["files"])
        try:
            with weights_only_loads():
                self.acc.load_state(str(path))
            self.scheduler.load_state_dict(state["scheduler"])
        except pickle.UnpicklingError:
            raise ConfigError(f"--resume-from-checkpoint {path} holds Python objects other "
                              "than tensors and plain values, which kto-train never unpickles "
                              f"(loading them could run code); {EARLIER}") from None
        except Exception as err:  # torch, safetensors, accelerate
            raise ConfigError(f"cannot load the checkpoint {path} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}): it is damaged or from "
                              f"another setup; {EARLIER}") from None
        self.resumed = path
        log.info("resumed from %s at step %d", path, step)
        return step


def remove_entry(path: Path) -> None:
    """Remove a folder of ours, or a link in its place (the link only, never its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
