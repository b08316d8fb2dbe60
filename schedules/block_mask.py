"""Attention masks as data: the structure every layer of attnforge shares.

Two objects live here, at the bottom of the dependency graph so that kernels, passes,
frontends and the user-facing sparsity policies all import them downward:

``MaskSpec``
    What an attention site's mask *is*: ``full``, ``structured`` (a band on the diagonal
    offset ``d = (q + q_offset) - k`` and/or equal chunks, which covers causal top-left and
    bottom-right aligned, sliding windows left/right and chunked/local attention), ``static``
    (an arbitrary boolean array known at compile time) or ``dynamic`` (depends on run-time
    data, e.g. a padding ``attention_mask``; passed to the kernel as a tensor).

``BlockMask``
    FlexAttention's block-sparse layout: for every query block, the kv blocks to visit in
    ascending order, each flagged *full* (every in-range element allowed: no element mask
    needed) or *partial* (apply the element mask).  Blocks that are entirely masked are not
    listed and are never touched.  Ragged tails (lengths that are not multiples of the block
    size) are the kernel's business: ``full`` only speaks about in-range elements.

The element rule "allowed" is always True = attend, matching PyTorch's boolean masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["MaskSpec", "BlockMask"]

_KINDS = ("full", "structured", "static", "dynamic")


@dataclass(frozen=True)
class MaskSpec:
    """Structured description of an attention mask (see module docstring).

    For ``kind == "structured"`` an element ``(q, k)`` is allowed iff, with
    ``d = q + q_offset - k``: ``min_diff <= d`` (when set), ``d <= max_diff`` (when set) and
    ``(q + q_offset) // chunk == k // chunk`` (when ``chunk`` is set).
    """

    kind: str
    q_offset: int = 0
    min_diff: Optional[int] = None
    max_diff: Optional[int] = None
    chunk: Optional[int] = None
    # bool [Hm, Nq, Nk] with Hm == 1 (shared by all heads) or Hm == num_heads.
    static_mask: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"MaskSpec.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "static":
            m = self.static_mask
            if m is None or m.dtype != np.bool_ or m.ndim != 3:
                raise ValueError("MaskSpec(kind='static') needs a bool static_mask [Hm, Nq, Nk]")
        if self.chunk is not None and self.chunk <= 0:
            raise ValueError(f"MaskSpec.chunk must be positive, got {self.chunk}")

    # ----------------------------------------------------------------- constructors
    @staticmethod
    def full() -> "MaskSpec":
        return MaskSpec("full")

    @staticmethod
    def causal(q_offset: int = 0) -> "MaskSpec":
        """Causal mask; ``q_offset = kv_len - q_len`` gives PyTorch's bottom-right alignment."""
        return MaskSpec("structured", q_offset=q_offset, min_diff=0)

    @staticmethod
    def sliding_window(left: int, right: Optional[int] = 0, q_offset: int = 0) -> "MaskSpec":
        """Attend to keys ``q - left .. q + right`` (``right=0``: causal window of ``left+1``)."""
        if left is not None and left < 0 or right is not None and right < 0:
            raise ValueError(f"sliding window sizes must be >= 0, got left={left} right={right}")
        return MaskSpec(
            "structured",
            q_offset=q_offset,
            min_diff=None if right is None else -right,
            max_diff=left,
        )

    @staticmethod
    def chunked(chunk: int, causal: bool = False, q_offset: int = 0) -> "MaskSpec":
        """Tokens attend within their own chunk of ``chunk`` positions (optionally causal)."""
        return MaskSpec("structured", q_offset=q_offset, chunk=chunk, min_diff=0 if causal else None)

    @staticmethod
    def static(mask: np.ndarray) -> "MaskSpec":
        m = np.asarray(mask, dtype=np.bool_)
        if m.ndim == 2:
            m = m[None]
        return MaskSpec("static", static_mask=np.ascontiguousarray(m))

    @staticmethod
    def dynamic() -> "MaskSpec":
        return MaskSpec("dynamic")

    # ----------------------------------------------------------------- queries
    @property
    def is_causal(self) -> bool:
        return self.kind == "structured" and self.min_diff == 0 and self.max_diff is None and (
            self.chunk is None
        )

    def describe(self) -> str:
        """Short human-readable name, used in ``cm.report``."""
        if self.kind == "full":
            return "full"
        if self.kind == "dynamic":
            return "dense data-dependent"
        if self.kind == "static":
            return f"static block-sparse {tuple(self.static_mask.shape)}"
        align = f", q_offset={self.q_offset}" if self.q_offset else ""
        if self.chunk is not None:
            c = " causal" if self.min_diff == 0 else ""
            return f"chunked({self.chunk}{c}{align})"
        if self.is_causal:
            return "causal (bottom-right)" if self.q_offset else "causal"
        left = "inf" if self.max_diff is None else self.max_diff
        right = "inf" if self.min_diff is None else -self.min_diff
        return f"sliding_window(left={left}, right={right}{align})"

    def allowed(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Element rule for ``structured``/``full`` masks on broadcastable index arrays."""
        if self.kind == "full":
            return np.ones(np.broadcast(q, k).shape, dtype=np.bool_)
        if self.kind != "structured":
            raise ValueError(f"allowed() is only defined for structured masks, not {self.kind!r}")
        qo = q + self.q_offset
        ok = np.ones(np.broadcast(q, k).shape, dtype=np.bool_)
        if self.min_diff is not None:
            ok &= (qo - k) >= self.min_diff
        if self.max_diff is not None:
            ok &= (qo - k) <= self.max_diff
        if self.chunk is not None:
            ok &= (qo // self.chunk) == (k // self.chunk)
        return ok

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """The mask as a bool array ``[Hm, q_len, kv_len]`` (reference / small sizes only)."""
        if self.kind == "dynamic":
            raise ValueError("a dynamic (data-dependent) mask has no compile-time dense form")
        if self.kind == "static":
            m = self.static_mask
            if m.shape[1:] != (q_len, kv_len):
                raise ValueError(f"static mask has shape {m.shape}, expected [*, {q_len}, {kv_len}]")
            return m
        q = np.arange(q_len)[:, None]
        k = np.arange(kv_len)[None, :]
        return self.allowed(q, k)[None]


@dataclass(frozen=True)
class BlockMask:
    """Block-sparse iteration layout consumed by the fused attention kernels.

    Arrays (all int32, leading dim ``Hm`` is 1 when every head shares the layout):
    ``kv_num_blocks[Hm, nqb]``, ``kv_indices[Hm, nqb, max_blocks]`` (ascending, padded with
    the last valid index) and ``kv_is_full[Hm, nqb, max_blocks]`` (1: no element mask).
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kv_num_blocks: np.ndarray = field(repr=False)
    kv_indices: np.ndarray = field(repr=False)
    kv_is_full: np.ndarray = field(repr=False)

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @property
    def max_blocks(self) -> int:
        return int(self.kv_indices.shape[-1])

    @property
    def visited_fraction(self) -> float:
        """Fraction of (query block, kv block) pairs the kernel computes."""
        total = self.kv_num_blocks.shape[0] * self.num_q_blocks * self.num_kv_blocks
        return float(self.kv_num_blocks.sum()) / max(total, 1)

    @property
    def partial_fraction(self) -> float:
        """Fraction of visited blocks that need the element mask."""
        visited = float(self.kv_num_blocks.sum())
        n = self.kv_num_blocks[..., None] > np.arange(self.max_blocks)
        partial = float(((self.kv_is_full == 0) & n).sum())
        return partial / max(visited, 1.0)

    def visited_elements(self) -> int:
        """(query, key) pairs inside visited blocks, clipped to the real lengths, summed over Hm."""
        total = 0
        for h in range(self.kv_num_blocks.shape[0]):
            for qb in range(self.num_q_blocks):
                rows = min(self.block_q, self.q_len - qb * self.block_q)
                for j in range(int(self.kv_num_blocks[h, qb])):
                    kb = int(self.kv_indices[h, qb, j])
                    total += rows * min(self.block_kv, self.kv_len - kb * self.block_kv)
        return total

    def to_dense(self) -> np.ndarray:
        """Bool ``[Hm, Nq, Nk]``: True where the element lies in a visited block."""
        hm = self.kv_num_blocks.shape[0]
        out = np.zeros((hm, self.q_len, self.kv_len), dtype=np.bool_)
        for h in range(hm):
            for qb in range(self.num_q_blocks):
                for j in range(int(self.kv_num_blocks[h, qb])):
                    kb = int(self.kv_indices[h, qb, j])
                    out[h, qb * self.block_q : (qb + 1) * self.block_q,
                        kb * self.block_kv : (kb + 1) * self.block_kv] = True
        return out

    # ----------------------------------------------------------------- builders
    @staticmethod
    def _from_states(state: np.ndarray, q_len, kv_len, block_q, block_kv) -> "BlockMask":
        """``state[Hm, nqb, nkb]``: 0 empty, 1 partial, 2 full."""
        hm, nqb, _ = state.shape
        num = (state > 0).sum(-1).astype(np.int32)
        width = max(int(num.max()) if num.size else 0, 1)
        idx = np.zeros((hm, nqb, width), dtype=np.int32)
        full = np.zeros((hm, nqb, width), dtype=np.int32)
        for h in range(hm):
            for qb in range(nqb):
                nz = np.nonzero(state[h, qb])[0].astype(np.int32)
                if nz.size:
                    idx[h, qb, : nz.size] = nz
                    idx[h, qb, nz.size :] = nz[-1]
                    full[h, qb, : nz.size] = state[h, qb, nz] == 2
        return BlockMask(q_len, kv_len, block_q, block_kv, num, idx, full)

    @staticmethod
    def from_dense(mask: np.ndarray, block_q: int, block_kv: int) -> "BlockMask":
        """Layout of a bool mask ``[Hm, Nq, Nk]`` (or ``[Nq, Nk]``)."""
        m = np.asarray(mask, dtype=np.bool_)
        if m.ndim == 2:
            m = m[None]
        if block_q <= 0 or block_kv <= 0:
            raise ValueError(f"block sizes must be positive, got {block_q}x{block_kv}")
        hm, nq, nk = m.shape
        nqb, nkb = -(-nq // block_q), -(-nk // block_kv)
        pad = np.zeros((hm, nqb * block_q, nkb * block_kv), dtype=np.int8)
        valid = np.zeros_like(pad)
        pad[:, :nq, :nk] = m
        valid[:, :nq, :nk] = 1
        shape = (hm, nqb, block_q, nkb, block_kv)
        n_allowed = pad.reshape(shape).sum(axis=(2, 4))
        n_valid = valid.reshape(shape).sum(axis=(2, 4))
        state = np.where(n_allowed == 0, 0, np.where(n_allowed == n_valid, 2, 1))
        return BlockMask._from_states(state, nq, nk, block_q, block_kv)

    @staticmethod
    def from_spec(spec: MaskSpec, q_len: int, kv_len: int, block_q: int, block_kv: int,
                  num_heads: int = 1) -> "BlockMask":
        """Layout for a compile-time mask; ``dynamic`` masks visit every block (partial)."""
        if spec.kind == "static":
            return BlockMask.from_dense(spec.dense(q_len, kv_len), block_q, block_kv)
        nqb, nkb = -(-q_len // block_q), -(-kv_len // block_kv)
        if spec.kind == "dynamic":
            state = np.ones((1, nqb, nkb), dtype=np.int8)
            return BlockMask._from_states(state, q_len, kv_len, block_q, block_kv)
        if spec.kind == "full":
            state = np.full((1, nqb, nkb), 2, dtype=np.int8)
            return BlockMask._from_states(state, q_len, kv_len, block_q, block_kv)
        # Structured: classify each block from its corner ranges (exact for band and chunk
        # separately; a block that passes both but where they never overlap is visited as
        # partial, which is correct, only conservative).
        q0 = np.arange(nqb)[:, None] * block_q + spec.q_offset
        q1 = np.minimum(np.arange(nqb)[:, None] * block_q + block_q, q_len) - 1 + spec.q_offset
        k0 = np.arange(nkb)[None, :] * block_kv
        k1 = np.minimum(np.arange(nkb)[None, :] * block_kv + block_kv, kv_len) - 1
        dmin, dmax = q0 - k1, q1 - k0
        empty = np.zeros((nqb, nkb), dtype=bool)
        full = np.ones((nqb, nkb), dtype=bool)
        if spec.min_diff is not None:
            empty |= dmax < spec.min_diff
            full &= dmin >= spec.min_diff
        if spec.max_diff is not None:
            empty |= dmin > spec.max_diff
            full &= dmax <= spec.max_diff
        if spec.chunk is not None:
            c = spec.chunk
            qc0, qc1 = q0 // c, q1 // c
            kc0, kc1 = k0 // c, k1 // c
            empty |= (qc1 < kc0) | (kc1 < qc0)
            full &= (qc0 == qc1) & (kc0 == kc1) & (qc0 == kc0)
        state = np.where(empty, 0, np.where(full, 2, 1)).astype(np.int8)[None]
        return BlockMask._from_states(state, q_len, kv_len, block_q, block_kv)
