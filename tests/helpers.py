"""Shared test helpers: the naive oracle and the one assert_close with fixed tolerances."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Spec/issue tolerance for a sequence sum of reference log-probs (nats), any backend.
SEQ_SUM_ATOL = 1e-3


def assert_close(actual, expected, atol: float = SEQ_SUM_ATOL, what: str = "values") -> None:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    diff = np.abs(a - e)
    assert np.isfinite(a).all() and np.isfinite(e).all(), f"{what}: non-finite values"
    assert diff.max() <= atol, (f"{what}: max |diff| {diff.max():.3g} > {atol:g} "
                                f"(mean {diff.mean():.3g}, worst index {int(diff.argmax())})")


@torch.no_grad()
def naive_logps(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
    """One sequence at a time, no padding, full logits, float64 log-softmax."""
    out = []
    for p, c in pairs:
        ids = torch.tensor([list(p) + list(c)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        targets = ids[0, len(p):]
        out.append(logp[len(p) - 1:-1].gather(-1, targets[:, None]).sum().item())
    return np.array(out)

# Training trajectories computed two ways (cached vs live reference, 2 processes vs 1):
# measured differences were <= 2e-5 absolute on log-probs of magnitude ~130 (1.5e-7
# relative) and <= 1.5e-6 on weights; they come from float32 sums in another order. A
# wrong or swapped reference value moves these by 1e-2 or more.
TRAIN_RTOL = 1e-5
TRAIN_ATOL = 1e-5


def assert_trajectories_close(a: list[dict], b: list[dict], keys) -> None:
    import pytest

    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in keys:
            if x[key] is None or y[key] is None:  # no row of that class in the window
                assert x[key] is y[key], (x["step"], key)
                continue
            assert x[key] == pytest.approx(y[key], rel=TRAIN_RTOL, abs=TRAIN_ATOL), (
                x["step"], key)


# AdamW makes each entry's step about the learning rate whatever its gradient's size, so
# float32 noise in an entry whose gradient is near zero moves it by a fraction of a step
# (measured: one entry of 100k by 2.6e-5 after 4 steps at lr 1e-3, cached vs live
# reference; every other entry within 1.1e-6). A wrong reference, a lost micro-batch or a
# skipped step moves the trajectories (held to 1e-5) and most weights by whole steps.
WEIGHT_ATOL_ANY = 1e-4  # every entry: a tenth of one step at the tests' lr 1e-3
WEIGHT_OUTLIERS = 1e-3  # at most this fraction of entries beyond TRAIN_ATOL


def assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diffs = [(a[k] - b[k]).abs().flatten().double() for k in a]
    worst = max(float(d.max()) for d in diffs)
    beyond = sum(int((d > TRAIN_ATOL).sum()) for d in diffs)
    total = sum(d.numel() for d in diffs)
    assert worst <= WEIGHT_ATOL_ANY, f"weights differ by up to {worst:.3g}"
    assert beyond <= WEIGHT_OUTLIERS * total, (
        f"{beyond} of {total} weights differ by more than {TRAIN_ATOL} (worst {worst:.3g})")
