"""CPU schedule rule for the skinny matmuls of decoding: ``C[M, N] += A[M, K] * B[K, N]`` with
few rows (``M <= max_rows``: one row per sequence in a decode step, or the single row the LM
head sees after a prefill).

Our ``MatmulCPU`` rule pads M to its 6-row register tile and dlight's CPU ``GEMV`` wants the
weight as ``[N, K]``; after ``FoldConstant`` the weights are ``[K, N]``, so these matmuls fell
to the elementwise rule (a serial K loop per output element: ~0.2 GFLOP/s, >100 ms per token
for a 32000-word LM head).  Here: ``N`` split into ``NR``-wide column panels (64 for 1-4 rows,
32 for more -- an ``8 x 64`` accumulator no longer fits the registers; else 16 or 8 when N is not
a multiple), one parallel task per panel, loops ``panel [parallel] -> k -> m [unrolled] -> nr [vectorised]``: each step is one
contiguous ``NR``-float load of a weight row and ``M`` broadcast-FMAs into the ``M x NR``
accumulator (a ``cache_write`` tile LLVM keeps in registers).  Weight bytes are read once,
which is what bounds decoding.  Wider panels matter: with 32 columns each k step reads 128 bytes
from a row 128 KB away from the last one; 64 columns (256 bytes) took the 32000 x 512 LM head at
one row from ~6.5 ms to ~5 ms (12-14 GB/s on 2 cores; torch ``F.linear``: ~6.3 ms).  Spatial blocks after the matmul are inlined into the write-back
when possible.  bf16 weights (``StoreWeightsBF16``: ``A fp32 x float32(B bf16)``) take the same
schedule: the widening is a shift on the loaded vector and the bytes read halve.  Anything else
returns ``None``.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, get_reduction_blocks
from tvm.target import Target

__all__ = ["DecodeMatvecCPU"]


def _int(x) -> int | None:
    return int(x) if isinstance(x, tirx.IntImm) else None


class DecodeMatvecCPU(ScheduleRule):
    def __init__(self, max_rows: int = 16, nr: int = 32, wide_nr: int = 64,
                 wide_rows: int = 4, weight_dtypes=("float32", "bfloat16")):
        self.max_rows, self.nr, self.wide_nr, self.wide_rows = max_rows, nr, wide_nr, wide_rows
        self.weight_dtypes = tuple(weight_dtypes)

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func)
        except Exception:  # noqa: BLE001 - not our pattern: leave it to the next rule
            return None

    def _apply(self, func):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None or len(reductions) != 1:
            return None
        main = reductions[0]
        stmt = sch.get(main)
        if len(stmt.reads) != 2 or stmt.writes[0].source.dtype != "float32":
            return None
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if kinds[-1] != tirx.IterVar.CommReduce or tirx.IterVar.CommReduce in kinds[:-1]:
            return None
        a, b = stmt.reads
        c = stmt.writes[0]
        ivars = [iv.var for iv in stmt.iter_vars]
        red = ivars[-1]
        # B[k, n] with n the innermost spatial var and k the reduction var; A[..., k].
        b_idx = [r.min for r in b.region]
        a_idx = [r.min for r in a.region]
        if len(b_idx) != 2 or not (b_idx[0].same_as(red) and b_idx[1].same_as(ivars[-2])):
            return None
        if not a_idx[-1].same_as(red):
            return None
        if b.source.dtype not in self.weight_dtypes or a.source.dtype != "float32":
            return None
        loops = sch.get_loops(main)
        extents = [_int(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents) or len(loops) < 2:
            return None
        n, k = extents[-2], extents[-1]
        rows = 1
        for e in extents[:-2]:
            rows *= e
        widths = ((self.wide_nr,) if rows <= self.wide_rows else ()) + (self.nr, 16, 8)
        nr = next((w for w in widths if n % w == 0), None)
        if rows > self.max_rows or nr is None:
            return None
        *outer, jn, kk = loops
        m = sch.fuse(*outer) if len(outer) > 1 else (outer[0] if outer else None)
        if m is None:
            return None
        jo, ji = sch.split(jn, [None, nr])
        sch.reorder(jo, m, kk, ji)
        sch.parallel(jo)
        write_back = sch.cache_write(main, 0, "global")
        sch.reverse_compute_at(write_back, jo, preserve_unit_loops=True)
        sch.reorder(kk, m)
        auto_inline_consumer_chain(sch, write_back)
        sch.vectorize(sch.get_loops(write_back)[-1])
        sch.unroll(m)
        sch.vectorize(ji)
        sch.decompose_reduction(main, kk)
        return sch
