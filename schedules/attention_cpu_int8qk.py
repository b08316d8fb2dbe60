"""Fused attention for llvm with INT8 ``Q Kᵀ`` (SageAttention-style), ``P V`` in fp32.

Same algorithm, signature and masks as :mod:`.attention_cpu` (FlashAttention-2 online softmax
over a FlexAttention-style block layout, scores transposed ``S[BK, BQ]``); only the score tile
is computed from int8 operands with AVX-512 VNNI.  One PrimFunc, three parallel phases:

1. **K smoothing** (``smooth_k=True``): ``mean[b, hk, :] = mean over all Nk keys of K``.
   ``K' = K - mean`` changes every score of query ``q`` by the constant ``q · mean``, which the
   softmax cancels (also under masks and additive biases: the shift is per query row).  Large
   per-channel offsets of K (common in trained LLMs) would otherwise dominate the int8 range.
2. **K quantisation**, per (batch, kv head, kv block of ``block_kv`` rows): symmetric scale
   ``sk = max|K'| / 127``; stored as ``u8 = round(K' / sk) + 128`` (rows padded to whole
   blocks, channels to a multiple of 4; ragged-tail rows repeat the last key, masked later).
3. **Attention**, one task per (batch, query head, query block of ``block_q`` rows):

   * the task's query block is quantised with one symmetric scale ``sq = max|Q_blk| / 127``
     (the softmax scale, x ``log2 e`` as in the fp32 kernel, is folded into the
     dequantisation factor) and packed ``QP[D/4, BQ*4]`` s8 (4 channels of one query adjacent:
     one 64-byte vector = 16 queries x 4 channels); ``corr[i] = -128 sum_d Qq[i, d]`` undoes
     the +128 of K;
   * ``S[k, i]`` accumulates in int32 registers, initialised to ``corr[i]``, with
     ``vpdpbusd(acc, broadcast(Ku[k, 4d:4d+4]), QP[d, 16 queries])`` (u8 K x s8 Q), so the
     accumulator is the exact ``sum_d Kq[k, d] Qq[i, d]``; dequantised by
     ``sq * scale * sk[block]`` (one fp32 multiply per score) into the fp32 tile;
   * from there on exactly the fp32 kernel: element masks, online softmax with the
     polynomial ``exp2``, ``OT += Vᵀ P`` in fp32 (bf16 V widened), output ``OT / l``.

A FlexAttention ``score_mod`` sees the scores in natural units; since smoothing shifted them
by ``q · mean``, the kernel adds ``scale * Q[i] · mean`` back (fp32, from the unquantised
query, once per query block) before the mod, so a non-linear mod (e.g. a tanh soft cap) gets
the unshifted score.  Not supported (the lowering keeps the fp32 kernel and says why):
symbolic lengths; ``block_q`` must be a multiple of 16 (one zmm of int32 per 16 queries).
Error (rounding of both operands; tests and ``benchmarks/attention_int8_cpu.py``): max |O - ref|
/ max |ref| ~0.8-1.9% on N(0, 1) inputs, output cosine ~0.99995 (fp32 kernel: ~1e-6); without
smoothing, K with an 8-sigma per-channel offset gives ~4%.
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
from .attention_cpu import _DTYPES, _LOG2E, check_cpu_tiles, check_mask_args
from .attention_cpu_softmax import accumulate_pv, normalize_and_store, online_softmax_step
from .attention_score_mod import apply_score_mod, check_score_mod, finish_kernel, with_fast_tanh
from .block_mask import BlockMask, MaskSpec

__all__ = ["QK_ATTR", "fused_attention_cpu_int8qk", "vpdpbusd"]

QK_ATTR = "attnforge.attention_qk"  # PrimFunc attr: {"qk": "int8", "smooth_k": bool, ...}
_VNNI = "llvm.x86.avx512.vpdpbusd.512"


def vpdpbusd(acc, a_u8x4, b_s8x64):
    """``acc[16] (int32) += dot4(u8 a, s8 b[lane])``: ``a`` (4 bytes) broadcast to all lanes."""
    a = tirx.reinterpret("int8x64", tirx.Broadcast(tirx.reinterpret("int32", a_u8x4), 16))
    return tirx.call_llvm_pure_intrin("int32x16", _VNNI, acc, a, b_s8x64)


def fused_attention_cpu_int8qk(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype: str = "float32",
    scale: float | None = None,
    mask: MaskSpec | None = None,
    block_q: int = 64,
    block_kv: int = 64,
    mask_input: str | None = None,
    mask_input_shape: Sequence[int] | None = None,
    empty_rows: str = "zero",
    rows: int = 4,
    global_symbol: str = "fused_attention_cpu_int8qk",
    score_mod=None,
    smooth_k: bool = True,
) -> tuple[tirx.PrimFunc, BlockMask]:
    """The int8-QKᵀ kernel and its BlockMask; arguments and PrimFunc signature as
    :func:`.attention_cpu.fused_attention_cpu` (``smooth_k``: subtract K's per-channel mean
    before quantising, see the module docstring).  Raises ``ValueError`` for ``block_q`` not
    a multiple of 16 and the fp32 kernel's invalid arguments."""
    B, Hq, Hkv, Nq, Nk, D = (int(v) for v in (batch, q_heads, kv_heads, q_len, kv_len, head_dim))
    Dv = D if v_head_dim is None else int(v_head_dim)
    mask = MaskSpec.full() if mask is None else mask
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if dtype not in _DTYPES:
        raise NotImplementedError(f"fused_attention_cpu_int8qk: dtype={dtype!r} is not "
                                  f"supported on llvm; use one of {_DTYPES}")
    check_dims(B, Hq, Hkv, Nq, Nk, D, Dv)
    check_cpu_tiles(block_q, block_kv, rows)
    check(block_q % 16 == 0, f"int8 QK^T: block_q must be a multiple of 16 (one zmm of int32 "
          f"scores per 16 queries), got {block_q}")
    mshape, bm, Hm, W = check_mask_args(mask, mask_input, mask_input_shape, empty_rows, scale,
                                        (B, Hq, Nq, Nk), block_q, block_kv)
    func = _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, mask, block_q, block_kv, mask_input,
                  mshape, empty_rows, rows, Hm, W, bool(smooth_k), score_mod)
    info = {"qk": "int8", "pv": "float32", "smooth_k": bool(smooth_k),
            "q_scales": f"symmetric per {block_q} query rows per head",
            "k_scales": f"symmetric per {block_kv} kv rows per kv head", "vnni": "vpdpbusd"}
    func = func.with_attr({"global_symbol": global_symbol, "tir.noalias": True,
                           "op_pattern": 8, QK_ATTR: info})
    return func, bm


def _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, spec, BQ, BK, mask_input, mshape,
           empty_rows, R, Hm, W, smooth_k, score_mod=None):
    f32, i32 = "float32", "int32"
    nqb, nkb = -(-Nq // BQ), -(-Nk // BK)
    D4 = -(-D // 4)
    Dp = 4 * D4
    group = Hq // Hkv
    additive = mask_input == "additive"
    has_sm = score_mod is not None  # natural units, and the smoothing shift added back
    if has_sm:
        check_score_mod(score_mod)
    sm_fast = with_fast_tanh(score_mod)
    add_back = has_sm and smooth_k
    qmul = scale if additive or has_sm else scale * _LOG2E
    emul = _LOG2E if additive or has_sm else 1.0
    neg_inf = tirx.const(float("-inf"), f32)
    zero = tirx.const(0.0, f32)
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
    NV = BQ // 16  # int32 zmm vectors per score row

    def f32c(x):
        return x if dtype == f32 else tirx.Cast(f32, x)

    def kclamp(k):
        return tirx.min(k, Nk - 1) if k_tail else k

    def qclamp(q):
        return tirx.min(q, Nq - 1) if Nq % BQ else q

    def dclamp(d):  # padded channels read a real one (their value is replaced)
        return tirx.min(d, D - 1) if Dp != D else d

    def allowed(q, k):
        return element_allowed(spec, structured, q, k, Nk, k_tail)

    def mindex(b, h, q, k):
        idx = [b if mbig[0] else 0, h if mbig[1] else 0,
               qclamp(q) if mbig[2] else 0, kclamp(k) if mbig[3] else 0]
        return tuple(idx[4 - len(mshape):])

    def tmask(score, value):
        return score + f32c(value) if additive else T.Select(value, score, neg_inf)

    def quant(x, inv):  # round-to-nearest-even, clamped to the symmetric int8 range
        return tirx.Cast(i32, tirx.max(tirx.min(tirx.nearbyint(x * inv), tirx.const(127.0, f32)),
                                       tirx.const(-127.0, f32)))

    softmax_step = online_softmax_step(BQ, BK, emul)
    pv_step = accumulate_pv(BK, BQ, Dv, Rv, f32c, kclamp)
    store_rows = normalize_and_store(BQ, Dv, Nq, dtype, empty_rows)

    def body(Q, K, V, KNB, KIDX, KFULL, M, O):
        KU = T.alloc_buffer((B, Hkv, nkb * BK, Dp), "uint8", scope="global")
        KS = T.alloc_buffer((B, Hkv, nkb), f32, scope="global")
        KM = T.alloc_buffer((B, Hkv, Dp), f32, scope="global")
        # Phase 1: per-channel mean of K over all keys (zero without smoothing).
        for t in T.parallel(B * Hkv):
            for d in T.vectorized(Dp):
                KM[t // Hkv, t % Hkv, d] = T.float32(0)
            if smooth_k:
                for k in range(Nk):
                    for d in T.vectorized(Dp):
                        KM[t // Hkv, t % Hkv, d] = KM[t // Hkv, t % Hkv, d] + f32c(
                            K[t // Hkv, t % Hkv, k, dclamp(d)])
                for d in T.vectorized(Dp):
                    KM[t // Hkv, t % Hkv, d] = KM[t // Hkv, t % Hkv, d] * T.float32(1.0 / Nk)
        # Phase 2: per-block symmetric int8 K', stored +128 as uint8 for vpdpbusd.
        for t in T.parallel(B * Hkv * nkb):
            kam = T.alloc_buffer((Dp,), f32, scope="global")
            kred = T.alloc_buffer((2,), f32, scope="global")
            kb_b = T.bind(t // (Hkv * nkb))
            kb_h = T.bind(t // nkb % Hkv)
            kb0 = T.bind(t % nkb * BK)
            for d in T.vectorized(Dp):
                kam[d] = T.float32(0)
            for kk in range(BK):
                for d in T.vectorized(Dp):
                    kam[d] = T.max(kam[d], T.abs(f32c(K[kb_b, kb_h, kclamp(kb0 + kk), dclamp(d)])
                                                 - KM[kb_b, kb_h, d]))
            kred[0] = T.float32(0)
            for d in range(D):
                kred[0] = T.max(kred[0], kam[d])
            KS[kb_b, kb_h, t % nkb] = T.Select(kred[0] > zero, kred[0] * T.float32(1 / 127.0),
                                              T.float32(1))
            kred[1] = T.float32(1) / KS[kb_b, kb_h, t % nkb]
            for kk in range(BK):
                for d in T.vectorized(Dp):
                    KU[kb_b, kb_h, kb0 + kk, d] = T.Cast("uint8", T.Select(
                        d < D, quant(f32c(K[kb_b, kb_h, kclamp(kb0 + kk), dclamp(d)])
                                     - KM[kb_b, kb_h, d], kred[1]), 0) + 128)
        # Phase 3: attention with int8 scores.
        for task in T.parallel(B * Hq * nqb):
            QP = T.alloc_buffer((D4, BQ * 4), "int8", scope="global")  # packed int8 Q block
            QC = T.alloc_buffer((BQ,), i32, scope="global")  # -128 * sum_d Qq[i, d]
            qam = T.alloc_buffer((BQ,), f32, scope="global")
            qred = T.alloc_buffer((2,), f32, scope="global")  # amax -> [dequant sq, 1/sq]
            qmean = T.alloc_buffer((BQ,), f32, scope="global")  # scale * Q[i] . mean (score_mod)
            S = T.alloc_buffer((BK, BQ), f32, scope="global")
            OT = T.alloc_buffer((Dv, BQ), f32, scope="global")
            m = T.alloc_buffer((BQ,), f32, scope="global")
            lsum = T.alloc_buffer((BQ,), f32, scope="global")
            alpha = T.alloc_buffer((BQ,), f32, scope="global")
            mu = T.alloc_buffer((BQ,), f32, scope="global")
            acc0 = T.alloc_buffer((R0, BQ), i32, scope="global")
            acc1 = T.alloc_buffer((max(R1, 1), BQ), i32, scope="global")
            oacc0 = T.alloc_buffer((Rv0, BQ), f32, scope="global")
            oacc1 = T.alloc_buffer((max(Rv1, 1), BQ), f32, scope="global")
            b = T.bind(task // (Hq * nqb))
            h = T.bind(task // nqb % Hq)
            qb = T.bind(task % nqb)
            hk = T.bind(h // group)
            hm = T.bind(h if Hm > 1 else 0)
            q0 = T.bind(qb * BQ)
            # Quantise the query block: one symmetric scale for BQ rows x D channels.
            for i in T.vectorized(BQ):
                qam[i] = T.float32(0)
                QC[i] = 0
            for d in range(D):
                for i in T.vectorized(BQ):
                    qam[i] = T.max(qam[i], T.abs(f32c(Q[b, h, qclamp(q0 + i), d])))
            qred[0] = T.float32(0)
            for i in range(BQ):
                qred[0] = T.max(qred[0], qam[i])
            qred[0] = T.Select(qred[0] > zero, qred[0] * T.float32(1 / 127.0), T.float32(1))
            qred[1] = T.float32(1) / qred[0]
            for d4, i, j in T.grid(D4, BQ, 4):
                QP[d4, i * 4 + j] = T.Cast("int8", T.Select(
                    d4 * 4 + j < D, quant(f32c(Q[b, h, qclamp(q0 + i), dclamp(d4 * 4 + j)]),
                                          qred[1]), 0))
            for d4, j in T.grid(D4, 4):
                for i in T.vectorized(BQ):
                    QC[i] = QC[i] - T.Cast(i32, QP[d4, i * 4 + j]) * 128
            qred[0] = qred[0] * T.float32(qmul)  # dequantisation factor of Q (with the scale)
            if add_back:  # the score mod must see q . k, not q . (k - mean)
                for i in T.vectorized(BQ):
                    qmean[i] = T.float32(0)
                for d in range(D):
                    for i in T.vectorized(BQ):
                        qmean[i] = qmean[i] + f32c(Q[b, h, qclamp(q0 + i), d]) * KM[b, hk, d]
                for i in T.vectorized(BQ):
                    qmean[i] = qmean[i] * T.float32(qmul)
            for d in range(Dv):
                for i in T.vectorized(BQ):
                    OT[d, i] = T.float32(0)
            for i in T.vectorized(BQ):
                m[i] = neg_inf
                lsum[i] = T.float32(0)
            for j in range(KNB[hm, qb]):
                k0 = T.bind(KIDX[hm, qb, j] * BK)
                deq = T.bind(qred[0] * KS[b, hk, KIDX[hm, qb, j]])
                # S[BK, BQ]: int32 register tile of rows x BQ, VNNI over 4 channels per step.
                for kr in range(BK // R):
                    for r, i in T.grid(R0, BQ):
                        acc0[r, i] = QC[i]
                    for r, i in T.grid(R1, BQ):
                        acc1[r, i] = QC[i]
                    for d4 in range(D4):
                        for r in T.unroll(R0):
                            for v in T.unroll(NV):
                                acc0[r, T.ramp(v * 16, 1, 16)] = vpdpbusd(
                                    acc0[r, T.ramp(v * 16, 1, 16)],
                                    KU[b, hk, k0 + kr * R + r, T.ramp(d4 * 4, 1, 4)],
                                    QP[d4, T.ramp(v * 64, 1, 64)])
                        for r in T.unroll(R1):
                            for v in T.unroll(NV):
                                acc1[r, T.ramp(v * 16, 1, 16)] = vpdpbusd(
                                    acc1[r, T.ramp(v * 16, 1, 16)],
                                    KU[b, hk, k0 + kr * R + R0 + r, T.ramp(d4 * 4, 1, 4)],
                                    QP[d4, T.ramp(v * 64, 1, 64)])
                    for r in range(R0):
                        for i in T.vectorized(BQ):
                            S[kr * R + r, i] = T.Cast(f32, acc0[r, i]) * deq
                    for r in range(R1):
                        for i in T.vectorized(BQ):
                            S[kr * R + R0 + r, i] = T.Cast(f32, acc1[r, i]) * deq
                if add_back:  # undo the smoothing shift for the score mod
                    for kk in range(BK):
                        for i in T.vectorized(BQ):
                            S[kk, i] = S[kk, i] + qmean[i]
                if has_sm:  # FlexAttention score_mod on every visited score, before masks
                    for kk in range(BK):
                        for i in T.vectorized(BQ):
                            S[kk, i] = apply_score_mod(sm_fast, S[kk, i], b, h, q0 + i, k0 + kk)
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
                pv_step(OT, oacc0, oacc1, V, S, alpha, b, hk, k0)  # OT = alpha OT + V_blk^T P, fp32
            store_rows(O, OT, alpha, lsum, b, h, q0)

    macro = T.macro(body, hygienic=True)
    shapes = (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), (B, Hq, Nq, Dv)
    func = attention_prim_func(macro, dtype, shapes, Hm, nqb, W,
                               mshape if has_tensor else None, mdt if has_tensor else None,
                               check_well_formed=not has_sm)
    return finish_kernel(func, score_mod)
