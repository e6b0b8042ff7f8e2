"""transformers scorer: sequences sorted by length, batched by a token budget,
left-padded so that every row's completion ends at the last position; only the
completion positions go through the LM head and the float32 log-softmax.

When the model's logits are exactly ``lm_head(last hidden state)`` (checked once at
start against the model's own forward), the head is applied only to the real
completion positions, gathered across the batch, in chunks: no head work on padding
and at most ``HEAD_CHUNK`` x vocabulary logits in memory at a time. Otherwise (logit
soft-capping, scaling) the model's forward with ``logits_to_keep`` is used."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from precompute.scoring import Pair
from shared.logprobs import tail_logps, token_logps

log = logging.getLogger(__name__)
HEAD_CHUNK = 2048  # completion positions per LM-head chunk


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


class HFScorer:
    name = "hf"

    def __init__(self, model_path: str, dtype: str, batch_tokens: int):
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.batch_tokens = batch_tokens
        self.pad_id = self.model.config.pad_token_id or 0  # masked out; any valid id works
        self.keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.body, self.head = plain_head(self.model)
        log.info("hf scorer: %s", "LM head on completion positions only" if self.head
                 else "model forward with logits_to_keep (logits are not a plain LM head)")

    @torch.inference_mode()
    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        out = np.zeros(len(pairs), dtype=np.float64)
        lengths = [len(p) + len(c) for p, c in pairs]
        for batch in token_budget_batches(lengths, self.batch_tokens):
            out[batch] = self._score_batch([pairs[i] for i in batch])
        return out

    def _score_batch(self, pairs: Sequence[Pair]) -> np.ndarray:
        ids, mask, positions, clen = (t.to(self.device) for t in left_pad(pairs, self.pad_id))
        if self.head is not None:
            hidden = self.body(input_ids=ids, attention_mask=mask,
                               position_ids=positions).last_hidden_state
            return completion_logps(hidden, self.head, ids, clen).cpu().numpy()
        k = int(clen.max())  # positions T-k-1 .. T-2 predict the last k tokens
        kwargs = {"logits_to_keep": k + 1} if self.keep_arg else {}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            **kwargs).logits
        # float64 sum: a float32 sum of ~1000 terms drifts by ~1e-4 nats
        return tail_logps(logits, ids, clen, torch.float64).cpu().numpy()

    def close(self) -> None:
        del self.model, self.body, self.head


def plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(decoder body, LM head) when ``model``'s logits equal ``head(body(...))`` on a
    probe sequence; (None, None) otherwise (soft-capping, logit scaling, no such parts)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        return None, None
    vocab = model.config.get_text_config().vocab_size
    probe = (torch.arange(1, 17, device=model.device) * 7919 % vocab)[None, :]
    with torch.inference_mode():
        ref = model(input_ids=probe).logits.float()
        mine = head(body(input_ids=probe).last_hidden_state).float()
    if mine.shape != ref.shape or not torch.allclose(mine, ref, rtol=1e-5, atol=1e-5):
        return None, None
    return body, head


def completion_logps(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor,
                     clen: torch.Tensor) -> torch.Tensor:
    """Per-row float64 sums of completion-token log-probs from left-padded hidden states
    [B, T, H]: only the sum(clen) real completion positions go through the head."""
    b, t = ids.shape
    # target column j (1..T-1) is in row r's completion when j >= T - clen[r]; the hidden
    # state at column j - 1 predicts it
    is_target = torch.arange(1, t, device=ids.device)[None, :] >= (t - clen)[:, None]
    targets = ids[:, 1:][is_target]
    states = hidden[:, :-1][is_target]
    rows = torch.arange(b, device=ids.device)[:, None].expand(b, t - 1)[is_target]
    out = torch.zeros(b, dtype=torch.float64, device=ids.device)
    for s in range(0, targets.numel(), HEAD_CHUNK):
        lp = token_logps(head(states[s:s + HEAD_CHUNK]), targets[s:s + HEAD_CHUNK])
        out.index_add_(0, rows[s:s + HEAD_CHUNK], lp.double())
    return out
