"""The KTO loss (spec section 3) as pure functions of per-row log-probs: no model,
no process group, no side effects. The KL estimate z takes a ``gather`` callable
so that the caller decides how KL rows are collected across processes.

    r_i = logp_pi(c_i | p_i) - ref_logps_i
    z   = max(0, mean_j [logp_pi(kl_c_j | p_j) - ref_kl_logps_j])   (all processes, no grad)
    kto:               desirable   L_i = lambda_D * (1 - sigmoid(beta * (r_i - z)))
                       undesirable L_i = lambda_U * (1 - sigmoid(beta * (z - r_i)))
    apo_zero_unpaired: desirable   L_i = lambda_D * (1 - sigmoid(beta * r_i))
                       undesirable L_i = lambda_U * sigmoid(beta * r_i)
    loss = nanmean_i L_i  [+ gamma * mean_{i desirable}(-logp_i / len_i) * n / n_D]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOLossConfig:
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ftx_gamma: float = 0.0


@dataclass(frozen=True)
class KTOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    losses: torch.Tensor  # [B] per-row L_i (before the SFT term)
    rewards: torch.Tensor  # [B] beta * r_i, detached
    kl: torch.Tensor  # scalar z, detached
    aux_loss: torch.Tensor | None = None  # MoE router loss included in ``loss``, detached


def estimate_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """z = max(0, mean over every process's KL rows of (policy - reference)); detached.

    policy_kl_logps, ref_kl_logps: [B_local]. ``gather`` concatenates a [B_local] tensor
    across processes (identity on one process)."""
    with torch.no_grad():
        diff = (policy_kl_logps.detach().double() - ref_kl_logps.double())
        return gather(diff).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor, config: KTOLossConfig,
             completion_lengths: torch.Tensor | None = None) -> KTOLossOutput:
    """policy_logps: [B] float (grad flows); ref_logps: [B]; labels: [B] bool (True =
    desirable); kl: scalar z from ``estimate_kl`` (ignored by apo_zero_unpaired);
    completion_lengths: [B], needed when config.ftx_gamma > 0."""
    r = policy_logps - ref_logps.to(policy_logps.dtype)
    z = kl.to(policy_logps.dtype).detach()
    b = config.beta
    if config.loss_type == "kto":
        desirable = 1 - torch.sigmoid(b * (r - z))
        undesirable = 1 - torch.sigmoid(b * (z - r))
    elif config.loss_type == "apo_zero_unpaired":
        desirable = 1 - torch.sigmoid(b * r)
        undesirable = torch.sigmoid(b * r)
    else:
        raise ValueError(f"unknown loss_type {config.loss_type!r}: expected {LOSS_TYPES}")
    losses = torch.where(labels, config.desirable_weight * desirable,
                         config.undesirable_weight * undesirable)
    loss = losses.nanmean()
    if config.ftx_gamma and labels.any():
        if completion_lengths is None:
            raise ValueError("ftx_gamma > 0 needs completion_lengths")
        nll = -policy_logps[labels] / completion_lengths[labels].to(policy_logps.dtype)
        loss = loss + config.ftx_gamma * nll.mean() * labels.numel() / labels.sum()
    return KTOLossOutput(loss, losses, (b * r).detach(), z)
