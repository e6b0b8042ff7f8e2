"""Training data order: seeded per-epoch shuffles, length grouping that saves padding,
and micro-batches that split each global batch exactly once across processes."""

from __future__ import annotations

import numpy as np

from train.data import epoch_order, micro_batch_rows
from train.packing import packed, padded, use_packing


def padded_tokens(order, lengths, batch):
    batches = order.reshape(-1, batch)
    return int(sum(len(b) * lengths[b].max() for b in batches))


def test_epoch_order_is_seeded_and_changes_per_epoch():
    lengths = np.random.default_rng(0).integers(5, 500, size=103)
    a = epoch_order(lengths, epoch=0, seed=1, global_batch=8, group_by_length=False)
    assert len(a) == 96 and len(set(a.tolist())) == 96  # last partial batch dropped
    assert np.array_equal(a, epoch_order(lengths, 0, 1, 8, False))
    assert not np.array_equal(a, epoch_order(lengths, 1, 1, 8, False))
    assert not np.array_equal(a, epoch_order(lengths, 0, 2, 8, False))


def test_length_grouping_saves_padding_and_keeps_rows():
    lengths = np.random.default_rng(0).integers(5, 500, size=800)
    plain = epoch_order(lengths, 0, 1, 8, group_by_length=False)
    grouped = epoch_order(lengths, 0, 1, 8, group_by_length=True)
    assert sorted(grouped.tolist()) == sorted(plain.tolist())
    assert padded_tokens(grouped, lengths, 8) < 0.8 * padded_tokens(plain, lengths, 8)


def test_micro_batches_partition_each_global_batch():
    order = np.arange(48)
    seen = []
    for micro in range(2):
        for process in range(3):
            seen.extend(micro_batch_rows(order, 1, micro, process, per_device=4,
                                         accumulation=2, world=3).tolist())
    assert seen == list(range(24, 48))


def test_padded_layout_is_right_padded_so_no_query_row_is_fully_masked():
    out = padded([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert out["score_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert out["seq_index"].tolist() == [[0] * 5, [1] * 5] and out["num_seqs"] == 2
    # every row starts with a real token: a causal query row always sees itself
    assert out["attention_mask"][:, 0].all()


def test_packed_layout_is_one_row_with_restarting_positions():
    out = packed([[1, 2], [3]], [[4, 5, 6], [7]])
    assert out["input_ids"].tolist() == [[1, 2, 4, 5, 6, 3, 7]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert out["score_mask"].int().tolist() == [[0, 0, 1, 1, 1, 0, 1]]
    assert out["seq_index"].tolist() == [[0, 0, 0, 0, 0, 1, 1]] and out["num_seqs"] == 2
    assert "attention_mask" not in out  # transformers reads the boundaries from positions


def test_packing_is_used_where_the_attention_kernel_skips_between_sequences():
    assert use_packing(None, "flash_attention_2") and use_packing(None, "flex_attention")
    assert not use_packing(None, "sdpa") and not use_packing(None, None)
    assert use_packing(True, "sdpa") and not use_packing(False, "flash_attention_2")
