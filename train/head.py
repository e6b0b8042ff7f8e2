"""The policy's completion log-probs without [batch, positions, vocabulary] logits.

``add_chunked_head`` gives the model a second mode of its own forward, as TRL's fused
LM head does: ``model(..., score_mask=..., seq_index=..., num_seqs=...)`` runs the
decoder body, gathers the hidden states that predict scored (completion) tokens, and
applies the LM head and the float32 log-softmax to them in chunks
(``shared.logprobs.chunked_token_logps``, backward included). It stays inside the
model's own forward so that DDP, FSDP and DeepSpeed see one ordinary call (FSDP2
unshards the root's parameters, the head's among them, around it). Without
``score_mask`` the forward is the original one (generation, saving are unchanged).

A batch is any layout of rows of token ids: right-padded [B, T] or packed [1, N]
(``train.packing``). ``score_mask[b, t]`` is True where ``input_ids[b, t]`` is a
completion token (its log-prob counts), ``seq_index[b, t]`` names the sequence it
belongs to, and the result has ``num_seqs`` sums."""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass

import torch

from shared.logprobs import (
    chunk_rows,
    chunked_token_logps,
    declares_logit_transform,
    plain_head,
    scored_states,
    token_logps,
)

log = logging.getLogger(__name__)


@dataclass
class HeadOutput:
    logps: torch.Tensor  # [num_seqs] float32 sums over completion tokens
    aux_loss: torch.Tensor | None  # MoE load-balancing loss, when router logits were asked


def add_chunked_head(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` (call before wrapping with peft or accelerate)."""
    plain = logits_are_plain_head(model)
    if not plain:
        log.warning("%s's logits are not a plain LM head (soft-capping or scaling): kto-train "
                    "falls back to the model's full logits, [batch, positions, vocabulary]",
                    type(model).__name__)
    original = model.forward
    rows = chunk_rows(model.config.get_text_config().vocab_size)

    @functools.wraps(type(model).forward)
    def forward(self, *args, score_mask=None, seq_index=None, num_seqs=None, **kwargs):
        if score_mask is None:
            return original(*args, **kwargs)
        logps_fn = _chunked_logps if plain else _full_logits_logps
        return completion_logps(self, logps_fn, original, score_mask, seq_index, num_seqs,
                                rows, **kwargs)

    model.forward = types.MethodType(forward, model)


def logits_are_plain_head(model: torch.nn.Module) -> bool:
    """Whether the model's logits are ``lm_head(last hidden state)``: no transform declared
    in its config and, where the weights are in memory (not partitioned by ZeRO-3), the
    same probe forward the scorer runs, so that both stages take the same path."""
    if declares_logit_transform(model.config):
        return False
    if any(p.numel() == 0 for p in model.parameters()):  # ZeRO-3: weights partitioned
        return True
    return plain_head(model)[1] is not None


def completion_logps(model, logps_fn, original, score_mask: torch.Tensor,
                     seq_index: torch.Tensor, num_seqs: int, rows: int, *,
                     input_ids: torch.Tensor, output_router_logits: bool = False,
                     **kwargs) -> HeadOutput:
    if output_router_logits:
        kwargs["output_router_logits"] = True
    lp, target, outputs = logps_fn(model, original, input_ids, score_mask, rows, kwargs)
    sums = lp.new_zeros(num_seqs).index_add(0, seq_index[:, 1:][target], lp)
    aux = (router_aux_loss(model, outputs.router_logits, kwargs.get("attention_mask"))
           if output_router_logits else None)
    return HeadOutput(sums, aux)


def _chunked_logps(model, original, input_ids, score_mask, rows, kwargs):
    body = getattr(model, model.base_model_prefix)
    outputs = body(input_ids=input_ids, use_cache=False, **kwargs)
    states, tokens, target = scored_states(outputs.last_hidden_state, input_ids, score_mask)
    lp = chunked_token_logps(states, model.get_output_embeddings(), tokens, rows)
    return lp, target, outputs


def _full_logits_logps(model, original, input_ids, score_mask, rows, kwargs):
    """Models whose logits are not ``lm_head(hidden)``: their own forward, all logits."""
    outputs = original(input_ids=input_ids, use_cache=False, **kwargs)
    logits, tokens, target = scored_states(outputs.logits, input_ids, score_mask)
    return token_logps(logits, tokens), target, outputs


def router_aux_loss(model, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss every transformers MoE family uses (Mixtral's), over the
    real tokens of the batch (all of them when packed: no attention mask), as TRL."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = model.config.get_text_config()
    experts = getattr(model, "num_experts", None) or config.num_experts
    top_k = getattr(model, "num_experts_per_tok", None) or config.num_experts_per_tok
    return load_balancing_loss_func(router_logits, experts, top_k, attention_mask)


def policy_logps(model: torch.nn.Module, seqs: dict) -> HeadOutput:
    """Completion log-prob sums of one batch layout (see module doc) through a model
    patched by ``add_chunked_head`` (possibly wrapped by peft, DDP, FSDP, DeepSpeed)."""
    return model(**seqs)
