"""CPU (llvm, AVX-512) schedule rule for matmul / batch-matmul PrimFuncs with fused epilogues.

What it matches: a PrimFunc with exactly one reduction block of the form
``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (any buffer layouts, e.g. ``[B.., M, K] x [K, N]``,
the transposed weight ``[N, K]``, batched ``[B, M, K] x [B, K, N]``; dlight's
``detect_iter_traits`` decides), a ``C = C + x * y`` update in float32, static extents except possibly M (the token count of
a model compiled with a symbolic sequence length), and
any number of spatial blocks around it (reshape prologues, bias / GELU / SiLU / residual /
multiply epilogues). Anything else returns ``None`` so the next rule can try.

Algorithm (one fixed template, no tuning):

1. Normalise the block to ``[S, I, J, K]`` (reindex + ``transform_block_layout``, as
   dlight's GPU ``Matmul``) and pad I, J to the register tile with ``pad_einsum`` so that
   sizes that do not divide the tile (M = 37, 100, N = 50 ...) need no predicates inside the
   micro-kernel.
2. Loops ``(s, jo) [parallel] -> io -> ii -> k -> mr [unrolled] -> nr [vectorised]``: an
   ``MR x NR`` accumulator tile (default 6 x 32 fp32, 12 zmm) lives in registers (a
   ``cache_write`` that LLVM promotes), the K loop is inside, the B column panel
   ``K x NR`` is packed once per parallel task (``cache_read`` + ``compute_at``) and reused by
   every row tile, so the inner loop is two aligned zmm loads, MR broadcasts and 2*MR FMAs.
   When there are too few ``(s, jo)`` tasks to feed the threads, M is split into chunks too.
3. Producers (reshapes, pad) are inlined into the matmul; the epilogue chain is inlined into
   the tile's write-back (``reverse_compute_at`` + ``reverse_compute_inline``), so bias and
   activations run on the tile while it is hot.
"""

from __future__ import annotations

import math

from tvm import ir, s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    _collect_producers,
    auto_inline_consumer_chain,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

__all__ = ["MatmulCPU"]


def _strip_cast(expr):
    return expr.value if isinstance(expr, tirx.Cast) else expr


def _is_mul_add_update(block: s_tir.SBlock) -> bool:
    """True if ``block`` is ``C[idx] = C[idx] + x * y`` with ``x, y`` buffer loads (maybe cast)."""
    body = block.body
    if not isinstance(body, tirx.stmt.BufferStore) or block.init is None:
        return False
    value = body.value
    if not isinstance(value, tirx.Add):
        return False
    lhs, rhs = value.a, value.b
    if isinstance(rhs, ir.TensorLoad) and isinstance(lhs, tirx.Mul):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, ir.TensorLoad) and lhs.source.same_as(body.buffer)):
        return False
    if not all(a.same_as(b) for a, b in zip(lhs.indices, body.indices)):
        return False
    if not isinstance(rhs, tirx.Mul):
        return False
    return all(isinstance(_strip_cast(x), ir.TensorLoad) for x in (rhs.a, rhs.b))


def _producer_of(sch: s_tir.Schedule, block, read_index: int):
    buf = sch.get(block).reads[read_index].source
    for producer in sch.get_producers(block):
        if sch.get(producer).writes[0].source.same_as(buf):
            return producer
    raise ValueError("no producer")


def _inline_producers(sch: s_tir.Schedule, block, keep: list) -> None:
    """Inline every (transitive) producer of ``block`` except the blocks in ``keep``."""
    kept = {sch.get(k).name_hint for k in keep}
    changed = True
    while changed:
        changed = False
        for producer in _collect_producers(sch, block):
            if sch.get(producer).name_hint in kept:
                continue
            try:
                sch.compute_inline(producer)
                changed = True
            except Exception:  # noqa: BLE001, S112 - not inlinable (e.g. a reduction): keep it
                continue


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _pick_tile(extent: int, candidates: tuple[tuple[int, float], ...]) -> int:
    """The ``(tile, efficiency)`` candidate with the least padded work ``ceil(e/t)*t/eff``."""
    smallest = min(t for t, _ in candidates)
    if extent <= smallest:
        return extent
    return min(candidates, key=lambda c: math.ceil(extent / c[0]) * c[0] / c[1])[0]


class MatmulCPU(ScheduleRule):
    """Register-tiled, B-packed, parallel matmul schedule for llvm targets.

    Parameters
    ----------
    mr, nr : preferred register tile (rows, fp32 columns; ``nr`` a multiple of 16 for zmm).
    num_tasks : minimum number of parallel tasks to create (split M when (S, N) give fewer).
    pack_min_rows : pack the B panel only when M is at least this (packing is amortised over M).
    """

    def __init__(self, mr: int = 6, nr: int = 32, num_tasks: int = 8, pack_min_rows: int = 16):
        self.mr, self.nr, self.num_tasks, self.pack_min_rows = mr, nr, num_tasks, pack_min_rows

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None:
            return None
        main = reductions[0]
        stmt = sch.get(main)
        if get_index_map(stmt) is None or not _is_mul_add_update(stmt):
            return None
        if stmt.writes[0].source.dtype != "float32":
            return None
        # Inner-reduction B (weight stored [N, K]): last index of B is a reduction var.
        b_last = stmt.reads[1].region[-1].min
        red_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
        b_transposed = isinstance(b_last, tirx.Var) and b_last in red_vars
        try:
            return self._schedule(sch, main, b_transposed)
        except Exception:  # noqa: BLE001 - any schedule error: leave the func to the next rule
            return None

    def _schedule(self, sch: s_tir.Schedule, main, b_transposed: bool) -> s_tir.Schedule | None:
        # Step 1. Normalise to C[S, I, J] += A[S, I, K] * B[S, J, K].
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), b_map)
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        b, i, j, k = sch.get_loops(main)
        n_batch, m, n, _k = (_static(sch.get(loop).extent) for loop in (b, i, j, k))
        if n_batch is None or n is None or _k is None:
            return None  # only M (tokens) may be symbolic
        if b_transposed and m is not None and m <= 4:
            return None  # a GEMV over a [N, K] weight: dlight's GEMV rule does it better
        mr = self.mr if m is None else _pick_tile(m, ((self.mr, 1.0), (4, 0.9)))
        nr = _pick_tile(n, ((self.nr, 1.0), (16, 0.8)))
        sch.pad_einsum(main, [1, mr, nr, 1])
        b, i, j, k = sch.get_loops(main)
        jo, jn = sch.split(j, [None, nr])
        if m is None:
            # Symbolic M: parallel over (S, N tiles) only; every task walks all row tiles.
            ii, im = sch.split(i, [None, mr])
            sch.reorder(b, jo, ii, k, im, jn)
            par = sch.fuse(b, jo)
        else:
            m_tiles = math.ceil(m / mr)
            n_tasks = n_batch * math.ceil(n / nr)
            chunks = 1
            if n_tasks < self.num_tasks:
                want = math.ceil(self.num_tasks / n_tasks)
                chunks = max(d for d in range(1, min(want, m_tiles) + 1) if m_tiles % d == 0)
            # Step 2. Tile: (s, jo, io) parallel -> ii -> k -> mr -> nr.
            io, ii, im = sch.split(i, [chunks, m_tiles // chunks, mr])
            sch.reorder(b, jo, io, ii, k, im, jn)
            par = sch.fuse(b, jo, io)
        sch.parallel(par)
        write_back = sch.cache_write(main, 0, "global")
        sch.reverse_compute_at(write_back, ii, preserve_unit_loops=True)
        # Step 3. Prologue. A padded along M is materialised once (no select in the k loop);
        # the B panel (zero-padded, K-major) is packed once per task; the rest is inlined.
        keep = []
        if m is None or m % mr:
            a_pad = _producer_of(sch, main, 0)
            sch.parallel(sch.fuse(*sch.get_loops(a_pad)[:2]))
            keep.append(a_pad)
        if m is None or m >= self.pack_min_rows or b_transposed:
            packed_b = sch.cache_read(main, 1, "global")
            sch.compute_at(packed_b, par, preserve_unit_loops=True)
            sch.transform_layout(packed_b, ("write", 0), lambda s_, j_, k_: (s_, k_, j_))
            if not b_transposed:  # B is [K, N]: copy rows of NR contiguous floats
                loops = sch.get_loops(packed_b)
                sch.reorder(loops[-1], loops[-2])
                sch.vectorize(loops[-2])
            keep.append(packed_b)
        _inline_producers(sch, main, keep)
        # Step 4. Epilogue on the tile; vectorise; split init from the update.
        auto_inline_consumer_chain(sch, write_back)
        sch.vectorize(sch.get_loops(write_back)[-1])
        sch.unroll(im)
        sch.vectorize(jn)
        sch.decompose_reduction(main, k)
        return sch
