"""KL partner rules: never itself, a different prompt when the shard allows it,
deterministic under a seed, a permutation where possible."""

from __future__ import annotations

import random

import pytest

from shared.kl import kl_partners


def prompts_for(n, n_prompts, rng):
    return [[rng.randrange(n_prompts)] for _ in range(n)]


@pytest.mark.parametrize("n,n_prompts", [(2, 2), (3, 3), (10, 5), (101, 50), (500, 250),
                                         (64, 2), (7, 7)])
def test_partner_is_never_self_and_has_another_prompt(n, n_prompts):
    rng = random.Random(n * 1000 + n_prompts)
    for trial in range(5):
        keys = prompts_for(n, n_prompts, rng)
        partner = kl_partners(keys, seed=trial, shard_index=0)
        assert len(partner) == n
        for i, j in enumerate(partner):
            assert j != i
            if any(k != keys[i] for k in keys):
                assert keys[j] != keys[i], f"row {i} paired with same prompt"


def test_chosen_rejected_pairs_never_pair_with_each_other():
    keys = [[i // 2] for i in range(200)]  # rows 2k and 2k+1 share a prompt (one pair)
    partner = kl_partners(keys, seed=1, shard_index=3)
    assert all(j // 2 != i // 2 for i, j in enumerate(partner))
    assert sorted(partner) == list(range(200)), "each completion used once as a KL completion"


def test_single_prompt_shard_still_never_pairs_a_row_with_itself():
    partner = kl_partners([[5]] * 9, seed=0, shard_index=0)
    assert all(j != i for i, j in enumerate(partner)) and sorted(partner) == list(range(9))


def test_dominant_prompt_rows_get_another_prompt_when_one_exists():
    keys = [[0]] * 9 + [[1]]  # only one row has a different prompt
    partner = kl_partners(keys, seed=0, shard_index=0)
    assert all(partner[i] == 9 for i in range(9)) and partner[9] != 9


def test_deterministic_under_seed_and_varies_with_seed_and_shard():
    keys = [[i] for i in range(50)]
    assert kl_partners(keys, 7, 2) == kl_partners(keys, 7, 2)
    assert kl_partners(keys, 7, 2) != kl_partners(keys, 8, 2)
    assert kl_partners(keys, 7, 2) != kl_partners(keys, 7, 3)


def test_one_row_cannot_be_paired():
    with pytest.raises(ValueError, match="at least 2 rows"):
        kl_partners([[1]], 0, 0)
