"""Metrics with TRL's names, summed over a logging window and averaged by row counts
(not by micro-batch), and written one JSON object per line to metrics.jsonl."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


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
    """OUTPUT/metrics.jsonl; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
