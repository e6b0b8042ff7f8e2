"""The non-finite guard: a step is taken only when every row's loss term, reward and the
KL estimate are finite on every process, and so is the gradient norm. The loss is a
NaN-skipping mean (spec section 3), so one NaN row leaves the loss finite while its
gradient turns every weight into NaN; checking the loss alone is not enough. All
processes take the same decision (a one-element all-gather), so none hangs in a
collective while another stops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared.errors import KtoError
from train.loss import KTOLossOutput

Gather = Callable[[torch.Tensor], torch.Tensor]
FIX = ("Check the cache (kto-precompute verify), lower --learning-rate or --max-grad-norm, "
       "or train in float32 instead of --bf16")


class NonFiniteLossError(KtoError):
    """A NaN or inf loss term: the step is not taken, so the weights stay intact."""


class NonFiniteGradientError(NonFiniteLossError):
    """A NaN or inf gradient norm: the optimizer step is not taken."""


def any_process(gather: Gather, flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any of them."""
    return bool(gather(torch.tensor([int(flag)], device=device)).max())


def bad_rows(out: KTOLossOutput) -> torch.Tensor:
    """[B] bool: rows whose loss term or reward is not finite (all rows when the batch's
    loss or KL estimate is not)."""
    bad = ~torch.isfinite(out.losses.detach()) | ~torch.isfinite(out.rewards)
    if not (torch.isfinite(out.loss.detach()) and torch.isfinite(out.kl)):
        bad = torch.ones_like(bad)
    return bad


def check_rows(out: KTOLossOutput, ids: Sequence[str], step: int, gather: Gather,
               device: torch.device) -> None:
    """Raise NonFiniteLossError (on every process) when any process has a bad row."""
    bad = bad_rows(out)
    if not any_process(gather, bool(bad.any()), device):
        return
    mine = [ids[i] for i in torch.nonzero(bad).flatten().tolist()]
    where = f"rows of this process: {mine[:10]}" if mine else "rows of another process"
    raise NonFiniteLossError(
        f"non-finite loss at step {step} ({where}); the step was not taken and no weight "
        f"changed. {FIX}")


def check_grad_norm(grad_norm: torch.Tensor | float | None, step: int, gather: Gather,
                    device: torch.device, ids: Sequence[str]) -> None:
    """Raise NonFiniteGradientError before the optimizer step when the gradient norm is
    NaN or inf on any process (None: the engine clips itself, e.g. DeepSpeed)."""
    finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
    if not any_process(gather, not finite, device):
        return
    seen = "on another process" if finite else float(grad_norm)
    raise NonFiniteGradientError(
        f"non-finite gradient norm ({seen}) at step {step} (rows of this process: "
        f"{list(ids)[:10]}); the optimizer step was not taken and no weight changed. {FIX}")
