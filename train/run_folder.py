"""One run per output folder. A new run refuses a folder that holds another run's outputs
(checkpoints, metrics, a final model) unless told to continue it
(--resume-from-checkpoint) or to replace it (--overwrite-output-dir, transformers' name):
two runs' checkpoints or metrics are never mixed. Continuing is allowed only when the
settings that decide the result are those the run was started with; otherwise the
differences are listed and nothing in the folder is touched."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.cache import write_json
from shared.errors import ConfigError
from shared.fingerprint import sha256_json
from shared.lock import FolderLock
from shared.manifest import load_json_object
from train.checkpoint import (
    STATE,
    checkpoint_dirs,
    checkpoint_step,
    list_checkpoints,
    read_trainer_state,
    remove_entry,
)
from train.config import TrainConfig
from train.guard import any_process

log = logging.getLogger(__name__)
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
# options that do not change the trained weights (paths of caches are replaced by the
# caches' fingerprints); every other option, present or future, must match to resume
FREE = frozenset({"model", "tokenizer", "cache", "eval_cache", "output", "resume_from_checkpoint",
                  "overwrite_output_dir", "logging_steps", "save_steps", "save_total_limit",
                  "eval_steps", "report_to", "optim", "gradient_checkpointing", "merge_lora"})
_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
            "adapter")
CONTINUE = ("pass --resume-from-checkpoint latest to continue it, --overwrite-output-dir to "
            "replace it, or choose another --output")


def cache_fingerprint(manifest: dict[str, Any] | None) -> str | None:
    """What the rows are: the cache key and every shard's SHA-256 (the path may move)."""
    if manifest is None:
        return None
    return sha256_json([manifest["cache_key"], [[s["name"], s["sha256"]]
                                                for s in manifest["shards"]]])


def run_identity(config: TrainConfig, cache: dict[str, Any], eval_cache: dict[str, Any] | None,
                 num_processes: int) -> dict[str, Any]:
    """The settings that decide a run's result, saved in every checkpoint."""
    out = {k: v for k, v in config.to_dict().items() if k not in FREE}
    out.update(cache=cache_fingerprint(cache), eval_cache=cache_fingerprint(eval_cache),
               num_processes=num_processes)
    return out


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted({*saved, *now})
            if saved.get(k) != now.get(k)]


def earlier_outputs(out: Path) -> list[str]:
    """Names in ``out`` that a run writes (empty for a new or unrelated folder)."""
    found = [n for n in (CONFIG_FILE, METRICS_FILE) if (out / n).exists()]
    found += [p.name for p in checkpoint_dirs(out)]
    found += sorted(p.name for pattern in _WEIGHTS for p in out.glob(pattern))
    return found


@dataclass(frozen=True)
class Plan:
    resume_from: Path | None  # checkpoint to load
    wipe: bool  # remove the folder's earlier run outputs first (--overwrite-output-dir)
    # checkpoints of this run later than the one it resumes from: the run is continued
    # from an earlier point (a later one was damaged), so they are replaced as it goes on
    superseded: tuple[Path, ...] = ()


def plan_run(out: Path, config: TrainConfig, identity: dict[str, Any]) -> Plan:
    """Decide, reading only, how this run uses ``out``; raise ConfigError when it may not."""
    check_separate_folders(out, config)
    spec = config.resume_from_checkpoint
    if config.overwrite_output_dir:
        if spec and _inside(Path(spec), out):
            raise ConfigError(f"--overwrite-output-dir would remove {spec}, the checkpoint "
                              "--resume-from-checkpoint names; pass one of them")
        return Plan(_compatible_checkpoint(Path(spec), identity) if spec else None, wipe=True)
    earlier = earlier_outputs(out)
    if spec:
        found = list_checkpoints(out) if spec == "latest" else [Path(spec)]
        if found:
            path = found[-1]
            if _inside(path, out) and checkpoint_step(path) is None:
                raise ConfigError(f"--resume-from-checkpoint {path}: a folder of --output "
                                  "that is not a checkpoint-N folder of this run (a temporary "
                                  "or renamed one); name one of its checkpoint-N folders, or "
                                  "copy it elsewhere first")
            if not _inside(path, out) and earlier:
                _check_foreign_resume(out, config, path, earlier)
            _compatible_checkpoint(path, identity)
            return Plan(path, wipe=False, superseded=_later_checkpoints(out, path))
        if earlier:  # nothing to resume from: the same run may start over, no other
            _check_saved_config(out, config, earlier, "to resume it")
        log.info("no checkpoint in %s: starting from step 0", out)
        return Plan(None, wipe=False)
    if earlier:
        if list_checkpoints(out):
            raise ConfigError(f"{out} holds the checkpoints of an earlier run "
                              f"({', '.join(earlier)}); {CONTINUE}")
        _check_saved_config(out, config, earlier, "")
        log.info("%s holds outputs of an unfinished run with these settings and no checkpoint: "
                 "starting it over", out)
    return Plan(None, wipe=False)


def _check_foreign_resume(out: Path, config: TrainConfig, path: Path,
                          earlier: list[str]) -> None:
    """A checkpoint of another folder may continue only in a folder without a run of its
    own: none at all, or only the settings and metrics of this same continuation (cut
    short before its first checkpoint)."""
    own = [n for n in earlier if n not in (CONFIG_FILE, METRICS_FILE)]
    if own:
        raise ConfigError(
            f"--output {out} holds a run of its own ({', '.join(earlier)}), and "
            f"--resume-from-checkpoint {path} is a checkpoint of another folder: continuing "
            "it here would mix two runs. Continue it in an empty --output, resume this "
            "folder's own run (--resume-from-checkpoint latest), or pass "
            "--overwrite-output-dir to replace this folder's run")
    _check_saved_config(out, config, earlier, "to continue it")


def _inside(path: Path, out: Path) -> bool:
    """``path`` is an entry of ``out`` itself (not of a folder elsewhere)."""
    return path.absolute().parent.resolve() == out.resolve()


def _later_checkpoints(out: Path, path: Path) -> tuple[Path, ...]:
    step = checkpoint_step(path)
    if step is None or not _inside(path, out):
        return ()
    return tuple(p for p in checkpoint_dirs(out) if checkpoint_step(p) > step)


def check_separate_folders(out: Path, config: TrainConfig) -> None:
    """--output must be a folder of its own: not the policy's (its weights would be
    overwritten), not inside a cache."""
    target = out.resolve()
    if Path(config.model).is_dir() and Path(config.model).resolve() == target:
        raise ConfigError(f"--output {out} is the policy's own folder (--model): the final "
                          "save would overwrite its weights; choose another --output")
    for name in ("cache", "eval_cache"):
        value = getattr(config, name)
        if value and (Path(value).resolve() == target or Path(value).resolve() in target.parents):
            raise ConfigError(f"--output {out} is inside --{name.replace('_', '-')} {value}; "
                              "choose a folder outside the cache")


def _saved_config(out: Path) -> dict[str, Any] | None:
    path = out / CONFIG_FILE
    return load_json_object(path, "train_config.json") if path.is_file() else None


def _config_identity(values: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in values.items() if k not in FREE}
    for name in ("cache", "eval_cache"):
        out[name] = str(Path(values[name]).resolve()) if values.get(name) else None
    return out


def _check_saved_config(out: Path, config: TrainConfig, earlier: list[str], why: str) -> None:
    saved = _saved_config(out)
    if saved is None:
        raise ConfigError(f"{out} holds the outputs of another run or a model "
                          f"({', '.join(earlier)}) and no {CONFIG_FILE}; choose another "
                          "--output or pass --overwrite-output-dir to replace them")
    diff = differences(_config_identity(saved), _config_identity(config.to_dict()))
    if diff:
        raise ConfigError(f"{out} holds an earlier run with other settings ({'; '.join(diff)})"
                          f"{' ' + why if why else ''}: use its settings, or pass "
                          "--overwrite-output-dir to replace it, or choose another --output")


def _compatible_checkpoint(path: Path, identity: dict[str, Any]) -> Path:
    state = read_trainer_state(path)
    saved = state.get("run")
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume-from-checkpoint {path}: its {STATE} records no run "
                          "settings, so it cannot be checked to belong to this run (another "
                          "cache, another beta would resume silently); resume from a "
                          "checkpoint written by this version, or start over")
    diff = differences(saved, identity)
    if diff:
        raise ConfigError(f"--resume-from-checkpoint {path}: the run was started with other "
                          f"settings ({'; '.join(diff)}); resume with the same settings, or "
                          "start a new run in another --output")
    return path


def wipe_run_outputs(out: Path) -> None:
    """--overwrite-output-dir: remove what an earlier run wrote (and only that)."""
    for name in earlier_outputs(out):
        remove_entry(out / name)
    for partial in out.glob(".checkpoint-*.partial"):
        remove_entry(partial)
    log.info("--overwrite-output-dir: removed the earlier run's outputs in %s", out)


def start_run(accelerator, out: Path, config: TrainConfig, plan: Plan) -> None:
    """Apply a plan (main process; the others wait): remove the earlier run's outputs when
    asked, drop half-written checkpoints, then record the resolved configuration."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if plan.wipe:
            wipe_run_outputs(out)
        if plan.superseded:
            log.warning("resuming from %s: removing the later checkpoints %s of this run (the "
                        "run rewrites them as it goes on)", plan.resume_from,
                        ", ".join(p.name for p in plan.superseded))
        for stale in (*plan.superseded, *out.glob(".checkpoint-*.partial")):
            remove_entry(stale)
        write_json(out / CONFIG_FILE, config.to_dict())
    accelerator.wait_for_everyone()


def lock_output(accelerator, out: Path) -> FolderLock | None:
    """The main process locks --output for the run (released by the kernel even on
    SIGKILL); every process stops when it could not."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = FolderLock(out / ".kto-train.lock", f"--output {out}").acquire()
        except ConfigError as err:
            error = err
    if any_process(accelerator.gather, error is not None, accelerator.device):
        raise error or ConfigError(f"--output {out} is in use by another run")
    return lock
