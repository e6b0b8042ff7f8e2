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
from conftest import KTO_DEMO, build_cache, read_cache
from helpers import TRAIN_ATOL, TRAIN_RTOL, assert_close

from train.head import add_chunked_head, policy_logps
from train.loss import KTOLossConfig, estimate_kl, kto_loss
from train.packing import padded

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trl_kto import cache_dataset, pretokenized_trainer  # noqa: E402

ROWS = 24


@pytest.fixture(scope="module")
def trl_run(tiny_dir, tokenizer, tmp_path_factory):
    """TRL with precompute_ref_log_probs on a 24-row real-data cache."""
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig

    root = tmp_path_factory.mktemp("trl")
    data = root / "kto.json"
    data.write_text(json.dumps(json.loads(KTO_DEMO.read_text())[:ROWS]))
    build_cache(tiny_dir, [data], root / "cache", max_length=512, max_prompt_length=256)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    config = KTOConfig(output_dir=str(root / "out"), per_device_train_batch_size=8,
                       precompute_ref_log_probs=True, train_sampling_strategy="sequential",
                       report_to=[], disable_tqdm=True, use_cpu=True, beta=0.1,
                       bf16=False)  # TRL defaults to bf16 autocast
    trainer = pretokenized_trainer()(model=policy, args=config,
                                     train_dataset=cache_dataset(root / "cache"),
                                     processing_class=tokenizer)
    return trainer, read_cache(root / "cache")[1]


def test_trl_reference_logps_equal_the_cache(trl_run):
    trainer, cache = trl_run
    ds = trainer.train_dataset
    assert_close(np.asarray(ds["ref_logps"]), cache["ref_logps"].to_numpy(),
                 what="TRL precompute vs cache ref_logps")
    assert_close(np.asarray(ds["ref_KL_logps"]), cache["ref_kl_logps"].to_numpy(),
                 what="TRL precompute vs cache ref_kl_logps")


def test_trl_loss_equals_kto_train_loss(trl_run):
    trainer, cache = trl_run
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference: rewards and z != 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    rows = [trainer.train_dataset[i] for i in range(8)]
    with torch.no_grad():
        theirs = trainer.compute_loss(model, trainer.data_collator(rows))

        batch, pad = cache.slice(0, 8).to_pydict(), trainer.processing_class.pad_token_id
        target = padded(batch["prompt_ids"], batch["completion_ids"], pad)
        kl_seqs = padded(batch["prompt_ids"], batch["kl_completion_ids"], pad)
        labels = torch.tensor(batch["label"])
        ref = torch.tensor(batch["ref_logps"], dtype=torch.float64)
        add_chunked_head(model)  # on top of TRL's own patched forward: ours when asked
        z = estimate_kl(policy_logps(model, kl_seqs).logps,
                        torch.tensor(batch["ref_kl_logps"], dtype=torch.float64))
        ours = kto_loss(policy_logps(model, target).logps, ref, labels, z,
                        KTOLossConfig(beta=0.1))
    assert labels.any() and (~labels).any() and float(z) > 0
    torch.testing.assert_close(ours.loss.double(), theirs.double(), rtol=TRAIN_RTOL,
                               atol=TRAIN_ATOL)
