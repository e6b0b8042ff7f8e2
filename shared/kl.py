"""KL partners (spec section 2): a seeded random derangement of one shard's rows,
with the partner's prompt different from the row's whenever the shard allows it.

Shard-local and seeded by (seed, shard index), so any split of the work over
workers gives the same partners."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def kl_partners(prompt_keys: Sequence[Hashable], seed: int, shard_index: int) -> list[int]:
    """Return ``partner[i]`` for each row i of a shard (needs at least 2 rows).

    1. A random cyclic shift of a random permutation: a derangement, and each
       completion is used exactly once as someone's KL completion.
    2. Rows whose partner shares their prompt swap partners with a random row
       where the swap fixes both sides (keeps it a permutation).
    3. Rows still matched (one prompt covers over half the shard) take any random
       row with a different prompt; only if every row shares one prompt does the
       partner keep the same prompt (it is still never the row itself).
    """
    n = len(prompt_keys)
    if n < 2:
        raise ValueError(f"a shard needs at least 2 rows for KL pairing, got {n}")
    rng = np.random.default_rng([seed, shard_index])
    keys = [hash_key(k) for k in prompt_keys]
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    if len(set(keys)) > 1:  # with one prompt for the whole shard any derangement will do
        _swap_repair(partner, keys, rng)
        _fallback(partner, keys, rng)
    return partner.tolist()


def hash_key(key: Hashable) -> Hashable:
    return tuple(key) if isinstance(key, list) else key


def _bad(i: int, partner: np.ndarray, keys: list) -> bool:
    return keys[partner[i]] == keys[i]


def _swap_repair(partner: np.ndarray, keys: list, rng: np.random.Generator) -> None:
    n = len(keys)
    for i in rng.permutation(n):
        if not _bad(i, partner, keys):
            continue
        for k in rng.permutation(n):
            a, b = partner[i], partner[k]  # after the swap: i -> b, k -> a
            if k != i and b != i and a != k and keys[b] != keys[i] and keys[a] != keys[k]:
                partner[i], partner[k] = b, a
                break


def _fallback(partner: np.ndarray, keys: list, rng: np.random.Generator) -> None:
    for i in range(len(keys)):
        if _bad(i, partner, keys):
            others = [j for j in range(len(keys)) if keys[j] != keys[i]]
            if others:
                partner[i] = others[int(rng.integers(len(others)))]
