"""Page pool accounting: reservations, release on remove, sliding-window release, fork."""

import pytest
import torch

from attnforge.errors import InputError
from attnforge.generation.paged_kv import PagedKVCache


def _cache(num_pages=12, window=0, page=4):
    return PagedKVCache(num_layers=2, kv_heads=2, head_dim=3, num_pages=num_pages,
                        page_size=page, max_pages_per_seq=8, window=window)


def _kv(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, t, 3, generator=g), torch.randn(2, 2, t, 3, generator=g)


def test_write_and_read_back_through_page_table():
    c = _cache()
    c.add_sequence(7, 10)
    k, v = _kv(6, 0)
    c.write(7, k, v, 0)
    k1, v1 = _kv(1, 1)
    c.write_rows([7], k1[:, None, :, 0], v1[:, None, :, 0])
    table = c.page_table_row(7)
    assert len(table) == 8 and c.lengths[7] == 7
    for pos in range(7):
        page, slot = table[pos // 4], pos % 4
        want_k = k[:, :, pos] if pos < 6 else k1[:, :, 0]
        want_v = v[:, :, pos] if pos < 6 else v1[:, :, 0]
        assert torch.equal(c.k[:, page, :, :, slot], want_k)
        assert torch.equal(c.v[:, page, :, slot, :], want_v)


def test_thousand_add_remove_cycles_restore_free_pages():
    c = _cache()
    start = c.free_pages
    for i in range(1000):
        c.add_sequence(i, 1 + i % 30)
        k, v = _kv(1 + i % 17, i)
        c.write(i, k, v, 0)
        if i % 3 == 0:
            c.write_rows([i], k[:, None, :, 0], v[:, None, :, 0])
        c.remove_sequence(i)
    assert c.free_pages == start == 12


def test_reservation_refuses_what_cannot_fit():
    c = _cache(num_pages=4)
    c.add_sequence(0, 12)  # 3 pages reserved
    assert c.free_pages == 1
    with pytest.raises(InputError, match="KV cache full"):
        c.add_sequence(1, 8)
    c.remove_sequence(0)
    assert c.free_pages == 4


def test_sliding_window_keeps_memory_bounded():
    c = _cache(num_pages=6, window=6)
    c.add_sequence(0, 1000)  # a window model reserves ceil(W/S)+1 pages, not 250
    assert c.free_pages == 6 - 3
    k, v = _kv(5, 0)
    c.write(0, k, v, 0)
    for t in range(200):
        k1, v1 = _kv(1, t)
        c.write_rows([0], k1[:, None, :, 0], v1[:, None, :, 0])
        assert c.held_pages(0) <= 3
        # every position the next query can see is still held
        lo = c.lengths[0] + 1 - 6
        visible = range(max(lo, 0), c.lengths[0])
        assert all(c.tables[0][p // 4] >= 0 for p in visible)
    c.remove_sequence(0)
    assert c.free_pages == 6


def test_fork_shares_full_pages_and_copies_the_partial_one():
    c = _cache()
    c.add_sequence(0, 12)
    k, v = _kv(6, 0)
    c.write(0, k, v, 0)  # pages: one full, one with 2 of 4 slots
    c.fork(0, 1, 12)
    assert c.tables[1][0] == c.tables[0][0]
    assert c.tables[1][1] != c.tables[0][1]
    assert torch.equal(c.k[:, c.tables[1][1]], c.k[:, c.tables[0][1]])
    k1, v1 = _kv(1, 5)
    c.write_rows([1], k1[:, None, :, 0], v1[:, None, :, 0])  # leaves the parent's page alone
    assert not torch.equal(c.k[:, c.tables[1][1]], c.k[:, c.tables[0][1]])
    before = c.free_pages
    c.remove_sequence(0)  # the shared page stays (the child holds it)
    assert c.tables[1][0] not in c._free
    c.remove_sequence(1)
    assert c.free_pages == 12 and before < 12
