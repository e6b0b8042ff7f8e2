"""The log-prob reduction both stages use (spec section 2): log-softmax in float32
whatever the model dtype, the target token picked, summed over completion tokens.

``chunked_token_logps`` applies the LM head to the scored positions only, a chunk of
rows at a time, in the forward and the backward pass, so that no more than
``chunk x vocabulary`` logits exist at once (the scorer and kto-train both use it)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Logits per chunk of head rows: 2^24 float32 values = 64 MiB (110 rows of a 151936-entry
# vocabulary, 524 of a 32000-entry one). A chunk's backward holds about four such arrays
# (logits, their float32 copy, softmax, gradient). Measured with kto-train (4x512 Llama,
# vocabulary 151936, batch 4, 6 steps, float32, 2 CPU cores; chunk_rows' default patched):
# 2^22: 4.22 GiB peak RSS, 8.1 s/step; 2^24: 3.92-3.96 GiB, 5.2-5.5 s/step; 2^26: 4.44 GiB,
# 4.7 s/step. 2^24 is the memory minimum; 2^26 trades 0.5 GiB for 10-15% of step time.
CHUNK_LOGITS = 2**24


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


def scored_states(hidden: torch.Tensor, input_ids: torch.Tensor,
                  score_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict scored tokens, in row-major order.

    hidden: [B, T, H]; input_ids, score_mask: [B, T] (True where the token's log-prob
    counts). Token t is predicted by the state at t - 1. Returns (states [N, H],
    targets [N], target mask [B, T - 1]) for the N scored tokens."""
    target = score_mask[:, 1:]
    return hidden[:, :-1][target], input_ids[:, 1:][target], target


def chunk_rows(vocab: int, budget: int = CHUNK_LOGITS) -> int:
    """Head rows per chunk so that one chunk's logits hold at most ``budget`` values."""
    return max(1, budget // vocab)


def _chunk_logps(head: torch.nn.Module, states: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    return token_logps(head(states), targets)


def chunked_token_logps(states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                        rows: int) -> torch.Tensor:
    """log softmax(head(states))[targets] in float32, ``rows`` positions at a time.

    states: [N, H] (the hidden states that predict the scored tokens); targets: [N].
    Returns [N] float32. With gradients, each chunk is checkpointed: the backward pass
    recomputes one chunk's logits at a time instead of keeping [N, V] of them, and
    the head is called as a module each time, so hooks that gather sharded weights
    (DeepSpeed ZeRO-3) run in the recomputation too."""
    grad = torch.is_grad_enabled() and (states.requires_grad or any(
        p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, states.shape[0], rows):
        s, t = states[start:start + rows], targets[start:start + rows]
        parts.append(checkpoint(_chunk_logps, head, s, t, use_reentrant=False) if grad
                     else _chunk_logps(head, s, t))
    if not parts:
        return states.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


# Config fields with which a model's logits are not lm_head(hidden): soft-capping (Gemma 2),
# scaling (Cohere, Granite, Falcon-H1, ...); the list TRL 1.16's fused head reads.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def declares_logit_transform(config) -> bool:
    """Whether the model config declares a transform of its logits after the LM head.
    Read from the config, not probed, so that it works on sharded (ZeRO-3) weights."""
    text = config.get_text_config()
    return any(getattr(text, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(decoder body, LM head) when ``model``'s logits equal ``head(body(...))`` on a
    probe sequence; (None, None) otherwise (soft-capping, logit scaling, no such parts)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        return None, None
    vocab = model.config.get_text_config().vocab_size
    probe = (torch.arange(1, 17, device=model.device) * 7919 % vocab)[None, :]
    with torch.no_grad():
        ref = model(input_ids=probe).logits.float()
        mine = head(body(input_ids=probe).last_hidden_state).float()
    if mine.shape != ref.shape or not torch.allclose(mine, ref, rtol=1e-5, atol=1e-5):
        return None, None
    return body, head
