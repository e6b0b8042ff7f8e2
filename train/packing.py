"""Batch layouts for the policy's forward passes (see ``train.head``).

``padded``: one row per sequence, right-padded. Right, not left: a left-padded row's
leading padding positions are query rows that may attend to nothing (fully masked),
which fused attention kernels may turn into NaN, in the forward or the backward pass,
and a NaN at a padding position reaches every real position through the next layer's
attention (0 x NaN). Right padding never has a fully masked row.

``packed`` (padding-free): every sequence of the micro-batch in one row, positions
restarting at 0 for each; with no attention mask, transformers reads the sequence
boundaries from the positions (variable-length kernels for flash-attention, a block
mask for flex attention, a block-diagonal mask for SDPA/eager)."""

from __future__ import annotations

import torch

# Attention implementations whose kernels skip the work between packed sequences; for
# the others (sdpa, eager) packing is exact but computes a full square mask, so it is
# only used when asked for.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def use_packing(padding_free: bool | None, attn_implementation: str | None) -> bool:
    """--padding-free as given, else on where the attention kernel makes it pay."""
    if padding_free is not None:
        return padding_free
    return attn_implementation in VARLEN_ATTENTION


def padded(prompts: list[list[int]], completions: list[list[int]],
           pad_id: int) -> dict[str, torch.Tensor | int]:
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    score = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompts, strict=True)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
        score[i, len(p):len(s)] = True
    rows = torch.arange(len(seqs))[:, None]
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": torch.arange(width).expand(len(seqs), width),
            "score_mask": score, "seq_index": rows.expand(len(seqs), width),
            "num_seqs": len(seqs)}


def packed(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor | int]:
    ids, positions, score, index = [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        ids += p + c
        positions += range(n)
        score += [False] * len(p) + [True] * len(c)
        index += [i] * n
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "score_mask": torch.tensor([score], dtype=torch.bool),
            "seq_index": torch.tensor([index], dtype=torch.long),
            "num_seqs": len(prompts)}
