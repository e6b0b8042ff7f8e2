"""The chunked LM head of kto-train (train/head.py): equal to the plain path (full
logits, then a log-softmax) in value and gradient, for the padded and the packed
layout; no [batch, positions, vocabulary] logits anywhere in a training step; no
fully masked attention row, so a kernel that turns such rows into NaN cannot reach
the weights (the bf16 non-finite loss seen on an H200)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, naive_logps
from test_scoring import random_pairs
from torch.utils._python_dispatch import TorchDispatchMode

from shared.logprobs import sequence_logps
from train.head import add_chunked_head, policy_logps
from train.packing import packed, padded

# float32, the same ops in another grouping: relative 1e-6 (the bound)
RTOL = 1e-6


@pytest.fixture()
def pairs(tokenizer):
    return random_pairs(len(tokenizer), 12, seed=3)


def plain_logps(model, seqs):
    """The plain path: full logits of every position, then the masked log-softmax."""
    logits = model(input_ids=seqs["input_ids"], attention_mask=seqs.get("attention_mask"),
                   position_ids=seqs["position_ids"]).logits
    return sequence_logps(logits, seqs["input_ids"], seqs["score_mask"].long())


def layouts(pairs, pad_id=0):
    prompts, completions = [list(p) for p, _ in pairs], [list(c) for _, c in pairs]
    return {"padded": padded(prompts, completions, pad_id), "packed": packed(prompts, completions)}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_head_equals_plain_path_values_and_gradients(model, pairs, layout, monkeypatch):
    import train.head as head

    monkeypatch.setattr(head, "chunk_rows", lambda vocab: 7)  # many chunks, split rows
    seqs = layouts(pairs)[layout]
    plain = copy.deepcopy(model).train()
    chunked = copy.deepcopy(model).train()
    add_chunked_head(chunked)
    expected = plain_logps(plain, layouts(pairs)["padded"])  # the reference layout
    got = policy_logps(chunked, seqs).logps
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)
    weights = torch.linspace(-1, 1, len(pairs))  # a loss that weighs rows differently
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    g_plain, g_chunked = grads(plain), grads(chunked)
    assert g_plain.keys() == g_chunked.keys() and len(g_plain) > 5
    # padded: the same attention ops as the reference, so only the head's grouping
    # differs (within 1e-6 of each gradient's scale). packed: the reference is the padded
    # layout, whose attention sums in another order as well; measured 1.2e-6 of the scale
    # with the tests' tokenizer (k_proj, layer 1), so 1e-5 there; attention leaking across
    # packed sequences would change the log-probs themselves, held to rtol 1e-6 above
    bound = 1e-6 if layout == "padded" else 1e-5
    for name in g_plain:
        scale = g_plain[name].abs().max()
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=RTOL,
                                   atol=bound * float(scale), msg=name)
    with torch.no_grad():
        naive = naive_logps(model, pairs)
    assert_close(got.detach().double().numpy(), naive, what=f"{layout} vs naive")


def test_forward_without_score_mask_is_the_original(model, pairs):
    m = copy.deepcopy(model)
    add_chunked_head(m)
    ids = torch.tensor([list(pairs[0][0]) + list(pairs[0][1])])
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, model(input_ids=ids).logits)


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest number of rows of any tensor whose last dimension is the
    vocabulary (logits, their float32 copy, softmax, their gradients), except the LM
    head's own transposed weight [hidden, vocabulary]."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and tuple(t.shape) != (self.hidden, self.vocab)):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_batch_by_positions_by_vocabulary_logits_in_a_training_step(tiny_dir, tmp_path,
                                                                      monkeypatch):
    """Real kto-train steps (target forward + backward, KL forward, optimizer step, and
    the evaluation pass)."""
    from train_helpers import build_polite_cache
    from transformers import AutoConfig

    import train.head as head
    from train.config import TrainConfig
    from train.trainer import Trainer

    cache = build_polite_cache(tiny_dir, tmp_path, range(0, 8), "cache")
    chunk = 8
    monkeypatch.setattr(head, "chunk_rows", lambda vocab: chunk)
    config = AutoConfig.from_pretrained(tiny_dir)
    watch = LargestVocabTensor(config.vocab_size, config.hidden_size)
    trainer = Trainer(TrainConfig(model=str(tiny_dir), cache=str(cache), eval_cache=str(cache),
                                  output=str(tmp_path / "out"), max_steps=2,
                                  per_device_train_batch_size=8, learning_rate=1e-3))
    trainer.setup()
    try:
        with watch:
            trainer.train()
    finally:
        trainer.cleanup()
    # each batch has 8 rows of ~20 completion tokens: a [B, P, V] tensor has >= 160 rows
    assert 0 < watch.rows <= chunk


def test_the_vocab_watch_sees_full_logits(model, pairs):
    """The check above can fail: the plain path's logits are [B, T, V]."""
    watch = LargestVocabTensor(model.config.vocab_size, model.config.hidden_size)
    seqs = layouts(pairs)["padded"]
    with watch, torch.no_grad():
        plain_logps(model, seqs)
    assert watch.rows >= seqs["input_ids"].numel()


# ---- the bf16 non-finite loss: fully masked attention rows ------------------------------
class _NanGradOnFullyMasked(torch.autograd.Function):
    """Identity forward; the backward writes NaN into the gradient of query rows that
    attend to nothing, as fused GPU attention kernels can (pytorch#103749, #109517), which
    turns a left-padded bf16 run's loss non-finite."""

    @staticmethod
    def forward(ctx, out, fully_masked):
        ctx.save_for_backward(fully_masked)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        (fully_masked,) = ctx.saved_tensors
        return grad.masked_fill(fully_masked, float("nan")), None


def nan_on_fully_masked_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None:
        return out, weights
    rows = ~attention_mask.any(-1)  # [B, 1, Q]: query rows with no key to attend to
    return _NanGradOnFullyMasked.apply(out, rows[:, 0, :, None, None]), weights


@pytest.fixture()
def nan_kernel_model(model):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("nan_on_fully_masked", nan_on_fully_masked_attention)
    AttentionMaskInterface.register("nan_on_fully_masked", sdpa_mask)
    m = copy.deepcopy(model).train()
    m.set_attn_implementation("nan_on_fully_masked")
    add_chunked_head(m)
    return m


def left_padded(pairs, pad_id=0):
    """The layout kto-train used before: left padding (leading rows fully masked)."""
    out = padded([list(p) for p, _ in pairs], [list(c) for _, c in pairs], pad_id)
    width = out["input_ids"].shape[1]
    lengths = out["attention_mask"].sum(-1)
    for key in ("input_ids", "attention_mask", "score_mask"):
        out[key] = torch.stack([row.roll(int(width - n)) for row, n in zip(out[key], lengths,
                                                                           strict=True)])
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out


def test_no_fully_masked_row_reaches_the_gradients(nan_kernel_model, model, pairs):
    seqs = layouts(pairs)["padded"]
    logps = policy_logps(nan_kernel_model, seqs).logps
    logps.sum().backward()
    assert all(torch.isfinite(g).all() for g in grads(nan_kernel_model).values())
    plain = copy.deepcopy(model)
    add_chunked_head(plain)
    torch.testing.assert_close(logps, policy_logps(plain, seqs).logps)


def test_left_padding_lets_the_nan_kernel_poison_every_weight(nan_kernel_model, pairs):
    """The check above can fail: with left padding the same kernel's NaN spreads."""
    logps = policy_logps(nan_kernel_model, left_padded(pairs)).logps
    assert torch.isfinite(logps).all()  # the loss looks fine...
    logps.sum().backward()
    g = grads(nan_kernel_model)
    assert torch.isnan(g["model.embed_tokens.weight"]).any()  # ...the step would not be


def test_padding_free_training_equals_padded_training(tiny_dir, tmp_path):
    """Whole runs (4 steps, KL pass, optimizer): packed rows, positions restarting per
    sequence, equal the padded rows (SDPA reads packing as a block-diagonal mask)."""
    from helpers import assert_trajectories_close, assert_weights_close
    from train_helpers import build_polite_cache, make_policy, run_training

    cache = build_polite_cache(tiny_dir, tmp_path, range(0, 12), "cache")
    policy = make_policy(tmp_path, seed=1)
    # lr 1e-4, not the helpers' 1e-3: the layouts' float32 gradients differ by ~1e-6
    # relative (measured), which Adam's normalization grows to 4e-5 in one embedding row
    # after 4 steps at 1e-3 (4e-6 at 1e-4); a boundary leak would move log-probs by nats
    padded_m, padded_w = run_training(policy, cache, tmp_path / "padded", padding_free=False,
                                      learning_rate=1e-4)
    packed_m, packed_w = run_training(policy, cache, tmp_path / "packed", padding_free=True,
                                      learning_rate=1e-4)
    keys = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm")
    assert_trajectories_close(packed_m, padded_m, keys)
    assert_weights_close(packed_w, padded_w)
    assert packed_m[-1]["tokens_per_second"] > 0
