"""The log-prob reduction both stages use (spec section 2): log-softmax in float32
whatever the model dtype, the target token picked, summed over completion tokens."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32.

    logits: [..., V] (any float dtype); targets: [...] int64. Returns [...] float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   completion_mask: torch.Tensor) -> torch.Tensor:
    """sum_t completion_mask[t] * log softmax(logits[t-1])[input_ids[t]].

    logits: [B, T, V]; input_ids, completion_mask: [B, T] (mask 1 on completion tokens,
    0 on prompt and padding). Returns [B] float32.
    """
    lp = token_logps(logits[:, :-1], input_ids[:, 1:])
    return (lp * completion_mask[:, 1:].to(lp.dtype)).sum(-1)


def tail_logps(tail_logits: torch.Tensor, input_ids: torch.Tensor, completion_len: torch.Tensor,
               sum_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same sums for a left-padded batch (every completion ends at the last position),
    from the logits of its last k + 1 positions only, k = max(completion_len).

    tail_logits: [B, >= k + 1, V] (the last k + 1 are used; position T - 1 predicts
    nothing); input_ids: [B, T]; completion_len: [B]. Returns [B] in ``sum_dtype``.
    """
    k = int(completion_len.max())
    lp = token_logps(tail_logits[:, -(k + 1):-1], input_ids[:, -k:])
    in_completion = (torch.arange(k, device=lp.device)[None, :]
                     >= (k - completion_len.to(lp.device))[:, None])
    # where, not multiply: a row shorter than k + 1 has padding here, whose values are unused
    return torch.where(in_completion, lp, 0.0).to(sum_dtype).sum(-1)
