"""Padding waste of the transformers scorer on a cache's sequences: the share of padded
positions in the model body (length-sorted, token-budget batches) and the share of LM
head rows that were padding under ``logits_to_keep`` (the head on the last
max(completion) + 1 positions of every row), which the scorer no longer uses where the
head is plain. Counts only; runs no model.

    python benchmarks/padding.py runs/bench/scoring/cache-hf-0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from precompute.scoring.hf import CPU_BATCH_TOKENS, token_budget_batches  # noqa: E402
from shared.dataset import open_cache  # noqa: E402


def cache_pairs(cache: Path) -> list[tuple[list[int], list[int]]]:
    """Every (prompt, completion) the scorer sees: targets, then KL sequences."""
    t = open_cache(cache, columns=["prompt_ids", "completion_ids", "kl_completion_ids"])
    t = t.table.to_pydict()
    return [*zip(t["prompt_ids"], t["completion_ids"], strict=True),
            *zip(t["prompt_ids"], t["kl_completion_ids"], strict=True)]


def padding(pairs, batch_tokens: int) -> dict[str, int]:
    lengths = [len(p) + len(c) for p, c in pairs]
    n = {"body_positions": 0, "real_tokens": 0, "tail_head_rows": 0, "completion_tokens": 0}
    for batch in token_budget_batches(lengths, batch_tokens):
        k = max(len(pairs[i][1]) for i in batch)
        n["body_positions"] += len(batch) * max(lengths[i] for i in batch)
        n["real_tokens"] += sum(lengths[i] for i in batch)
        n["tail_head_rows"] += len(batch) * (k + 1)
        n["completion_tokens"] += sum(len(pairs[i][1]) for i in batch)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--batch-tokens", type=int, default=CPU_BATCH_TOKENS)
    args = ap.parse_args()
    n = padding(cache_pairs(args.cache), args.batch_tokens)
    body = 1 - n["real_tokens"] / n["body_positions"]
    head = 1 - n["completion_tokens"] / n["tail_head_rows"]
    print(json.dumps(n))
    print(f"model body: {100 * body:.1f}% of positions are padding")
    print(f"LM head with logits_to_keep: {100 * head:.1f}% of rows are padding or prompt; "
          f"head on completion positions only: 0%")


if __name__ == "__main__":
    main()
