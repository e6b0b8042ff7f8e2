"""The KTO loss: hand-worked values, a naive float64 per-row reference, no gradient
through z, and batches with only one class."""

from __future__ import annotations

import math

import pytest
import torch

from train.loss import KTOLossConfig, estimate_kl, kto_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_worked_kto():
    # rewards before beta: r = [2 - 1, -3 - (-1)] = [1, -2]; z = max(0, mean([0.5, 1.5])) = 1
    policy, ref = torch.tensor([2.0, -3.0]), torch.tensor([1.0, -1.0])
    labels = torch.tensor([True, False])
    z = estimate_kl(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert z.item() == 1.0
    out = kto_loss(policy, ref, labels, z, KTOLossConfig(beta=0.5, desirable_weight=2.0))
    d = 2.0 * (1 - sig(0.5 * (1 - 1)))  # 2 * 0.5 = 1.0
    u = 1.0 * (1 - sig(0.5 * (1 - (-2))))  # 1 - sigmoid(1.5)
    assert out.losses.tolist() == pytest.approx([d, u])
    assert out.loss.item() == pytest.approx((d + u) / 2)
    assert out.rewards.tolist() == pytest.approx([0.5, -1.0])


def test_negative_kl_is_clamped_to_zero():
    assert estimate_kl(torch.tensor([-3.0, -1.0]), torch.tensor([0.0, 0.0])).item() == 0.0


def test_hand_worked_apo_zero_unpaired_ignores_z():
    policy, ref = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    labels = torch.tensor([True, False])
    cfg = KTOLossConfig(beta=1.0, loss_type="apo_zero_unpaired")
    out = kto_loss(policy, ref, labels, torch.tensor(100.0), cfg)
    assert out.losses.tolist() == pytest.approx([1 - sig(1.0), sig(1.0)])


def naive(policy, ref, labels, kl_policy, kl_ref, cfg, lengths):
    """Per row, in float64 Python."""
    z = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_ref, strict=True)) / len(kl_policy))
    losses = []
    for p, r0, y in zip(policy, ref, labels, strict=True):
        r = p - r0
        if cfg.loss_type == "kto":
            losses.append(cfg.desirable_weight * (1 - sig(cfg.beta * (r - z))) if y
                          else cfg.undesirable_weight * (1 - sig(cfg.beta * (z - r))))
        else:
            losses.append(cfg.desirable_weight * (1 - sig(cfg.beta * r)) if y
                          else cfg.undesirable_weight * sig(cfg.beta * r))
    loss = sum(losses) / len(losses)
    n_d = sum(labels)
    if cfg.ftx_gamma and n_d:
        nll = [-p / n for p, n, y in zip(policy, lengths, labels, strict=True) if y]
        loss += cfg.ftx_gamma * (sum(nll) / n_d) * len(labels) / n_d
    return loss, z


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_float64(loss_type, seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    policy = -50 * torch.rand(n, generator=g, dtype=torch.float64)
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64) * 3
    kl_p = -50 * torch.rand(n, generator=g, dtype=torch.float64)
    kl_r = kl_p - torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.rand(n, generator=g) > 0.4
    lengths = torch.randint(1, 40, (n,), generator=g)
    cfg = KTOLossConfig(beta=0.3, loss_type=loss_type, desirable_weight=1.3,
                        undesirable_weight=0.7, ftx_gamma=0.2)
    z = estimate_kl(kl_p, kl_r)
    out = kto_loss(policy, ref, labels, z, cfg, lengths)
    expected, expected_z = naive(policy.tolist(), ref.tolist(), labels.tolist(), kl_p.tolist(),
                                 kl_r.tolist(), cfg, lengths.tolist())
    assert z.item() == pytest.approx(expected_z, rel=1e-12, abs=1e-12)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_no_gradient_flows_through_z():
    policy = torch.tensor([-2.0, -3.0], requires_grad=True)
    kl_policy = torch.tensor([-1.0, -0.5], requires_grad=True)
    z = estimate_kl(kl_policy, torch.tensor([-2.0, -2.0]))
    assert not z.requires_grad
    out = kto_loss(policy, torch.tensor([-2.5, -2.5]), torch.tensor([True, False]), z,
                   KTOLossConfig())
    out.loss.backward()
    assert kl_policy.grad is None and policy.grad is not None


@pytest.mark.parametrize("labels", [[True, True, True], [False, False, False]])
def test_single_class_batches_are_finite(labels):
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    labels = torch.tensor(labels)
    out = kto_loss(policy, torch.tensor([-1.5, -1.5, -1.5]), labels, torch.tensor(0.2),
                   KTOLossConfig(ftx_gamma=0.5), torch.tensor([3, 4, 5]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()


def test_gather_sees_every_process_rows():
    seen = []

    def gather(t):
        seen.append(t)
        return torch.cat([t, torch.tensor([10.0], dtype=t.dtype)])  # another process's row

    z = estimate_kl(torch.tensor([0.0]), torch.tensor([0.0]), gather)
    assert z.item() == 5.0 and len(seen) == 1
