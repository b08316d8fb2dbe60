"""bf16 x bf16 -> fp32 matmul for llvm with AVX-512 BF16 (``vdpbf16ps``).

``out[m, n] = sum_k bf16(x[m, k]) * W[k, n]`` with fp32 ``x`` (rounded to bf16, nearest even,
inside the kernel), a constant bf16 weight and fp32 accumulation: the numerics of
``torch.bfloat16`` matmuls with an fp32 output. The only difference from a float64 sum of the
same bf16 values is the fp32 accumulation order.

Layout: the weight is packed offline (:func:`pack_weight`) as ``[N/(16 nb), K/2, nb, 16, 2]``
bf16 bits (``uint16``, zero-padded), so one ``vdpbf16ps`` reads 16 output channels x 2 k as one
64-byte vector and multiplies them by one broadcast pair of ``x``, and the ``nb`` vectors of one
k pair of a register tile are adjacent (one stream per tile; with ``[N/16, K/2, 16, 2]`` they
were ``K * 32`` bytes apart: 74 vs 105 GFLOP/s at 512x1024x512 in one A/B on a loaded host).
``x`` is rounded into a ``[Mp, Kp]`` bf16 buffer first (one parallel pass; zero rows / column
pad when M or K do not divide the tile). M may be a symbolic ``tirx.Var`` (int64, as Relax shapes are).

Schedule (fixed template, the one of ``matmul_int8_cpu``): ``mr`` x ``nb*16`` fp32 register tile
(at most 24 zmm accumulators, default 6 x 64: of the 32 zmm registers, ``nb`` hold the weight
vectors and one the broadcast; 6 x 64 ran 5-17% faster than 4 x 64 single-threaded, no spills
in the inner loop); ``(jo, io)`` fused + parallel -> ``ko`` -> ``mr``
unrolled -> ``nb`` unrolled -> tensorised 16x2 bf16 dot; the copy-out to ``out`` runs on the
tile (``reverse_compute_at``), cutting the N / M padding.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import s_tir, te, tirx

from .bf16_intrin_cpu import (
    bf16_to_f32, f32_to_bf16_bits, register_bf16_dot_intrin, with_llvm_import,
)
from .register_tile_cpu import tensorize_tile, tile_registers

__all__ = ["ATTR", "bf16_matmul_func", "bf16_matmul_reference", "pack_weight", "packed_shape",
           "round_bf16"]

ATTR = "attnforge.bf16_matmul"


def packed_shape(n: int, k: int, nb: int = 4) -> tuple[int, int, int, int, int]:
    """Shape of the packed weight for a ``[K, N]`` weight (N padded to ``16 nb``, K to even)."""
    return (math.ceil(n / (16 * nb)), math.ceil(k / 2), nb, 16, 2)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (``ml_dtypes.bfloat16``), round to nearest even."""
    import ml_dtypes

    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


def pack_weight(w_kn: np.ndarray, nb: int = 4) -> np.ndarray:
    """``[K, N]`` fp32 or bf16 weight -> ``uint16`` bf16 bits ``[N/16, K/2, 16, 2]``.

    ``Wp[a, b, c, d] = bf16(W[2b + d, 16a + c])``, zero-padded; ``nb`` must match the kernel's.
    """
    if w_kn.ndim != 2:
        raise ValueError(f"pack_weight expects a 2-D [K, N] weight, got shape {w_kn.shape}")
    k, n = w_kn.shape
    bits = round_bf16(w_kn).view(np.uint16) if w_kn.dtype != np.uint16 else w_kn
    panels, kb, _, _, _ = packed_shape(n, k, nb)
    padded = np.zeros((kb * 2, panels * nb * 16), np.uint16)
    padded[:k, :n] = bits
    return np.ascontiguousarray(padded.reshape(kb, 2, panels, nb, 16).transpose(2, 0, 3, 4, 1))


def bf16_matmul_reference(x: np.ndarray, w_kn: np.ndarray) -> np.ndarray:
    """float64 ``bf16(x) @ bf16(W)``: the exact sum the kernel approximates in fp32."""
    return round_bf16(x).astype(np.float64) @ round_bf16(w_kn).astype(np.float64)


def _compute(m, n: int, k: int, mr: int, nb: int):
    idx = "int64" if isinstance(m, tirx.Var) else "int32"
    mp = (m + mr - 1) // mr * mr
    kp = math.ceil(k / 2) * 2
    n_blocks = math.ceil(n / (16 * nb)) * nb
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n_blocks // nb, kp // 2, nb, 16, 2), "uint16", name="W")
    zero = tirx.const(0, "uint16")

    def round_x(i, j):
        conds = ([i < m] if not (isinstance(m, int) and m % mr == 0) else []) + (
            [j < k] if kp != k else [])
        value = f32_to_bf16_bits(x[i, j] if not conds else x[tirx.min(i, m - 1),
                                                              tirx.min(j, k - 1)])
        return tirx.if_then_else(tirx.all(*conds), value, zero) if conds else value

    a = te.compute((mp, kp), round_x, name="x_bf16")
    ko = te.reduce_axis((0, kp // 2), name="ko")
    ki = te.reduce_axis((0, 2), name="ki")
    acc = te.compute(
        (mp, n_blocks, 16),
        lambda i, jo, ji: te.sum(
            bf16_to_f32(a[i, ko * 2 + ki]) * bf16_to_f32(w[jo // nb, ko, jo % nb, ji, ki]),
            axis=[ko, ki]),
        name="C")
    out = te.compute((m, n), lambda i, j: acc[i, j // 16, j % 16], name="out")
    func = te.create_prim_func([x, w, out], index_dtype_override=idx)
    return func


def bf16_matmul_func(m, n: int, k: int, *, mr: int = 6, nb: int = 4) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(x f32[M, K], W u16[packed], out f32[M, N])``.

    ``W`` is ``pack_weight(w, nb)`` (shape :func:`packed_shape`). ``m`` is an int or a
    symbolic int64 ``tirx.Var``. ``mr`` x ``nb`` is the register tile (rows x 16-column blocks,
    fp32 zmm accumulators, at most 24).
    """
    if isinstance(m, int) and m < 1 or min(n, k) < 1:
        raise ValueError(f"bf16_matmul_func: sizes must be positive, got M={m} N={n} K={k}")
    if mr * nb > 24:
        raise ValueError(f"bf16_matmul_func: register tile mr x nb = {mr} x {nb} zmm "
                         "accumulators exceeds 24 of the 32 zmm registers (it would spill); "
                         "lower mr or nb")
    sch = s_tir.Schedule(_compute(m, n, k, mr, nb))
    tile = tile_registers(sch, mr, nb)
    oj = tile.out_loops[-1]
    if n % (16 * nb) == 0:
        sch.vectorize(sch.split(oj, [None, 16])[1])
    rnd = sch.get_sblock("x_bf16")
    ri, rj = sch.get_loops(rnd)
    sch.parallel(ri)
    if k % 2 == 0:
        sch.vectorize(sch.split(rj, [None, 16])[1])
    tensorize_tile(sch, tile, register_bf16_dot_intrin())
    func = with_llvm_import(sch.mod["main"])
    # op_pattern 8 (opaque): FuseOps must not merge an epilogue into this scheduled kernel.
    func = func.with_attr(ATTR, 1).with_attr("tirx.is_scheduled", 1)
    return func.with_attr("op_pattern", 8)


