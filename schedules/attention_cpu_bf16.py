"""Fused attention for llvm with bf16 ``Q Kᵀ`` and ``P V`` on AVX-512 BF16 (``vdpbf16ps``).

Same algorithm, signature and masks as :mod:`.attention_cpu` (FlashAttention-2 online softmax
over a FlexAttention-style block layout, scores transposed ``S[BK, BQ]``, bf16 Q/K/V/O); the two
matmuls run as bf16 x bf16 -> fp32 ``vdpbf16ps`` (32 MACs per instruction, twice the fp32 FMA
rate) instead of widening to fp32. One task per (batch, query head, query block):

* the query block is packed once as channel pairs, ``QP[D/2, BQ]`` (32-bit words: two bf16
  channels of one query), so one 64-byte vector holds 16 queries x 2 channels;
* ``S[k, i]`` accumulates in fp32 registers with ``vdpbf16ps(acc, broadcast(K[k, 2d:2d+2]),
  QP[d, 16 queries])`` (K read as 32-bit pairs straight from the input), then is scaled by
  ``scale * log2 e`` in fp32: the products are exact, only the fp32 sum order differs;
* masks and the online softmax exactly as the fp32 kernel (fp32 ``m``, ``l``, polynomial
  ``exp2``); ``l`` sums the fp32 ``P``;
* ``P`` is rounded to bf16 (nearest even) and packed as key pairs ``PP[BK/2, BQ]``, the block of
  V as key pairs ``VP[BK/2, Dv]``, and ``OT[Dv, BQ] = alpha OT + Vᵀ P`` runs on ``vdpbf16ps``
  with fp32 accumulators.

Numerics: a bf16 attention with fp32 accumulation and fp32 softmax, as FlashAttention's bf16
kernels: ``P``'s rounding to bf16 (relative 2^-9) is the one error beyond fp32 summation order.
``vdpbf16ps`` treats bf16 denormals as zero. Not supported (``NotImplementedError``; the caller
keeps :mod:`.attention_cpu`'s kernel): ``dtype`` other than bfloat16, FlexAttention
``score_mod``; ``ValueError``: ``block_q`` not a multiple of 16, odd ``head_dim`` or
``block_kv``, and the fp32 kernel's invalid arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tvm import tirx
from tvm.script import tirx as T

from .attention_args import (
    attention_prim_func,
    check,
    check_dims,
    element_allowed,
)
from .attention_cpu import _LOG2E, check_cpu_tiles, check_mask_args
from .attention_cpu_softmax import normalize_and_store, online_softmax_step
from .bf16_intrin_cpu import WRAPPER_SYMBOL, f32_to_bf16_bits, with_llvm_import
from .block_mask import BlockMask, MaskSpec

__all__ = ["PV_QK_ATTR", "fused_attention_cpu_bf16"]

PV_QK_ATTR = "attnforge.attention_bf16"  # PrimFunc attr: {"qk": "bfloat16", "pv": "bfloat16"}


def _dpbf16(acc, pair_i32, vec_i32x16):
    """``acc[16] += pair . vec[lane]`` (bf16 pairs, fp32 accumulate): one ``vdpbf16ps``."""
    return tirx.call_pure_extern("float32x16", WRAPPER_SYMBOL, acc,
                                 tirx.Broadcast(pair_i32, 16), vec_i32x16)


def _pair(lo_bits, hi_bits):
    """Two bf16 bit patterns (uint16) -> one int32 word ``lo | hi << 16``."""
    u32 = "uint32"
    word = tirx.Cast(u32, lo_bits) | (tirx.Cast(u32, hi_bits) << tirx.const(16, u32))
    return tirx.reinterpret("int32", word)


def fused_attention_cpu_bf16(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype: str = "bfloat16",
    scale: float | None = None,
    mask: MaskSpec | None = None,
    block_q: int = 64,
    block_kv: int = 64,
    mask_input: str | None = None,
    mask_input_shape: Sequence[int] | None = None,
    empty_rows: str = "zero",
    rows: int = 4,
    global_symbol: str = "fused_attention_cpu_bf16",
    score_mod=None,
) -> tuple[tirx.PrimFunc, BlockMask]:
    """The bf16 ``vdpbf16ps`` kernel and its BlockMask; arguments and PrimFunc signature as
    :func:`.attention_cpu.fused_attention_cpu` (see the module docstring for what is refused)."""
    B, Hq, Hkv, Nq, Nk, D = (int(v) for v in (batch, q_heads, kv_heads, q_len, kv_len, head_dim))
    Dv = D if v_head_dim is None else int(v_head_dim)
    mask = MaskSpec.full() if mask is None else mask
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if dtype != "bfloat16":
        raise NotImplementedError(f"fused_attention_cpu_bf16: dtype={dtype!r}; this kernel "
                                  "takes bfloat16 Q/K/V (use attention_cpu for float32)")
    if score_mod is not None:
        raise NotImplementedError("fused_attention_cpu_bf16: FlexAttention score_mod is not "
                                  "supported; use attention_cpu's kernel")
    check_dims(B, Hq, Hkv, Nq, Nk, D, Dv)
    check_cpu_tiles(block_q, block_kv, rows)
    check(block_q % 16 == 0, f"bf16 attention: block_q must be a multiple of 16 (one zmm of "
          f"fp32 scores per 16 queries), got {block_q}")
    check(D % 2 == 0 and block_kv % 2 == 0, f"bf16 attention: head_dim ({D}) and block_kv "
          f"({block_kv}) must be even (vdpbf16ps multiplies pairs)")
    mshape, bm, Hm, W = check_mask_args(mask, mask_input, mask_input_shape, empty_rows, scale,
                                        (B, Hq, Nq, Nk), block_q, block_kv)
    func = _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, mask, block_q, block_kv, mask_input,
                  mshape, empty_rows, rows, Hm, W)
    func = with_llvm_import(func)
    func = func.with_attr({"global_symbol": global_symbol, "tir.noalias": True,
                           "op_pattern": 8,
                           PV_QK_ATTR: {"qk": "bfloat16", "pv": "bfloat16",
                                        "instruction": "vdpbf16ps"}})
    return func, bm


def _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, spec, BQ, BK, mask_input, mshape,
           empty_rows, R, Hm, W):
    f32, i32 = "float32", "int32"
    nqb = -(-Nq // BQ)
    group = Hq // Hkv
    additive = mask_input == "additive"
    qmul = scale if additive else scale * _LOG2E
    emul = _LOG2E if additive else 1.0
    neg_inf = tirx.const(float("-inf"), f32)
    k_tail = Nk % BK != 0
    structured = spec.kind == "structured"
    has_tensor = mask_input is not None
    tensor_every_block = has_tensor and spec.kind not in ("static", "dynamic")
    mdt = "bool" if mask_input == "bool" else dtype
    mpad = (1,) * (4 - len(mshape)) + mshape if has_tensor else (1, 1, 1, 1)
    mbig = tuple(d > 1 for d in mpad)
    q_bcast = not mbig[2]
    Rv = R if Dv % R == 0 else math.gcd(Dv, R)
    R0, R1, Rv0, Rv1 = R - R // 2, R // 2, Rv - Rv // 2, Rv // 2
    NV = BQ // 16  # fp32 zmm vectors per score row
    D2, BK2 = D // 2, BK // 2

    def kclamp(k):
        return tirx.min(k, Nk - 1) if k_tail else k

    def qclamp(q):
        return tirx.min(q, Nq - 1) if Nq % BQ else q

    def allowed(q, k):
        return element_allowed(spec, structured, q, k, Nk, k_tail)

    def mindex(b, h, q, k):
        idx = [b if mbig[0] else 0, h if mbig[1] else 0,
               qclamp(q) if mbig[2] else 0, kclamp(k) if mbig[3] else 0]
        return tuple(idx[4 - len(mshape):])

    def tmask(score, value):
        return score + tirx.Cast(f32, value) if additive else T.Select(value, score, neg_inf)

    def bits(x):  # a bf16 scalar load as its uint16 bit pattern
        return tirx.reinterpret("uint16", x)

    softmax_step = online_softmax_step(BQ, BK, emul)
    store_rows = normalize_and_store(BQ, Dv, Nq, dtype, empty_rows)

    def body(Q, K, V, KNB, KIDX, KFULL, M, O):
        for task in T.parallel(B * Hq * nqb):
            QP = T.alloc_buffer((D2, BQ), i32, scope="global")  # query channel pairs
            PP = T.alloc_buffer((BK2, BQ), i32, scope="global")  # bf16 P, key pairs
            VP = T.alloc_buffer((BK2, Dv), i32, scope="global")  # bf16 V block, key pairs
            S = T.alloc_buffer((BK, BQ), f32, scope="global")
            OT = T.alloc_buffer((Dv, BQ), f32, scope="global")
            m = T.alloc_buffer((BQ,), f32, scope="global")
            lsum = T.alloc_buffer((BQ,), f32, scope="global")
            alpha = T.alloc_buffer((BQ,), f32, scope="global")
            mu = T.alloc_buffer((BQ,), f32, scope="global")
            acc0 = T.alloc_buffer((R0, BQ), f32, scope="global")
            acc1 = T.alloc_buffer((max(R1, 1), BQ), f32, scope="global")
            oacc0 = T.alloc_buffer((Rv0, BQ), f32, scope="global")
            oacc1 = T.alloc_buffer((max(Rv1, 1), BQ), f32, scope="global")
            b = T.bind(task // (Hq * nqb))
            h = T.bind(task // nqb % Hq)
            qb = T.bind(task % nqb)
            hk = T.bind(h // group)
            hm = T.bind(h if Hm > 1 else 0)
            q0 = T.bind(qb * BQ)
            for d2, i in T.grid(D2, BQ):
                QP[d2, i] = _pair(bits(Q[b, h, qclamp(q0 + i), 2 * d2]),
                                  bits(Q[b, h, qclamp(q0 + i), 2 * d2 + 1]))
            for d in range(Dv):
                for i in T.vectorized(BQ):
                    OT[d, i] = T.float32(0)
            for i in T.vectorized(BQ):
                m[i] = neg_inf
                lsum[i] = T.float32(0)
            for j in range(KNB[hm, qb]):
                k0 = T.bind(KIDX[hm, qb, j] * BK)
                # S[BK, BQ] = K_blk QP: rows x BQ fp32 register tile, 2 channels per step.
                for kr in range(BK // R):
                    for r, i in T.grid(R0, BQ):
                        acc0[r, i] = T.float32(0)
                    for r, i in T.grid(R1, BQ):
                        acc1[r, i] = T.float32(0)
                    for d2 in range(D2):
                        for r in T.unroll(R0):
                            for v in T.unroll(NV):
                                acc0[r, T.ramp(v * 16, 1, 16)] = _dpbf16(
                                    acc0[r, T.ramp(v * 16, 1, 16)],
                                    _pair(bits(K[b, hk, kclamp(k0 + kr * R + r), 2 * d2]),
                                          bits(K[b, hk, kclamp(k0 + kr * R + r), 2 * d2 + 1])),
                                    QP[d2, T.ramp(v * 16, 1, 16)])
                        for r in T.unroll(R1):
                            for v in T.unroll(NV):
                                acc1[r, T.ramp(v * 16, 1, 16)] = _dpbf16(
                                    acc1[r, T.ramp(v * 16, 1, 16)],
                                    _pair(bits(K[b, hk, kclamp(k0 + kr * R + R0 + r), 2 * d2]),
                                          bits(K[b, hk, kclamp(k0 + kr * R + R0 + r),
                                                 2 * d2 + 1])),
                                    QP[d2, T.ramp(v * 16, 1, 16)])
                    for r in range(R0):
                        for i in T.vectorized(BQ):
                            S[kr * R + r, i] = acc0[r, i] * T.float32(qmul)
                    for r in range(R1):
                        for i in T.vectorized(BQ):
                            S[kr * R + R0 + r, i] = acc1[r, i] * T.float32(qmul)
                # The V block as bf16 key pairs (vectorised over channels).
                for j2 in range(BK2):
                    for d in T.vectorized(Dv):
                        VP[j2, d] = _pair(bits(V[b, hk, kclamp(k0 + 2 * j2), d]),
                                          bits(V[b, hk, kclamp(k0 + 2 * j2 + 1), d]))
                if structured or k_tail:  # noqa: SIM102
                    if KFULL[hm, qb, j] == 0 or k0 + BK > Nk:
                        for kk in range(BK):
                            for i in T.vectorized(BQ):
                                S[kk, i] = T.Select(allowed(q0 + i, k0 + kk), S[kk, i], neg_inf)
                if has_tensor:  # noqa: SIM102
                    if tensor_every_block or KFULL[hm, qb, j] == 0:
                        if q_bcast:  # e.g. key padding [B, 1, 1, Nk]: one value per key
                            for kk in range(BK):
                                for i in T.vectorized(BQ):
                                    S[kk, i] = tmask(S[kk, i], M[mindex(b, h, q0, k0 + kk)])
                        else:  # transposed read of the [q, k] tile (scalar loop)
                            for i, kk in T.grid(BQ, BK):
                                S[kk, i] = tmask(S[kk, i], M[mindex(b, h, q0 + i, k0 + kk)])
                softmax_step(S, m, mu, alpha, lsum)  # online softmax, as in the fp32 kernel
                for j2 in range(BK2):  # P rounded to bf16, key pairs
                    for i in T.vectorized(BQ):
                        PP[j2, i] = _pair(f32_to_bf16_bits(S[2 * j2, i]),
                                          f32_to_bf16_bits(S[2 * j2 + 1, i]))
                # OT = alpha OT + V_blk^T P: rows x BQ fp32 register tile, 2 keys per step.
                for dr in range(Dv // Rv):
                    for r, i in T.grid(Rv0, BQ):
                        oacc0[r, i] = OT[dr * Rv + r, i] * alpha[i]
                    for r, i in T.grid(Rv1, BQ):
                        oacc1[r, i] = OT[dr * Rv + Rv0 + r, i] * alpha[i]
                    for j2 in range(BK2):
                        for r in T.unroll(Rv0):
                            for v in T.unroll(NV):
                                oacc0[r, T.ramp(v * 16, 1, 16)] = _dpbf16(
                                    oacc0[r, T.ramp(v * 16, 1, 16)], VP[j2, dr * Rv + r],
                                    PP[j2, T.ramp(v * 16, 1, 16)])
                        for r in T.unroll(Rv1):
                            for v in T.unroll(NV):
                                oacc1[r, T.ramp(v * 16, 1, 16)] = _dpbf16(
                                    oacc1[r, T.ramp(v * 16, 1, 16)], VP[j2, dr * Rv + Rv0 + r],
                                    PP[j2, T.ramp(v * 16, 1, 16)])
                    for r, i in T.grid(Rv0, BQ):
                        OT[dr * Rv + r, i] = oacc0[r, i]
                    for r, i in T.grid(Rv1, BQ):
                        OT[dr * Rv + Rv0 + r, i] = oacc1[r, i]
            store_rows(O, OT, alpha, lsum, b, h, q0)

    macro = T.macro(body, hygienic=True)
    shapes = (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), (B, Hq, Nq, Dv)
    return attention_prim_func(macro, dtype, shapes, Hm, nqb, W,
                               mshape if has_tensor else None, mdt if has_tensor else None)
