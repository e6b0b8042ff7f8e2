"""Parity with the peer: TRL's KTOTrainer (the `bench` extra's version, installed for
tests too) given the cache's own sequences computes the same reference log-probs as
kto-precompute, and the same KTO loss as kto-train's pure loss on a trained-away policy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KTO_DEMO, build_cache, need_test_data, read_cache
from helpers import TRAIN_ATOL, TRAIN_RTOL, assert_close

from train.head import add_chunked_head, policy_logps
from train.loss import KTOLossConfig, estimate_kl, kto_loss
from train.packing import padded
from train.trainer import with_aux_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trl_kto import cache_dataset, pretokenized_trainer  # noqa: E402

ROWS = 24


def trl_on_cache(model_dir, tokenizer, root: Path, **config):
    """TRL with precompute_ref_log_probs on a 24-row real-data cache of ``model_dir``."""
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig

    need_test_data()
    data = root / "kto.json"
    data.write_text(json.dumps(json.loads(KTO_DEMO.read_text())[:ROWS]))
    build_cache(model_dir, [data], root / "cache", max_length=512, max_prompt_length=256)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = KTOConfig(output_dir=str(root / "out"), per_device_train_batch_size=8,
                     precompute_ref_log_probs=True, train_sampling_strategy="sequential",
                     report_to=[], disable_tqdm=True, use_cpu=True, beta=0.1,
                     bf16=False, **config)  # TRL defaults to bf16 autocast
    trainer = pretokenized_trainer()(model=policy, args=args,
                                     train_dataset=cache_dataset(root / "cache"),
                                     processing_class=tokenizer)
    return trainer, read_cache(root / "cache")[1]


@pytest.fixture(scope="module")
def trl_run(tiny_dir, tokenizer, tmp_path_factory):
    return trl_on_cache(tiny_dir, tokenizer, tmp_path_factory.mktemp("trl"))


@pytest.mark.real_data
def test_trl_reference_logps_equal_the_cache(trl_run):
    trainer, cache = trl_run
    ds = trainer.train_dataset
    assert_close(np.asarray(ds["ref_logps"]), cache["ref_logps"].to_numpy(),
                 what="TRL precompute vs cache ref_logps")
    assert_close(np.asarray(ds["ref_KL_logps"]), cache["ref_kl_logps"].to_numpy(),
                 what="TRL precompute vs cache ref_kl_logps")


@pytest.mark.real_data
def test_trl_loss_equals_kto_train_loss(trl_run):
    trainer, cache = trl_run
    theirs, ours, z, labels = both_losses(trainer, cache, aux_coef=0.0)
    assert labels.any() and (~labels).any() and float(z) > 0
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=TRAIN_RTOL,
                               atol=TRAIN_ATOL)


def both_losses(trainer, cache, aux_coef: float):
    """TRL's compute_loss and kto-train's loss (train.head + the pure loss + the router
    loss) on the first 8 rows, with the policy moved away from the reference by random
    noise: the first noise seed (from 1) that gives z > 0, so that the KL term is in both
    losses rather than clamped to 0 (its sign depends on the model and the rows)."""
    model = trainer.model
    model.eval()
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch, pad = cache.slice(0, 8).to_pydict(), trainer.processing_class.pad_token_id
    target = padded(batch["prompt_ids"], batch["completion_ids"], pad)
    kl_seqs = padded(batch["prompt_ids"], batch["kl_completion_ids"], pad)
    labels = torch.tensor(batch["label"])
    ref = torch.tensor(batch["ref_logps"], dtype=torch.float64)
    ref_kl = torch.tensor(batch["ref_kl_logps"], dtype=torch.float64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    add_chunked_head(model)  # on top of TRL's own patched forward: ours when asked
    with torch.no_grad():
        for seed in range(1, 11):
            model.load_state_dict(start)
            torch.manual_seed(seed)
            for p in model.parameters():  # rewards != 0
                p.add_(0.02 * torch.randn_like(p))
            z = estimate_kl(policy_logps(model, kl_seqs).logps, ref_kl)
            if float(z) > 0:
                break
        theirs = trainer.compute_loss(model, trainer.data_collator(rows))
        out = policy_logps(model, {**target, "output_router_logits": bool(aux_coef)})
        ours = kto_loss(out.logps, ref, labels, z, KTOLossConfig(beta=0.1))
        if aux_coef:
            ours = with_aux_loss(ours, out.aux_loss, aux_coef)
    return theirs, ours.loss, z, labels


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from tiny import save_tiny_moe

    return save_tiny_moe(tmp_path_factory.mktemp("moe") / "model", aux_coef=0.02)


@pytest.mark.real_data
def test_trl_moe_loss_with_router_aux_loss_equals_kto_train(moe_dir, tokenizer,
                                                            tmp_path_factory):
    """A mixture-of-experts policy: TRL 1.16 adds router_aux_loss_coef (here the model
    config's 0.02) x the load-balancing loss; so does kto-train, to the same value."""
    from train.config import TrainConfig
    from train.setup import router_aux_coef

    trainer, cache = trl_on_cache(moe_dir, tokenizer, tmp_path_factory.mktemp("trl-moe"))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
    coef = router_aux_coef(trainer.model, TrainConfig(model="m", cache="c", output="o"))
    assert coef == 0.02
    theirs, ours, _, _ = both_losses(trainer, cache, aux_coef=coef)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=TRAIN_RTOL,
                               atol=TRAIN_ATOL)
    without_aux = both_losses(trainer, cache, aux_coef=0.0)[1]
    assert abs(float(ours - without_aux)) > 1e-4  # the router term is really in the loss


def test_router_aux_coef_follows_trl(moe_dir, tiny_dir):
    """Default from the MoE config; 0 turns it off; an explicit value on a dense model
    is an error (TRL 1.16 raises there too); a dense model without the flag gets 0."""
    from transformers import AutoModelForCausalLM

    from shared.errors import ConfigError
    from train.config import TrainConfig
    from train.setup import router_aux_coef

    def config(coef):
        return TrainConfig(model="m", cache="c", output="o", router_aux_loss_coef=coef)

    moe = AutoModelForCausalLM.from_pretrained(moe_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert router_aux_coef(moe, config(None)) == 0.02
    assert router_aux_coef(moe, config(0.0)) == 0.0
    assert router_aux_coef(moe, config(0.5)) == 0.5
    assert router_aux_coef(dense, config(None)) == 0.0
    with pytest.raises(ConfigError, match="not a mixture-of-experts"):
        router_aux_coef(dense, config(0.01))


def test_kto_train_trains_a_moe_policy_and_logs_aux_loss(moe_dir, tmp_path):
    from train_helpers import build_polite_cache, run_training

    cache = build_polite_cache(moe_dir, tmp_path, range(0, 8), "cache")
    metrics, _ = run_training(moe_dir, cache, tmp_path / "out", max_steps=2)
    assert all(m["aux_loss"] > 0 for m in metrics)  # TRL's metric name
    off, _ = run_training(moe_dir, cache, tmp_path / "off", max_steps=1, router_aux_loss_coef=0.0)
    assert "aux_loss" not in off[0]
