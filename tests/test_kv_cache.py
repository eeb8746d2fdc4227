import pytest
import torch

from overfill.kv_cache import KVCache


def numbered(batch=3, max_len=6, layers=2, heads=2, head_dim=4) -> KVCache:
    """A cache whose every K/V value says where it is: 1000*row + 10*slot + layer (V negated)."""
    cache = KVCache(layers, batch, heads, max_len, head_dim)
    for layer in range(layers):
        value = (1000 * torch.arange(batch)[:, None] + 10 * torch.arange(max_len)[None] + layer).float()  # [B, S]
        cache.k[layer][:] = value[:, None, :, None]
        cache.v[layer][:] = -value[:, None, :, None]
    cache.valid[:] = torch.arange(max_len)[None] >= (torch.arange(batch) % 3)[:, None]  # left padding
    return cache


def tag(cache: KVCache, layer=0) -> torch.Tensor:
    """The `[B, S]` tags of a layer's keys."""
    return cache.k[layer][:, 0, :, 0]


def test_first_rows_and_first_slots_are_views_that_a_step_writes_through():
    cache = numbered()
    rows, slots = cache.first_rows(2), cache.first_slots(4)
    assert rows.shape == (2, 2, 6, 4) and slots.shape == (3, 2, 4, 4)
    rows.update(0, torch.tensor([5]), torch.full((2, 2, 1, 4), 7.0), torch.zeros(2, 2, 1, 4))
    assert tag(cache)[:2, 5].tolist() == [7.0, 7.0] and tag(cache)[2, 5] == 2050
    slots.valid[0, 0] = False
    assert not cache.valid[0, 0]


def test_take_rows_copies_repeated_rows_into_a_longer_cache():
    cache = numbered()
    taken = cache.take_rows(torch.tensor([2, 0, 2]), max_len=9)
    assert taken.shape == (3, 2, 9, 4)
    assert tag(taken)[:, :6].tolist() == [[2000 + 10 * s for s in range(6)], [10 * s for s in range(6)],
                                          [2000 + 10 * s for s in range(6)]]
    assert tag(taken, layer=1)[1, 3] == 31 and taken.v[1][1, 0, 3, 0] == -31
    assert taken.valid[:, :6].tolist() == [cache.valid[2].tolist(), cache.valid[0].tolist(), cache.valid[2].tolist()]
    assert not taken.valid[:, 6:].any() and not tag(taken)[:, 6:].any()
    taken.k[0].zero_()
    assert tag(cache)[2, 1] == 2010  # a copy, not a view
    with pytest.raises(ValueError, match="shorter"):
        cache.take_rows(torch.tensor([0]), max_len=3)


def test_grown_keeps_every_row_and_adds_empty_slots():
    cache = numbered()
    grown = cache.grown(10)
    assert grown.max_len == 10 and torch.equal(tag(grown)[:, :6], tag(cache))
    assert torch.equal(grown.valid[:, :6], cache.valid) and not grown.valid[:, 6:].any()


def test_write_rows_places_a_prefill_right_aligned_and_invalidates_the_rest():
    cache, scratch = numbered(batch=4), numbered(batch=2, max_len=3)
    scratch.valid[:] = torch.tensor([[False, True, True], [True, True, True]])
    cache.write_rows(slice(2, 4), end=5, other=scratch, picks=torch.tensor([1, 0]))
    assert tag(cache)[2, 2:5].tolist() == [1000, 1010, 1020] and tag(cache)[3, 2:5].tolist() == [0, 10, 20]
    assert cache.valid[2].tolist() == [False, False, True, True, True, False]
    assert cache.valid[3].tolist() == [False, False, False, True, True, False]
    assert tag(cache)[1].tolist() == [1000 + 10 * s for s in range(6)]  # other rows untouched


@pytest.mark.parametrize("start,stop,to", [(3, 6, 1), (1, 4, 2), (2, 5, 0)])
def test_move_slots_moves_live_columns_and_invalidates_the_others(start, stop, to):
    cache = numbered()
    before_k, before_valid = tag(cache).clone(), cache.valid.clone()
    cache.move_slots(2, start, stop, to)
    width = stop - start
    assert torch.equal(tag(cache)[:2, to:to + width], before_k[:2, start:stop])  # overlapping ranges too
    assert torch.equal(cache.valid[:2, to:to + width], before_valid[:2, start:stop])
    assert not cache.valid[:2, :to].any() and not cache.valid[:2, to + width:].any()
    assert torch.equal(tag(cache)[2], before_k[2]) and torch.equal(cache.valid[2], before_valid[2])  # row 2 is not live


def test_copy_row_copies_the_first_slots_only():
    cache = numbered()
    cache.copy_row(2, 0, slots=4)
    assert tag(cache)[0].tolist() == [2000, 2010, 2020, 2030, 40, 50]
    assert cache.v[1][0, 1, 3, 2] == -2031
    assert cache.valid[0, :4].tolist() == cache.valid[2, :4].tolist()


def test_select_layers_is_the_zero_copy_hand_off():
    cache = KVCache(4, 1, 2, 5, 4)
    view = cache.select_layers([0, 2, 3])
    assert len(view.k) == 3 and view.k[1] is cache.k[2] and view.valid is cache.valid
    assert cache.select_layers(None) is cache
    assert cache.bytes_per_token() == 2 * 4 * 2 * 4 * 4
