"""INT8 matmul for llvm with AVX-512 VNNI: ``u8 A[M, K] x s8 W[N, K] -> int32 -> fp32``.

``y[m, n] = float(acc[m, n]) * scale[n] + offset[n]`` with
``acc[m, n] = sum_k A[m, k] * W[n, k]`` (exact int32 accumulation).

With per-tensor activation quantisation ``x ~ s_a * (A - z_a)`` (A uint8) and per-output-channel
symmetric weights ``w[n] ~ s_w[n] * W[n]`` (W int8),
``x @ w.T + b = s_a s_w[n] (acc - z_a sum_k W[n, k]) + b``, so the dequantisation, the
zero-point correction and the bias fold into two fp32 vectors computed offline
(:func:`fold_dequant`): ``scale = s_a s_w``, ``offset = b - scale z_a colsum(W)``.

Layout: W is packed offline (:func:`pack_weight`) as ``[N/16, K/4, 16, 4]`` (zero-padded), so
one ``vpdpbusd`` reads 16 output channels x 4 k as one 64-byte vector. A is zero-padded to
``[Mp, Kp]`` inside the kernel (a cheap parallel copy) when M or K do not divide the tile.

Schedule (fixed template; ``mr`` x ``nb*16`` int32 register tile, <= 1 KB so LLVM keeps it in
zmm registers): ``(jo, io)`` fused + parallel -> ``ko`` -> ``mr`` unrolled -> ``nb`` unrolled ->
tensorised 16x4 VNNI dot; the init is vectorised; the dequant epilogue runs on the tile
(``reverse_compute_at``). ``dequant=False`` emits the raw int32 accumulator (for exact tests).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from .register_tile_cpu import tensorize_tile, tile_registers
from .vnni_intrin import register_vnni_intrin

__all__ = [
    "fold_dequant",
    "int8_matmul_func",
    "int8_matmul_reference",
    "pack_weight",
    "packed_shape",
]

ATTR = "attnforge.int8_matmul"


def packed_shape(n: int, k: int, nb: int = 2) -> tuple[int, int, int, int]:
    """Shape of the packed weight for an ``[N, K]`` int8 weight (N padded to ``16 nb``)."""
    return (math.ceil(n / (16 * nb)) * nb, math.ceil(k / 4), 16, 4)


def pack_weight(w: np.ndarray, nb: int = 2) -> np.ndarray:
    """int8 ``[N, K]`` -> zero-padded ``[N/16, K/4, 16, 4]``: ``Wp[a, b, c, d] = W[16a+c, 4b+d]``.

    ``nb`` must match the kernel's (N is padded to a multiple of ``16 nb``).
    """
    if w.dtype != np.int8 or w.ndim != 2:
        raise ValueError(f"pack_weight expects an int8 [N, K] array, got {w.dtype} {w.shape}")
    n, k = w.shape
    nb, kb, _, _ = packed_shape(n, k, nb)
    padded = np.zeros((nb * 16, kb * 4), np.int8)
    padded[:n, :k] = w
    return np.ascontiguousarray(padded.reshape(nb, 16, kb, 4).transpose(0, 2, 1, 3))


def fold_dequant(w_int8: np.ndarray, w_scale: np.ndarray, a_scale: float, a_zero_point: int,
                 bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scale[N], offset[N])`` fp32 for the epilogue (see module docstring)."""
    scale = (np.float64(a_scale) * w_scale.astype(np.float64)).astype(np.float32)
    colsum = w_int8.astype(np.int64).sum(axis=1)
    offset = -scale.astype(np.float64) * a_zero_point * colsum
    if bias is not None:
        offset = offset + bias.astype(np.float64)
    return scale, offset.astype(np.float32)


def int8_matmul_reference(a_u8: np.ndarray, w_int8: np.ndarray) -> np.ndarray:
    """Exact int32 ``A @ W.T`` in numpy (int64 internally, checked to fit int32)."""
    acc = a_u8.astype(np.int64) @ w_int8.astype(np.int64).T
    if np.abs(acc).max(initial=0) >= 2**31:
        raise OverflowError("int32 accumulator overflow")
    return acc.astype(np.int32)


def _compute(m: int, n: int, k: int, mr: int, nb: int, dequant: bool, per_row: bool = False):
    mp, kp = math.ceil(m / mr) * mr, math.ceil(k / 4) * 4
    n_blocks = math.ceil(n / (16 * nb)) * nb
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((n_blocks, kp // 4, 16, 4), "int8", name="W")
    if (mp, kp) != (m, k):
        a_in = te.compute(
            (mp, kp),
            lambda i, j: tvm.tirx.if_then_else(
                tvm.tirx.all(i < m, j < k), a[i, j], tvm.tirx.const(0, "uint8")),
            name="A_pad")
    else:
        a_in = a
    ko = te.reduce_axis((0, kp // 4), name="ko")
    ki = te.reduce_axis((0, 4), name="ki")
    acc = te.compute(
        (mp, n_blocks, 16),
        lambda i, jo, ji: te.sum(
            a_in[i, ko * 4 + ki].astype("int32") * w[jo, ko, ji, ki].astype("int32"),
            axis=[ko, ki]),
        name="C")
    if per_row:  # per-token activation scale / zero point (computed at run time)
        rs = te.placeholder((m,), "float32", name="row_scale")
        rz = te.placeholder((m,), "int32", name="row_zero_point")
        ws = te.placeholder((n,), "float32", name="col_scale")
        cs = te.placeholder((n,), "float32", name="col_sum")
        out = te.compute(
            (m, n),
            lambda i, j: (acc[i, j // 16, j % 16].astype("float32")
                          - rz[i].astype("float32") * cs[j])
            * (rs[i] * ws[j]),
            name="out")
        args = [a, w, rs, rz, ws, cs, out]
    elif dequant:
        scale = te.placeholder((n,), "float32", name="scale")
        offset = te.placeholder((n,), "float32", name="offset")
        out = te.compute(
            (m, n),
            lambda i, j: acc[i, j // 16, j % 16].astype("float32") * scale[j] + offset[j],
            name="out")
        args = [a, w, scale, offset, out]
    else:
        out = te.compute((m, n), lambda i, j: acc[i, j // 16, j % 16], name="out")
        args = [a, w, out]
    return te.create_prim_func(args), a_in is not a, w.shape


def int8_matmul_func(m: int, n: int, k: int, *, dequant: bool = True, mr: int = 4,
                     nb: int = 2, per_row: bool = False) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(A u8[M, K], W s8[packed], [scale f32[N], offset f32[N]], out)``.

    ``W`` is ``pack_weight(w, nb)`` (shape :func:`packed_shape`); ``out`` is fp32 ``[M, N]``
    (``dequant``) or the int32 accumulator. ``mr`` x ``nb`` is the register tile (rows x
    16-channel blocks). ``per_row``: per-token activation quantisation, arguments
    ``(A, W, row_scale f32[M], row_zero_point i32[M], col_scale f32[N], col_sum f32[N], out)``
    and ``out[m, n] = (acc[m, n] - row_zero_point[m] col_sum[n]) row_scale[m] col_scale[n]``
    (``col_sum[n] = sum_k W[n, k]``).
    """
    if min(m, n, k) < 1:
        raise ValueError(f"int8_matmul_func: sizes must be positive, got M={m} N={n} K={k}")
    if mr * nb * 16 * 4 > 1024:
        raise ValueError(f"register tile mr*nb*16 int32 = {mr * nb * 64} bytes exceeds 1 KB")
    func, padded_a, _ = _compute(m, n, k, mr, nb, dequant, per_row)
    sch = s_tir.Schedule(func)
    tile = tile_registers(sch, mr, nb)
    oj = tile.out_loops[-1]
    if n % (16 * nb) == 0 and m % mr == 0:
        sch.vectorize(sch.split(oj, [None, 16])[1])
    if padded_a:
        pad = sch.get_sblock("A_pad")
        sch.parallel(sch.get_loops(pad)[0])
    tensorize_tile(sch, tile, register_vnni_intrin())
    # op_pattern 8 (opaque): FuseOps must not merge an epilogue into this scheduled kernel
    # (FuseTIR then failed on BERT's bias add: "Inconsistent buffers ... mapped to the same
    # relax var"); LowerInt8Matmul folds constant biases into ``offset`` instead.
    func = sch.mod["main"].with_attr(ATTR, 1).with_attr("tirx.is_scheduled", 1)
    return func.with_attr("op_pattern", 8)
