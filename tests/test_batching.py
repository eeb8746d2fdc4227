"""The order of a run's examples and their batch tensors (`overfill/batching.py`)."""
import pytest
import torch

from overfill.batching import batch_plan, collate, collate_split, length_groups, padding_fraction
from overfill.data import Example


def test_length_groups_regroup_within_windows_deterministically():
    plan = list(range(32))
    keys = [((7 * i) % 32, 0) for i in range(32)]
    grouped = length_groups(plan, keys, per_step=4, window=4, seed=0)
    assert grouped == length_groups(plan, keys, per_step=4, window=4, seed=0)
    assert length_groups(plan, keys, per_step=4, window=0, seed=0) == plan
    for start in (0, 16):  # each window keeps its examples
        assert sorted(grouped[start:start + 16]) == plan[start:start + 16]
    batches = [grouped[i:i + 4] for i in range(0, 32, 4)]
    spread = [max(keys[i][0] for i in b) - min(keys[i][0] for i in b) for b in batches]
    assert max(spread) < 16  # grouped by length: random batches of this plan span ~the whole range


def test_batch_plan_epochs_and_token_budget():
    lengths = [10, 20, 30, 40, 50]
    plan = batch_plan(lengths, per_step=2, seed=0, steps=5)
    assert len(plan) == 10 and sorted(plan[:5]) == [0, 1, 2, 3, 4] and sorted(plan[5:]) == [0, 1, 2, 3, 4]
    assert plan == batch_plan(lengths, per_step=2, seed=0, steps=5)
    assert plan != batch_plan(lengths, per_step=2, seed=1, steps=5)
    budget = batch_plan(lengths, per_step=2, seed=0, tokens=200)
    seen = [sum(lengths[i] for i in budget[:k]) for k in range(0, len(budget) + 1, 2)]
    assert seen[-1] >= 200 > seen[-2] and budget == plan[:len(budget)]


def test_collate_masks():
    examples = [Example([1, 2, 3], [4, 5], "a"), Example([6], [7, 8, 9], "b")]
    batch = collate(examples, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["targets"].tolist() == [[2, 3, 4, 5, 0], [7, 8, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True] * 4 + [False]]
    assert batch["prompt_mask"].tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4]
    # positions whose target is a response token: the last prompt token predicts the first response token
    assert batch["loss_mask"].tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    for row, e in enumerate(examples):
        assert batch["targets"][row][batch["loss_mask"][row]].tolist() == e.response_ids
    assert batch["tokens"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool


def test_collate_split_layout_and_padding_fraction():
    batch = collate_split([Example([5, 6, 7], [9, 10], "a"), Example([8], [11, 12, 13], "b")], pad_id=0)
    assert batch["prompt_tokens"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["prompt_valid"].tolist() == [[True] * 3, [False, False, True]]
    assert batch["response_tokens"].tolist() == [[9, 10, 0], [11, 12, 13]]
    assert batch["response_valid"].tolist() == [[True, True, False], [True] * 3]
    assert padding_fraction(batch) == pytest.approx(3 / 12)
