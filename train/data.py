"""The cache as training data: verified and fingerprint-checked before the first step,
spilled once into a memory-mapped Arrow file (random access without holding rows as
Python objects), ordered per epoch by the seed, sliced per process, padded per batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from shared.cache import verify_cache
from shared.errors import CacheError, writing
from shared.fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)
COLUMNS = ("id", "label", "prompt_ids", "completion_ids", "kl_completion_ids", "ref_logps",
           "ref_kl_logps")
_MEGABATCH = 50  # length grouping sorts within windows of 50 global batches (as HF does)


@dataclass
class CacheRows:
    table: pa.Table
    manifest: dict[str, Any]
    lengths: np.ndarray  # prompt + completion tokens per row

    def __len__(self) -> int:
        return self.table.num_rows


def open_cache(directory: str, tokenizer: Any, spill: Path) -> CacheRows:
    """Verify checksums and the tokenizer fingerprint, then map the rows."""
    manifest = verify_cache(directory, checksums=True)
    mine, theirs = tokenizer_fingerprint(tokenizer), manifest["tokenizer"]["fingerprint"]
    if mine != theirs:
        raise CacheError(
            f"{directory} was tokenized with another tokenizer (cache fingerprint {theirs[:12]}, "
            f"policy tokenizer {mine[:12]}); rebuild the cache with the policy's tokenizer "
            "(kto-precompute --tokenizer) or pass the matching --tokenizer")
    with writing(spill, where="TMPDIR"), pa.OSFile(str(spill), "wb") as sink:
        writer = None
        for shard in manifest["shards"]:
            table = pq.read_table(Path(directory) / shard["name"], columns=list(COLUMNS))
            writer = writer or pa.ipc.new_file(sink, table.schema)
            writer.write_table(table)
        writer.close()
    table = pa.ipc.open_file(pa.memory_map(str(spill))).read_all()
    lengths = (pc.list_value_length(table["prompt_ids"]).to_numpy()
               + pc.list_value_length(table["completion_ids"]).to_numpy())
    return CacheRows(table, manifest, lengths)


def epoch_order(lengths: np.ndarray, epoch: int, seed: int, global_batch: int,
                group_by_length: bool) -> np.ndarray:
    """Row indices for one epoch: a seeded shuffle, then (optionally) sorted by length
    inside windows of 50 global batches, with those batches shuffled again so that
    long and short batches interleave. The last partial global batch is dropped."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    usable = len(order) - len(order) % global_batch
    if group_by_length:
        window = global_batch * _MEGABATCH
        chunks = [order[s:s + window] for s in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        batches = order[:usable].reshape(-1, global_batch)
        return batches[rng.permutation(len(batches))].reshape(-1)
    return order[:usable]


def micro_batch_rows(order: np.ndarray, step_in_epoch: int, micro: int, process: int,
                     per_device: int, accumulation: int, world: int) -> np.ndarray:
    """The rows of one process for one accumulation micro-step of one optimizer step."""
    global_batch = per_device * accumulation * world
    start = step_in_epoch * global_batch + (micro * world + process) * per_device
    return order[start:start + per_device]


def sequences(prompts: list[list[int]], completions: list[list[int]],
              pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt + completion (every completion ends at the last position, so
    the LM head is needed only on the last max(completion_len) + 1 positions), with
    explicit position ids and a mask on completion tokens only."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros_like(mask)
    for i, (s, c) in enumerate(zip(seqs, completions, strict=True)):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
        completion_mask[i, width - len(c):] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "completion_mask": completion_mask,
            "completion_len": torch.tensor([len(c) for c in completions], dtype=torch.long)}


def collate(rows: CacheRows, indices: np.ndarray, pad_id: int) -> dict[str, Any]:
    batch = rows.table.take(pa.array(indices)).to_pydict()
    return {
        "ids": batch["id"],
        "labels": torch.tensor(batch["label"], dtype=torch.bool),
        "ref_logps": torch.tensor(batch["ref_logps"], dtype=torch.float64),
        "ref_kl_logps": torch.tensor(batch["ref_kl_logps"], dtype=torch.float64),
        "completion_lengths": torch.tensor([len(c) for c in batch["completion_ids"]]),
        "target": sequences(batch["prompt_ids"], batch["completion_ids"], pad_id),
        "kl": sequences(batch["prompt_ids"], batch["kl_completion_ids"], pad_id),
    }
