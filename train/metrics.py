"""Metrics with TRL's names, summed over a logging window and averaged by row counts
(not by micro-batch), and written one JSON object per line to metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from shared.errors import KtoError, writing
from shared.files import atomic_write_text, open_no_follow

log = logging.getLogger(__name__)


class MetricWindow:
    """Accumulates micro-steps whose per-row tensors were gathered across processes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, loss: torch.Tensor, kl: torch.Tensor, rewards: torch.Tensor,
            logps: torch.Tensor, labels: torch.Tensor, tokens: int,
            aux_loss: torch.Tensor | None = None) -> None:
        n = labels.numel()
        chosen, rejected = labels, ~labels
        s = self.sums
        s["rows"] += n
        s["loss"] += float(loss) * n
        s["kl"] += float(kl) * n
        s["count/chosen"] += int(chosen.sum())
        s["count/rejected"] += int(rejected.sum())
        s["rewards/chosen"] += float(rewards[chosen].sum())
        s["rewards/rejected"] += float(rewards[rejected].sum())
        s["logps/chosen"] += float(logps[chosen].sum())
        s["logps/rejected"] += float(logps[rejected].sum())
        s["tokens"] += tokens
        if aux_loss is not None:  # MoE policies (TRL logs it under this name)
            s["aux_loss"] += float(aux_loss) * n

    def result(self, prefix: str = "") -> dict[str, float]:
        s = self.sums
        rows, nc, nr = s["rows"], s["count/chosen"], s["count/rejected"]
        out = {"loss": s["loss"] / rows, "kl": s["kl"] / rows,
               "rewards/chosen": _div(s["rewards/chosen"], nc),
               "rewards/rejected": _div(s["rewards/rejected"], nr),
               "logps/chosen": _div(s["logps/chosen"], nc),
               "logps/rejected": _div(s["logps/rejected"], nr),
               "count/chosen": nc, "count/rejected": nr}
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if "aux_loss" in s:
            out["aux_loss"] = s["aux_loss"] / rows
        return {f"{prefix}{k}": v for k, v in out.items()}


def _div(total: float, count: float) -> float:
    return total / count if count else math.nan


class MetricsFile:
    """OUTPUT/metrics.jsonl; on resume, records after the checkpoint's step are dropped
    (resume_step 0: all of them; None: a new run, the file is emptied)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept = kept_records(path, resume_step) if resume_step and path.is_file() else []
        atomic_write_text(path, "".join(line + "\n" for line in kept))  # a link: an error

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        fd = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with writing(self.path), os.fdopen(fd, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")


def kept_records(path: Path, resume_step: int) -> list[str]:
    """The lines of records up to ``resume_step``. A last line cut by a kill is dropped
    with a warning; any other line that is not a record is an error naming it."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):
                log.warning("%s: dropping its last line, cut short by a kill: %r", path,
                            line[:80])
                break
            raise KtoError(f"{path}: line {number} is not a metrics record ({line[:60]!r}); "
                           "the file was edited or damaged: delete that line, or pass "
                           "--overwrite-output-dir to start the run over") from None
        if isinstance(step, int) and step <= resume_step:
            kept.append(line)
    return kept
