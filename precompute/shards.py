"""Shard planning and the scoring of one shard (KL partners + both sequences)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from precompute.scoring import Scorer
from shared.errors import ConfigError, RowScoreError
from shared.kl import kl_partners
from shared.tokenization import fit_completion
from shared.vision import VISION_COLUMNS


def shard_bounds(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: a function of row count and shard size only, so
    any number of workers sees the same shards. A last shard of one row (which could
    have no KL partner) is merged into the one before it."""
    if num_rows < 2:
        raise ConfigError(f"the data hold {num_rows} valid row(s); KTO's KL pairs need at "
                          "least 2")
    bounds = [(s, min(s + shard_size, num_rows)) for s in range(0, num_rows, shard_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], num_rows)]
    return bounds


def worker_shards(num_shards: int, num_workers: int, worker_index: int) -> list[int]:
    """Round-robin, so workers get near-equal work even when shards are few."""
    return [s for s in range(num_shards) if s % num_workers == worker_index]


def kl_completions(prompts: Sequence[list[int]], completions: Sequence[list[int]],
                   partners: Sequence[int], max_length: int) -> list[list[int]]:
    return [fit_completion(prompts[i], completions[j], max_length)
            for i, j in enumerate(partners)]


def pair_shard(rows: pa.Table, shard_index: int, seed: int, max_length: int) -> pa.Table:
    """Every column of a shard but the reference values: the rows with their KL partner
    and its completion cut to fit (a pure function of the rows, seed and shard index)."""
    prompts = rows["prompt_ids"].to_pylist()
    completions = rows["completion_ids"].to_pylist()
    ids = rows["id"].to_pylist()
    partners = kl_partners(prompts, seed, shard_index)
    return pa.table({
        "id": pa.array(ids, type=pa.string()),
        "source_index": rows["source_index"],
        "label": rows["label"],
        "prompt_ids": rows["prompt_ids"],
        "completion_ids": rows["completion_ids"],
        "kl_completion_ids": pa.array(kl_completions(prompts, completions, partners, max_length),
                                      type=pa.list_(pa.int32())),
        "kl_partner": pa.array([ids[j] for j in partners], type=pa.string()),
        # a KL sequence is its own row's prompt: its images stay the row's own
        **{c: rows[c] for c in VISION_COLUMNS if c in rows.column_names},
    })


def row_images(table: pa.Table) -> list[tuple[list[bytes], list[int], list[int]]]:
    """Per row: its images' encoded bytes and their spans (offsets, lengths) in the prompt."""
    return list(zip([[i["bytes"] for i in images] for images in table["images"].to_pylist()],
                    table["image_offsets"].to_pylist(), table["image_tokens"].to_pylist(),
                    strict=True))


def score_shard(rows: pa.Table, shard_index: int, seed: int, max_length: int,
                scorer: Scorer) -> pa.Table:
    """Pair every row with a KL partner and score target and KL sequences in one call
    (one scorer call lets it batch and sort all 2n sequences together)."""
    table = pair_shard(rows, shard_index, seed, max_length)
    prompts = table["prompt_ids"].to_pylist()
    n = table.num_rows
    pairs = (list(zip(prompts, table["completion_ids"].to_pylist(), strict=True))
             + list(zip(prompts, table["kl_completion_ids"].to_pylist(), strict=True)))
    try:
        if "images" in table.column_names:  # target and KL sequences share the row's images
            scores = scorer.score(pairs, images=2 * row_images(table))
        else:
            scores = scorer.score(pairs)
    except RowScoreError as err:
        row = table["id"][err.index % n].as_py()
        which = "KL" if err.index >= n else "target"
        raise RowScoreError(err.index, f"{err.reason}; no shard was written for it",
                            f"row {row!r} ({which} sequence) of shard {shard_index}") from None
    if not np.isfinite(scores).all():
        ids = table["id"].to_pylist()
        bad = [ids[i % n] for i in np.flatnonzero(~np.isfinite(scores))[:5]]
        raise ConfigError(f"the reference model gave non-finite log-probs for rows {bad}; "
                          "check the model weights and --dtype (float32 is the safe choice)")
    return (table.append_column("ref_logps", pa.array(scores[:n], type=pa.float64()))
            .append_column("ref_kl_logps", pa.array(scores[n:], type=pa.float64())))
