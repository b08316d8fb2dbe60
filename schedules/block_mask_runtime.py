"""Block-sparse layouts computed at run time, for kernels with a symbolic sequence length.

With static shapes ``BlockMask.from_spec`` builds ``kv_num_blocks``/``kv_indices``/
``kv_is_full`` in numpy and they become constants.  With a symbolic length they cannot:
:func:`runtime_block_mask_func` is a small TIR PrimFunc that computes the same arrays from the
same structured rule for the actual lengths (read from the shapes of Q and K), called right
before the kernel.  Its arrays are ``[1, nqb]`` / ``[1, nqb, nkb]`` (width = every kv block;
entries past ``kv_num_blocks`` repeat the last index with ``is_full = 0``, as ``from_spec``).

:class:`DispatchMask` is the mask of a length-dispatched site: ``short`` below ``threshold``
keys, ``long`` at or above it.  Both are structured (or full) ``MaskSpec``\\ s; the choice is a
run-time condition on ``kv_len`` in the layout function and in the kernel's element rule, so
one compiled kernel serves both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx

from .block_mask import MaskSpec

__all__ = ["DispatchMask", "runtime_block_mask_func", "structured_rule", "symbolic_ok"]


def symbolic_ok(spec, with_tensor: bool = False) -> bool:
    """Whether ``spec`` can be evaluated for a symbolic length (full / structured / dispatch;
    ``dynamic`` too when a mask tensor comes with it: every block is then partial)."""
    if isinstance(spec, DispatchMask):
        return True
    kinds = ("full", "structured", "dynamic") if with_tensor else ("full", "structured")
    return isinstance(spec, MaskSpec) and spec.kind in kinds


@dataclass(frozen=True)
class DispatchMask:
    """``short`` when ``kv_len < threshold``, else ``long`` (see module docstring)."""

    threshold: int
    short: MaskSpec
    long: MaskSpec
    kind: str = "structured"  # the kernels treat it as a rule they evaluate from indices

    def __post_init__(self):
        if int(self.threshold) <= 0:
            raise ValueError(f"DispatchMask.threshold must be positive, got {self.threshold}")
        for side, s in (("short", self.short), ("long", self.long)):
            if not (isinstance(s, MaskSpec) and s.kind in ("full", "structured")):
                raise ValueError(f"DispatchMask.{side} must be a full or structured MaskSpec "
                                 f"(evaluable for any length), got {s!r}")

    def describe(self) -> str:
        return (f"dispatch(kv_len < {self.threshold}: {self.short.describe()}; "
                f">= {self.threshold}: {self.long.describe()})")

    def is_long(self, Nk):
        return Nk >= self.threshold

    def element_rule(self, q, k, Nk, k_tail: bool):
        """The element rule of both sides, selected on ``Nk`` (plus the ragged kv tail)."""
        short = structured_rule(self.short, q, k)
        long = structured_rule(self.long, q, k)
        cond = tirx.Select(self.is_long(Nk), long, short)
        return tirx.all(cond, k < Nk) if k_tail else cond


def structured_rule(spec: MaskSpec, q, k):
    """TIR form of ``MaskSpec.allowed`` (``full``: True)."""
    cond = tirx.const(True, "bool")
    if spec.kind == "full":
        return cond
    qo = q + spec.q_offset
    if spec.min_diff is not None:
        cond = tirx.all(cond, qo - k >= spec.min_diff)
    if spec.max_diff is not None:
        cond = tirx.all(cond, qo - k <= spec.max_diff)
    if spec.chunk is not None:
        cond = tirx.all(cond, tirx.floordiv(qo, spec.chunk) == tirx.floordiv(k, spec.chunk))
    return cond


def _block_state(spec: MaskSpec, qb, kb, Nq, Nk, BQ: int, BK: int):
    """0 empty, 1 partial, 2 full: ``BlockMask.from_spec``'s corner test in TIR."""
    if spec.kind == "full":
        return tirx.const(2, "int32")
    if spec.kind == "dynamic":  # a run-time mask tensor decides: visit, apply it everywhere
        return tirx.const(1, "int32")
    q0 = qb * BQ + spec.q_offset
    q1 = tirx.min(qb * BQ + BQ, Nq) - 1 + spec.q_offset
    k0 = kb * BK
    k1 = tirx.min(kb * BK + BK, Nk) - 1
    dmin, dmax = q0 - k1, q1 - k0
    empty, full = tirx.const(False, "bool"), tirx.const(True, "bool")
    if spec.min_diff is not None:
        empty = tirx.any(empty, dmax < spec.min_diff)
        full = tirx.all(full, dmin >= spec.min_diff)
    if spec.max_diff is not None:
        empty = tirx.any(empty, dmin > spec.max_diff)
        full = tirx.all(full, dmax <= spec.max_diff)
    if spec.chunk is not None:
        c = spec.chunk
        qc0, qc1 = tirx.floordiv(q0, c), tirx.floordiv(q1, c)
        kc0, kc1 = tirx.floordiv(k0, c), tirx.floordiv(k1, c)
        empty = tirx.any(empty, qc1 < kc0, kc1 < qc0)
        full = tirx.all(full, qc0 == qc1, kc0 == kc1, qc0 == kc0)
    return tirx.Select(empty, tirx.const(0, "int32"),
                       tirx.Select(full, tirx.const(2, "int32"), tirx.const(1, "int32")))


def runtime_block_mask_func(spec, q_shape: tuple, k_shape: tuple, q_dtype: str, k_dtype: str,
                            block_q: int, block_kv: int, gpu: bool = False):
    """PrimFunc ``(Q, K, kv_num_blocks, kv_indices, kv_is_full)`` computing the layout of
    ``spec`` (full / structured MaskSpec or DispatchMask) for the lengths of Q and K (dims -2).
    ``q_shape``/``k_shape`` may hold tir Vars (int32); Q and K are not read.  ``gpu``: one
    CUDA thread per query block (blocks of 64 threads) instead of a CPU parallel loop."""
    from tvm.script import tirx as T

    if not symbolic_ok(spec, with_tensor=True):
        raise ValueError(f"a run-time block layout needs a full/structured mask, got {spec!r}")
    BQ, BK = int(block_q), int(block_kv)
    Nq, Nk = q_shape[-2], k_shape[-2]
    nqb = (Nq + BQ - 1) // BQ
    nkb = (Nk + BK - 1) // BK

    def state(qb, kb):
        if isinstance(spec, DispatchMask):
            return tirx.Select(spec.is_long(Nk), _block_state(spec.long, qb, kb, Nq, Nk, BQ, BK),
                               _block_state(spec.short, qb, kb, Nq, Nk, BQ, BK))
        return _block_state(spec, qb, kb, Nq, Nk, BQ, BK)

    @T.macro(hygienic=True)
    def rows(qb, kv_num_blocks, kv_indices, kv_is_full, cnt):
        cnt[0] = 0
        for kb in range(nkb):
            st = T.bind(state(qb, kb))
            if st > 0:
                kv_indices[0, qb, cnt[0]] = kb
                kv_is_full[0, qb, cnt[0]] = T.Select(st == 2, 1, 0)
                cnt[0] = cnt[0] + 1
        kv_num_blocks[0, qb] = cnt[0]
        for j in range(nkb):
            if j >= cnt[0]:
                kv_indices[0, qb, j] = T.Select(cnt[0] > 0,
                                                kv_indices[0, qb, T.max(cnt[0] - 1, 0)], 0)
                kv_is_full[0, qb, j] = 0

    if gpu:
        @T.prim_func(private=True)
        def func(Q: T.Buffer(q_shape, q_dtype), K: T.Buffer(k_shape, k_dtype),
                 kv_num_blocks: T.Buffer((1, nqb), "int32"),
                 kv_indices: T.Buffer((1, nqb, nkb), "int32"),
                 kv_is_full: T.Buffer((1, nqb, nkb), "int32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            for bx in T.thread_binding((nqb + 63) // 64, thread="blockIdx.x"):
                for tx in T.thread_binding(64, thread="threadIdx.x"):
                    cnt = T.alloc_buffer((1,), "int32", scope="local")
                    if bx * 64 + tx < nqb:
                        rows(bx * 64 + tx, kv_num_blocks, kv_indices, kv_is_full, cnt)
    else:
        @T.prim_func(private=True)
        def func(Q: T.Buffer(q_shape, q_dtype), K: T.Buffer(k_shape, k_dtype),
                 kv_num_blocks: T.Buffer((1, nqb), "int32"),
                 kv_indices: T.Buffer((1, nqb, nkb), "int32"),
                 kv_is_full: T.Buffer((1, nqb, nkb), "int32")):
            T.func_attr({"tir.noalias": True})
            for qb in T.parallel(nqb):
                cnt = T.alloc_buffer((1,), "int32", scope="global")
                rows(qb, kv_num_blocks, kv_indices, kv_is_full, cnt)

    return func.with_attr({"global_symbol": "attnforge_block_mask", "op_pattern": 8})
