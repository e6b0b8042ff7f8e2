"""The transformers scorer against the naive one-sequence-at-a-time oracle, and
its batching (sorting, token budget, left padding) leaking nothing into results."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import assert_close, naive_logps

from precompute.scoring.hf import HFScorer, left_pad, plain_head, token_budget_batches
from shared.logprobs import sequence_logps, tail_logps


def random_pairs(vocab, n, seed, max_prompt=60, max_completion=90):
    rng = random.Random(seed)
    return [([rng.randrange(5, vocab) for _ in range(rng.randint(1, max_prompt))],
             [rng.randrange(5, vocab) for _ in range(rng.randint(1, max_completion))])
            for _ in range(n)]


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return random_pairs(len(tokenizer), 40, seed=0)


def test_hf_scorer_matches_naive_oracle(tiny_dir, model, pairs):
    got = HFScorer(str(tiny_dir), "float32", batch_tokens=2048).score(pairs)
    assert_close(got, naive_logps(model, pairs), what="hf vs naive")


def test_head_path_and_forward_path_agree(tiny_dir, model, pairs, monkeypatch):
    scorer = HFScorer(str(tiny_dir), "float32", batch_tokens=2048)
    assert scorer.head is not None  # a Llama's logits are its plain LM head
    scorer.head_rows = 7  # chunks that split rows
    chunked = scorer.score(pairs)
    scorer.head = None  # the model-forward path (logits_to_keep)
    assert_close(chunked, scorer.score(pairs), what="head path vs forward path")
    assert_close(chunked, naive_logps(model, pairs), what="head path vs naive")


def test_scaled_logits_are_not_taken_for_a_plain_head(model):
    class Scaled(torch.nn.Module):  # a model whose logits are not lm_head(hidden)
        base_model_prefix = "model"

        def __init__(self, inner):
            super().__init__()
            self.inner, self.model, self.config = inner, inner.model, inner.config
            self.device = inner.device

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = 30.0 * torch.tanh(out.logits / 30.0)  # Gemma-2-style soft-capping
            return out

    assert plain_head(Scaled(model)) == (None, None)
    assert plain_head(model)[1] is model.lm_head


def test_tail_logps_equal_full_sequence_logps_on_left_padded_batch(model, pairs):
    ids, mask, positions, clen = left_pad(pairs[:12], 0)
    completion_mask = (torch.arange(ids.shape[1])[None, :] >= ids.shape[1] - clen[:, None])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        expected = sequence_logps(full, ids, completion_mask.long())
        from_tail = tail_logps(full, ids, clen)
    # float32 sums of ~100 terms in another order: relative 1e-7 observed
    torch.testing.assert_close(from_tail, expected, rtol=1e-6, atol=1e-5)
    assert_close(expected.double().numpy(), naive_logps(model, pairs[:12]),
                 what="left-padded batch vs naive")


def test_batching_does_not_change_results(tiny_dir, pairs):
    scorer = HFScorer(str(tiny_dir), "float32", batch_tokens=1)  # one sequence per batch
    single = scorer.score(pairs)
    scorer.batch_tokens = 100_000  # everything in one padded batch
    # same oracle tolerance: fp32 kernels may sum in another order at another batch shape
    assert_close(scorer.score(pairs), single, what="one batch vs one-by-one")


def test_token_budget_batches_sorts_and_respects_budget():
    lengths = [5, 1, 9, 3, 3, 7]
    batches = list(token_budget_batches(lengths, budget=10))
    assert sorted(i for b in batches for i in b) == list(range(6))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    assert all(len(b) * max(lengths[i] for i in b) <= 10 for b in batches if len(b) > 1)


def test_sequence_logps_counts_completion_tokens_only():
    logits = torch.randn(1, 4, 6, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    lp = torch.log_softmax(logits.float(), -1)
    expected = lp[0, 1, 3] + lp[0, 2, 4]
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_bfloat16_reference_drifts_beyond_the_float32_tolerance(tiny_dir, model, pairs):
    """Why float32 is the default: measured here, not assumed."""
    naive = naive_logps(model, pairs)
    bf16 = HFScorer(str(tiny_dir), "bfloat16", batch_tokens=2048).score(pairs)
    assert np.abs(bf16 - naive).max() > 10 * 1e-3
