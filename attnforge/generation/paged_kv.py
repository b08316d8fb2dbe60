"""Paged KV cache: one pool of fixed-size pages for all sequences, a page table per sequence.

The pool (``K[L, P, KVH, D, S]`` keys transposed inside a page, ``V[L, P, KVH, S, D]``) is
allocated once; sequences take pages from a free list as they grow and give them back when
they finish, are removed, or (sliding-window models) when a page falls entirely out of the
window (so a windowed sequence holds at most ``ceil(W / S) + 1`` pages however long it runs).
Pages are reference counted so that :meth:`PagedKVCache.fork` can share a prefix; the
partially filled last page is copied (copy-on-write at fork time).

Reservations: a request reserves its worst-case page count when it is admitted, so a running
request can never run out of pages mid-generation (``free_pages`` counts unreserved pages).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError


class PagedKVCache:
    def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, num_pages: int,
                 page_size: int, max_pages_per_seq: int, window: int = 0,
                 dtype=torch.float32):
        self.num_pages, self.page_size, self.window = num_pages, page_size, int(window)
        self.max_pages_per_seq = max_pages_per_seq
        self.k = torch.zeros(num_layers, num_pages, kv_heads, head_dim, page_size, dtype=dtype)
        self.v = torch.zeros(num_layers, num_pages, kv_heads, page_size, head_dim, dtype=dtype)
        # Host-side writes go through numpy views of the same memory: numpy's fancy-index
        # assignment is single-threaded, torch's ``index_put`` wakes torch's OpenMP pool, whose
        # spinning threads then fought TVM's pool for the 2 cores (decode steps ran 2x slower
        # at random).
        self._k_np, self._v_np = self.k.numpy(), self.v.numpy()
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._reserved = 0
        self.tables: dict[int, list[int]] = {}  # seq -> physical page per logical page (-1: freed)
        self.lengths: dict[int, int] = {}  # seq -> tokens written
        self._reservation: dict[int, int] = {}  # seq -> pages still reserved (not yet taken)

    # -- accounting ---------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        """Pages neither in use nor reserved by an admitted sequence."""
        return len(self._free) - self._reserved

    def pages_for(self, total_tokens: int) -> int:
        """Worst-case pages a sequence of ``total_tokens`` holds at once."""
        n = math.ceil(total_tokens / self.page_size)
        if self.window:
            n = min(n, math.ceil(self.window / self.page_size) + 1)
        return n

    def add_sequence(self, seq: int, total_tokens: int) -> None:
        need = self.pages_for(total_tokens)
        if need > self.free_pages:
            raise InputError(f"KV cache full: the request needs {need} pages of "
                             f"{self.page_size} tokens, {self.free_pages} are free; remove "
                             "finished requests or build the generator with more num_pages")
        self.tables[seq], self.lengths[seq] = [], 0
        self._reservation[seq] = need
        self._reserved += need

    def remove_sequence(self, seq: int) -> None:
        for p in self.tables.pop(seq):
            if p >= 0:
                self._unref(p)
        self._reserved -= self._reservation.pop(seq)
        del self.lengths[seq]

    def fork(self, parent: int, child: int, total_tokens: int) -> None:
        """``child`` continues from ``parent``'s cached tokens: full pages are shared,
        the partially filled last page is copied."""
        self.add_sequence(child, total_tokens)
        table, n = list(self.tables[parent]), self.lengths[parent]
        for i, p in enumerate(table):
            if p < 0:
                continue
            if n % self.page_size and i == len(table) - 1:
                q = self._take(child)
                self._k_np[:, q] = self._k_np[:, p]
                self._v_np[:, q] = self._v_np[:, p]
                table[i] = q
            else:
                self._refs[p] += 1
        self.tables[child], self.lengths[child] = table, n

    def _take(self, seq: int) -> int:
        if self._reservation[seq] > 0:
            self._reservation[seq] -= 1
            self._reserved -= 1
        elif self.free_pages <= 0:  # beyond the reservation (a shared page was released)
            raise InputError("KV cache full while growing a sequence")
        p = self._free.pop()
        self._refs[p] = 1
        return p

    def _unref(self, p: int) -> None:
        self._refs[p] -= 1
        if self._refs[p] == 0:
            self._free.append(p)

    # -- writes -------------------------------------------------------------------------
    def _slots(self, seq: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Physical (page, slot) of positions [start, stop), allocating pages as needed."""
        table, s = self.tables[seq], self.page_size
        while len(table) * s < stop:
            table.append(-1)
        for i in range(start // s, -(-stop // s)):
            if table[i] < 0:
                table[i] = self._take(seq)
        pos = np.arange(start, stop)
        return np.asarray(table, dtype=np.int64)[pos // s], pos % s

    def write(self, seq: int, k, v, first: int) -> None:
        """Store K/V ``[L, KVH, T, D]`` of positions ``[first, first + T)`` of ``seq``
        (positions that the window can no longer see are skipped); numpy arrays or CPU torch
        tensors."""
        n = first + k.shape[2]
        keep = max(first, n + 1 - self.window) if self.window else first
        if keep < n:
            pages, slots = self._slots(seq, keep, n)
            k = np.asarray(k)[:, :, keep - first:]
            v = np.asarray(v)[:, :, keep - first:]
            self._k_np[:, pages, :, :, slots] = k.transpose(2, 0, 1, 3)
            self._v_np[:, pages, :, slots, :] = v.transpose(2, 0, 1, 3)
        self.lengths[seq] = n
        self._drop_out_of_window(seq)

    def write_rows(self, seqs: list[int], k, v) -> None:
        """One new token per sequence: ``k``/``v`` ``[L, len(seqs), KVH, D]`` (numpy or CPU
        torch)."""
        pages, slots = [], []
        for seq in seqs:
            p, s = self._slots(seq, self.lengths[seq], self.lengths[seq] + 1)
            pages.append(p)
            slots.append(s)
        pages_a, slots_a = np.concatenate(pages), np.concatenate(slots)
        self._k_np[:, pages_a, :, :, slots_a] = np.asarray(k).transpose(1, 0, 2, 3)
        self._v_np[:, pages_a, :, slots_a, :] = np.asarray(v).transpose(1, 0, 2, 3)
        for seq in seqs:
            self.lengths[seq] += 1
            self._drop_out_of_window(seq)

    def _drop_out_of_window(self, seq: int) -> None:
        """Release pages no future query of ``seq`` can see (all positions < next window
        start ``n + 1 - W``, the next query being at position ``n``)."""
        if not self.window:
            return
        lo = self.lengths[seq] + 1 - self.window
        table = self.tables[seq]
        for i in range(max(lo, 0) // self.page_size):
            if table[i] >= 0:
                self._unref(table[i])
                table[i] = -1
                self._reservation[seq] += 1  # the request may need it again later
                self._reserved += 1

    def page_table_row(self, seq: int) -> list[int]:
        table = [max(p, 0) for p in self.tables[seq]]
        return table + [0] * (self.max_pages_per_seq - len(table))

    def held_pages(self, seq: int) -> int:
        return sum(p >= 0 for p in self.tables[seq])
