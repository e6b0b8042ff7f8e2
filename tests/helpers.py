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


def assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= TRAIN_ATOL, f"weights differ by up to {worst:.3g}"
