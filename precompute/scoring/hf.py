"""transformers scorer: sequences sorted by length, batched by a token budget,
left-padded so that every row's completion ends at the last position; only the
completion positions go through the LM head and the float32 log-softmax.

When the model's logits are exactly ``lm_head(last hidden state)`` (checked once at
start against the model's own forward), the head is applied only to the real
completion positions, gathered across the batch, in chunks: no head work on padding
and at most ``chunk_rows(vocabulary)`` x vocabulary logits in memory at a time. Otherwise (logit
soft-capping, scaling) the model's forward with ``logits_to_keep`` is used."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from precompute.scoring import Pair
from shared.logprobs import chunk_rows, chunked_token_logps, plain_head, scored_states, tail_logps

log = logging.getLogger(__name__)
HEAD_CHUNK = 0  # completion positions per LM-head chunk; 0 = shared.logprobs.chunk_rows
# CPU default, measured on 2 cores (SmolLM2-135M, 72 sequences of 80-1024 tokens, float32):
# 2048, 4096 and 8192 tokens per batch scored 497-557 tokens/s, 16384 326-357
CPU_BATCH_TOKENS = 4096
MIN_BATCH_TOKENS, MAX_BATCH_TOKENS = 2048, 131072


def token_budget_batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices sorted by length, grouped so that rows x longest length <= budget
    (a single row longer than the budget gets a batch of its own)."""
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) + 1) * lengths[i] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def left_pad(pairs: Sequence[Pair], pad_id: int) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask, position_ids [B, T]; completion_len [B]."""
    seqs = [list(p) + list(c) for p, c in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    completion_len = torch.tensor([len(c) for _, c in pairs], dtype=torch.long)
    return ids, mask, positions, completion_len


def activation_bytes_per_token(config, dtype_bytes: int, max_length: int) -> int:
    """A conservative estimate of the inference activation memory one padded token
    costs at the peak of a decoder layer: residual, normed and attention projections
    (about 6 x hidden), the MLP's gate, up and product (3 x intermediate) in the model
    dtype, plus one float32 row of attention scores per head in case SDPA falls back to
    its math kernel (heads x max_length)."""
    text = config.get_text_config()
    hidden = text.hidden_size
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = text.num_attention_heads
    return dtype_bytes * (6 * hidden + 3 * inter) + 4 * heads * max_length


def auto_batch_tokens(device: torch.device, free_bytes: int, per_token: int) -> int:
    """Padded tokens per forward batch for ``--batch-tokens auto``. On CPU the measured
    default. On a GPU half of the free memory (after the model is loaded) over the
    per-token estimate, within [2048, 131072] and a multiple of 1024 (on an H200 a 16384-token
    batch scored 105k tokens/s and a 65536-token one 209k); the upper bound is 2x the
    largest measured value, and an out-of-memory batch is halved and retried."""
    if device.type == "cpu":
        return CPU_BATCH_TOKENS
    tokens = free_bytes // 2 // max(per_token, 1)
    return int(min(MAX_BATCH_TOKENS, max(MIN_BATCH_TOKENS, tokens // 1024 * 1024)))


class HFScorer:
    name = "hf"

    def __init__(self, model_path: str, dtype: str, batch_tokens: int | None,
                 max_length: int = 1024):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self._load(model_path, getattr(torch, dtype)).to(self.device).eval()
        self.batch_tokens = batch_tokens or self._auto_batch_tokens(dtype, max_length)
        # masked out; any valid id works
        self.pad_id = self.model.config.get_text_config().pad_token_id or 0
        self.keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.body, self.head = plain_head(self.model)
        self.head_rows = HEAD_CHUNK or chunk_rows(self.model.config.get_text_config().vocab_size)
        log.info("hf scorer on %s, %d tokens per batch: %s", self.device, self.batch_tokens,
                 "LM head on completion positions only" if self.head
                 else "model forward with logits_to_keep (logits are not a plain LM head)")

    @staticmethod
    def _load(model_path: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)

    def _auto_batch_tokens(self, dtype: str, max_length: int) -> int:
        free = torch.cuda.mem_get_info()[0] if self.device.type == "cuda" else 0
        per_token = activation_bytes_per_token(self.model.config,
                                               torch.finfo(getattr(torch, dtype)).bits // 8,
                                               max_length)
        return auto_batch_tokens(self.device, free, per_token)

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        return self._score_all(pairs, lambda rows: self._score_batch([pairs[i] for i in rows]))

    @torch.inference_mode()
    def _score_all(self, pairs: Sequence[Pair],
                   score_rows: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Every pair, in token-budget batches of similar length (``score_rows``: the sums
        of the pairs at those indices); a batch out of memory halves the budget."""
        out = np.zeros(len(pairs), dtype=np.float64)
        done = np.zeros(len(pairs), dtype=bool)
        lengths = [len(p) + len(c) for p, c in pairs]
        while not done.all():
            todo = np.flatnonzero(~done)
            try:
                for batch in token_budget_batches([lengths[i] for i in todo], self.batch_tokens):
                    rows = todo[batch]
                    out[rows] = score_rows(rows)
                    done[rows] = True
            except torch.OutOfMemoryError:
                if self.batch_tokens < 2 * MIN_BATCH_TOKENS:
                    raise
                self._halve_batch()
        return out

    def _halve_batch(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.batch_tokens //= 2
        log.warning("out of memory: continuing with --batch-tokens %d", self.batch_tokens)

    def _score_batch(self, pairs: Sequence[Pair], **inputs: torch.Tensor) -> np.ndarray:
        """``inputs``: more model inputs for the batch (a vision model's pixel values)."""
        ids, mask, positions, clen = (t.to(self.device) for t in left_pad(pairs, self.pad_id))
        if self.head is not None:
            hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=positions,
                               **inputs).last_hidden_state
            return completion_logps(hidden, self.head, ids, clen, self.head_rows).cpu().numpy()
        k = int(clen.max())  # positions T-k-1 .. T-2 predict the last k tokens
        kwargs = {"logits_to_keep": k + 1} if self.keep_arg else {}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            **inputs, **kwargs).logits
        # float64 sum: a float32 sum of ~1000 terms drifts by ~1e-4 nats
        return tail_logps(logits, ids, clen, torch.float64).cpu().numpy()

    def close(self) -> None:
        del self.model, self.body, self.head


def completion_logps(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor,
                     clen: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """Per-row float64 sums of completion-token log-probs from left-padded hidden states
    [B, T, H]: only the sum(clen) real completion positions go through the head."""
    lp, rows = completion_token_logps(hidden, head, ids, clen, rows_per_chunk)
    out = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    return out.index_add_(0, rows, lp.double())


def completion_token_logps(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor,
                           clen: torch.Tensor, rows_per_chunk: int) -> tuple[torch.Tensor, ...]:
    """(float32 log-prob of every completion token, its row), row by row in order."""
    b, t = ids.shape
    # left-padded: column j is in row r's completion when j >= T - clen[r]
    score_mask = torch.arange(t, device=ids.device)[None, :] >= (t - clen)[:, None]
    states, targets, target = scored_states(hidden, ids, score_mask)
    rows = torch.arange(b, device=ids.device)[:, None].expand(b, t - 1)[target]
    return chunked_token_logps(states, head, targets, rows_per_chunk), rows
