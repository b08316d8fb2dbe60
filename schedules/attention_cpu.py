"""Fused flash-style attention kernel for the ``llvm`` (CPU) target.

Algorithm (FlashAttention-2 online softmax over a FlexAttention-style block-sparse layout):
one ``T.parallel`` task per (batch, query head, query block of ``block_q`` rows).  A task

1. loads its query block transposed, ``QT[D, BQ]``, pre-multiplied by ``scale * log2(e)`` so
   scores live in the log2 domain (with an additive mask the scores stay in natural units
   and the ``log2(e)`` factor moves into the exponent, so ``finfo.min`` never overflows);
2. walks the kv blocks listed in ``kv_indices[hm, qb, :kv_num_blocks[hm, qb]]``; for each:

   * ``S[BK, BQ] = K_blk · QTᵀ`` with a ``rows``-row register micro-kernel (``rows`` x ``BQ``
     fp32 accumulators = ``rows * BQ / 16`` zmm registers, one broadcast of K per row);
     the tile is *transposed* so every softmax step runs across vector lanes of independent
     queries (no horizontal reductions);
   * the element mask, only where needed: the structured rule (``MaskSpec.allowed`` from the
     indices) on partial blocks (``kv_is_full == 0``) and ragged kv tails, and the mask tensor
     (bool: ``-inf`` where False; additive: ``+ value``) on partial blocks for a static mask or
     on every visited block otherwise (a ``[.., Nq, Nk]`` tensor shared by the heads is first
     transposed once per call, tile by tile, so that blocks read it as query vectors);
   * online softmax: ``m' = max(m, max_k S)``, ``alpha = 2**(m - m')``, ``P = 2**(S - m')`` by a
     vectorised polynomial (``attention_cpu_exp``), ``l = alpha l + sum_k P``;
   * ``OT[Dv, BQ] = alpha OT + Vᵀ P`` with the same micro-kernel (rescale fused into the load);
3. writes ``O[b, h, q, :] = OT[:, q] / l[q]``; a row with no allowed key (``l == 0``) gives 0
   (``empty_rows="zero"``) or NaN (``"nan"``).

Masked scores are ``-inf``; while a row's running max is still ``-inf`` the exponent uses 0
instead, and ``exp2_poly`` returns exactly 0 for arguments <= -127, so no ``inf - inf`` NaN
arises and masked keys get exactly zero weight.  Knobs: ``block_q``, ``block_kv``, ``rows``.
GQA/MQA: head ``h`` reads kv head ``h // (Hq // Hkv)``.  Out-of-range rows of ragged tails are
clamped on load and masked (keys) or not stored (queries).  Accumulation is fp32; bfloat16
inputs are widened on load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .attention_args import (
    attention_prim_func,
    check,
    check_dims,
    check_mask_shape,
    element_allowed,
)
from .attention_cpu_softmax import accumulate_pv, normalize_and_store, online_softmax_step
from .attention_score_mod import (
    apply_score_mod,
    check_score_mod,
    finish_kernel,
    with_fast_tanh,
)
from .block_mask import BlockMask, MaskSpec

__all__ = ["default_cpu_target", "fused_attention_cpu"]

_LOG2E = 1.4426950408889634
_DTYPES = ("float32", "bfloat16")
_MASK_INPUTS = (None, "bool", "additive")
_EMPTY_ROWS = ("zero", "nan")
_MAX_MASK_COPY = 256 << 20  # bytes: larger element masks are read transposed per block


def default_cpu_target() -> tvm.target.Target:
    """``llvm`` target for this host (``-mcpu=native`` equivalent, e.g. znver4)."""
    import tvm.target.codegen as cg

    cpu = cg.llvm_get_system_cpu() if hasattr(cg, "llvm_get_system_cpu") else ""
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu or "generic"})


def check_cpu_tiles(block_q: int, block_kv: int, rows: int) -> None:
    """Block sizes and micro-kernel height the llvm kernel can tile with."""
    check(block_q > 0 and block_kv > 0,
          f"block_q and block_kv must be positive, got {block_q}x{block_kv}")
    check(rows > 0, f"rows (micro-kernel height) must be positive, got {rows}")
    check(block_kv % rows == 0, f"block_kv ({block_kv}) must be a multiple of rows ({rows})")


def check_mask_args(mask, mask_input, mask_input_shape, empty_rows, scale, dims, block_q,
                    block_kv):
    """The CPU kernels' shared checks of scale / mask / empty_rows, and the block layout:
    returns ``(mask_shape or None, BlockMask, layout heads, max blocks per row)``."""
    B, Hq, Nq, Nk = dims
    check(math.isfinite(scale), f"scale must be finite, got {scale}")
    check(mask_input in _MASK_INPUTS, f"mask_input must be one of {_MASK_INPUTS}, "
          f"got {mask_input!r}")
    check(empty_rows in _EMPTY_ROWS, f"empty_rows must be one of {_EMPTY_ROWS}, "
          f"got {empty_rows!r}")
    check(isinstance(mask, MaskSpec), f"mask must be a MaskSpec, got {type(mask).__name__}")
    if mask.kind == "static":
        check(mask_input == "bool", "mask kind 'static': also pass the static mask as a bool "
              "tensor (mask_input='bool')")
    if mask.kind == "dynamic":
        check(mask_input is not None, "mask kind 'dynamic': pass the mask tensor "
              "(mask_input='bool' or 'additive')")
    mshape = None
    if mask_input is not None:
        mshape = check_mask_shape(mask_input_shape, (B, Hq, Nq, Nk))
    bm = BlockMask.from_spec(mask, Nq, Nk, block_q, block_kv)
    Hm, W = int(bm.kv_num_blocks.shape[0]), bm.max_blocks
    check(Hm in (1, Hq), f"static mask has {Hm} heads; expected 1 or q_heads={Hq}")
    return mshape, bm, Hm, W


def fused_attention_cpu(
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
    global_symbol: str = "fused_attention_cpu",
    score_mod: tirx.PrimFunc | None = None,
) -> tuple[tirx.PrimFunc, BlockMask]:
    """Build the fused attention PrimFunc and the BlockMask whose arrays it consumes.

    Parameters of the PrimFunc, in order: ``Q[B,Hq,Nq,D]``, ``K[B,Hkv,Nk,D]``,
    ``V[B,Hkv,Nk,Dv]``, ``kv_num_blocks[Hm,nqb]``, ``kv_indices[Hm,nqb,W]``,
    ``kv_is_full[Hm,nqb,W]`` (int32), the mask tensor when ``mask_input`` is set (bool, or
    ``dtype`` for ``"additive"``), and the output ``O[B,Hq,Nq,Dv]``.

    ``rows`` is the register micro-kernel height (kv rows per step of ``S``, ``Dv`` rows per
    step of ``O``); the fast path needs ``ceil(rows / 2) * block_q * 4 < 1024`` bytes (e.g.
    ``block_q=64, rows=4``), larger tiles still compute correctly but spill to memory.
    ``scale`` defaults to ``1/sqrt(head_dim)``.  ``score_mod``: a FlexAttention score
    modification (``schedules.attention_score_mod``) applied to every visited score before the
    masks; its captured buffers follow the mask tensor.  Raises ``ValueError`` for
    invalid arguments and ``NotImplementedError`` for unsupported dtypes.
    """
    B, Hq, Hkv, Nq, Nk, D = (int(v) for v in (batch, q_heads, kv_heads, q_len, kv_len, head_dim))
    Dv = D if v_head_dim is None else int(v_head_dim)
    mask = MaskSpec.full() if mask is None else mask
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if dtype not in _DTYPES:
        raise NotImplementedError(f"fused_attention_cpu: dtype={dtype!r} is not supported on llvm; "
                                  f"use one of {_DTYPES} (cast the inputs)")
    check_dims(B, Hq, Hkv, Nq, Nk, D, Dv)
    check_cpu_tiles(block_q, block_kv, rows)
    mshape, bm, Hm, W = check_mask_args(mask, mask_input, mask_input_shape, empty_rows, scale,
                                        (B, Hq, Nq, Nk), block_q, block_kv)
    func = _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, mask, block_q, block_kv, mask_input,
                  mshape, empty_rows, rows, Hm, W, bm.visited_fraction, score_mod=score_mod)
    func = func.with_attr({"global_symbol": global_symbol, "tir.noalias": True,
                           "op_pattern": 8})
    from .attention_cpu_space import ARGS_KEY, kernel_args_json  # MetaSchedule design space

    args = kernel_args_json(batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Nq, kv_len=Nk, head_dim=D,
                            v_head_dim=Dv, dtype=dtype, scale=scale, mask=mask, block_q=block_q,
                            block_kv=block_kv, mask_input=mask_input,
                            mask_input_shape=mask_input_shape, empty_rows=empty_rows, rows=rows)
    if args is not None and score_mod is None:  # the design space has no score mod
        func = func.with_attr(ARGS_KEY, args)
    return func, bm


def _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, spec, BQ, BK, mask_input, mshape,
           empty_rows, R, Hm, W, visited, score_mod=None):
    f32 = "float32"
    nqb = -(-Nq // BQ)
    group = Hq // Hkv
    additive = mask_input == "additive"
    # log2-domain scores unless an additive mask must be added in natural units.
    has_sm = score_mod is not None  # a score mod also works on natural units
    if has_sm:
        check_score_mod(score_mod)
    sm_fast = with_fast_tanh(score_mod)  # tanh as a vectorisable rational polynomial
    qmul = scale if additive or has_sm else scale * _LOG2E
    emul = _LOG2E if additive or has_sm else 1.0
    neg_inf = tirx.const(float("-inf"), f32)
    k_tail = not isinstance(Nk, int) or Nk % BK != 0  # symbolic Nk: checked at run time
    structured = spec.kind == "structured"
    has_tensor = mask_input is not None
    tensor_every_block = has_tensor and spec.kind not in ("static", "dynamic")
    mdt = "bool" if mask_input == "bool" else dtype
    mpad = (1,) * (4 - len(mshape)) + mshape if has_tensor else (1, 1, 1, 1)
    # dims > 1 (a symbolic dim, a tir var from attention_cpu_dynamic, is a full length)
    mbig = tuple(not isinstance(d, int) or d > 1 for d in mpad)
    q_bcast = not mbig[2]
    # A [.., Nq, Nk] mask shared by several heads and applied on every visited block is
    # transposed once per call ([.., Nk, Nq_pad]) so that blocks read it as vectors; worth it
    # when the blocks visited over all heads cover the mask at least twice.
    nqp, nkb = nqb * BQ, -(-Nk // BK)
    mt_bytes = mpad[0] * nkb * BK * nqp * (1 if mask_input == "bool" else 4)
    pre_t = (isinstance(Nq, int) and has_tensor and not q_bcast and mpad[1] == 1
             and Hq * visited >= 2 and spec.kind != "static" and mt_bytes <= _MAX_MASK_COPY)
    mt_shape = (mpad[0], 1, nkb * BK, nqp) if pre_t else (1, 1, 1, 1)
    Rv = R if Dv % R == 0 else math.gcd(Dv, R)
    # Two register tiles so each stays under LowerTVMBuiltin's 1 KiB stack-alloca limit.
    R0, R1 = R - R // 2, R // 2

    def f32c(x):
        return x if dtype == f32 else tirx.Cast(f32, x)

    def kclamp(k):
        return tirx.min(k, Nk - 1) if k_tail else k

    def qclamp(q):
        return tirx.min(q, Nq - 1) if not isinstance(Nq, int) or Nq % BQ else q

    def allowed(q, k):
        return element_allowed(spec, structured, q, k, Nk, k_tail)

    def mindex(b, h, q, k):
        idx = [b if mbig[0] else 0, h if mbig[1] else 0,
               qclamp(q) if mbig[2] else 0, kclamp(k) if mbig[3] else 0]
        return tuple(idx[4 - len(mshape):])

    def tmask(score, value):
        """Apply one mask-tensor element: add it, or -inf where False."""
        return score + f32c(value) if additive else T.Select(value, score, neg_inf)

    softmax_step = online_softmax_step(BQ, BK, emul)
    pv_step = accumulate_pv(BK, BQ, Dv, Rv, f32c, kclamp)
    store_rows = normalize_and_store(BQ, Dv, Nq, dtype, empty_rows)

    def body(Q, K, V, KNB, KIDX, KFULL, M, O):
        MT = T.alloc_buffer(mt_shape, mdt, scope="global")  # transposed mask (if pre_t)
        if pre_t:  # tile by tile, so that both sides stay in L1
            for t in T.parallel(mpad[0] * nqb * nkb):
                for i, kk in T.grid(BQ, BK):
                    MT[t // (nqb * nkb), 0, t % nkb * BK + kk, t // nkb % nqb * BQ + i] = M[
                        mindex(t // (nqb * nkb), 0, t // nkb % nqb * BQ + i, t % nkb * BK + kk)]
        for task in T.parallel(B * Hq * nqb):
            # Scope "global": TVM 0.27 turns every "local" allocation into a
            # TVMBackendAllocWorkspace call, and only "global" ones under 1 KiB into stack
            # allocas that LLVM promotes to registers (acc0/acc1, m, lsum, alpha, mu).
            QT = T.alloc_buffer((D, BQ), f32, scope="global")
            S = T.alloc_buffer((BK, BQ), f32, scope="global")
            OT = T.alloc_buffer((Dv, BQ), f32, scope="global")
            m = T.alloc_buffer((BQ,), f32, scope="global")  # running max
            lsum = T.alloc_buffer((BQ,), f32, scope="global")  # running sum
            alpha = T.alloc_buffer((BQ,), f32, scope="global")  # rescale factor
            mu = T.alloc_buffer((BQ,), f32, scope="global")  # max used in the exponent
            acc0 = T.alloc_buffer((R0, BQ), f32, scope="global")  # register tile, rows [0, R0)
            acc1 = T.alloc_buffer((max(R1, 1), BQ), f32, scope="global")  # rows [R0, R)
            b = T.bind(task // (Hq * nqb))
            h = T.bind(task // nqb % Hq)
            qb = T.bind(task % nqb)
            hk = T.bind(h // group)
            hm = T.bind(h if Hm > 1 else 0)
            q0 = T.bind(qb * BQ)
            for d, i in T.grid(D, BQ):
                QT[d, i] = f32c(Q[b, h, qclamp(q0 + i), d]) * T.float32(qmul)
            for d in range(Dv):
                for i in T.vectorized(BQ):
                    OT[d, i] = T.float32(0)
            for i in T.vectorized(BQ):
                m[i] = neg_inf
                lsum[i] = T.float32(0)
            for j in range(KNB[hm, qb]):
                k0 = T.bind(KIDX[hm, qb, j] * BK)
                # S[BK, BQ] = K_blk QT^T, rows x BQ register tile per step.
                for kr in range(BK // R):
                    for r, i in T.grid(R0, BQ):
                        acc0[r, i] = T.float32(0)
                    for r, i in T.grid(R1, BQ):
                        acc1[r, i] = T.float32(0)
                    for d in range(D):
                        for r in T.unroll(R0):
                            for i in T.vectorized(BQ):
                                acc0[r, i] = acc0[r, i] + f32c(
                                    K[b, hk, kclamp(k0 + kr * R + r), d]) * QT[d, i]
                        for r in T.unroll(R1):
                            for i in T.vectorized(BQ):
                                acc1[r, i] = acc1[r, i] + f32c(
                                    K[b, hk, kclamp(k0 + kr * R + R0 + r), d]) * QT[d, i]
                    for r, i in T.grid(R0, BQ):
                        S[kr * R + r, i] = acc0[r, i]
                    for r, i in T.grid(R1, BQ):
                        S[kr * R + R0 + r, i] = acc1[r, i]
                if has_sm:  # FlexAttention score_mod on every visited score, before masks
                    for kk in range(BK):
                        for i in T.vectorized(BQ):
                            S[kk, i] = apply_score_mod(sm_fast, S[kk, i], b, h, q0 + i,
                                                       k0 + kk)
                # Outer ifs are Python (static) conditions, inner ones run-time TIR conditions.
                if structured or k_tail:  # noqa: SIM102
                    if KFULL[hm, qb, j] == 0 or k0 + BK > Nk:
                        for kk in range(BK):
                            for i in T.vectorized(BQ):
                                S[kk, i] = T.Select(allowed(q0 + i, k0 + kk), S[kk, i], neg_inf)
                if has_tensor:  # noqa: SIM102
                    if tensor_every_block or KFULL[hm, qb, j] == 0:
                        if pre_t:
                            for kk in range(BK):
                                for i in T.vectorized(BQ):
                                    S[kk, i] = tmask(S[kk, i], MT[b if mpad[0] > 1 else 0, 0,
                                                                  k0 + kk, q0 + i])
                        elif q_bcast:  # e.g. key padding [B, 1, 1, Nk]: one value per key
                            for kk in range(BK):
                                for i in T.vectorized(BQ):
                                    S[kk, i] = tmask(S[kk, i], M[mindex(b, h, q0, k0 + kk)])
                        else:  # transposed read of the [q, k] tile (scalar loop)
                            for i, kk in T.grid(BQ, BK):
                                S[kk, i] = tmask(S[kk, i], M[mindex(b, h, q0 + i, k0 + kk)])
                softmax_step(S, m, mu, alpha, lsum)  # online softmax across lanes (queries)
                pv_step(OT, acc0, acc1, V, S, alpha, b, hk, k0)  # OT = alpha OT + V_blk^T P
            store_rows(O, OT, alpha, lsum, b, h, q0)

    macro = T.macro(body, hygienic=True)
    shapes = (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), (B, Hq, Nq, Dv)
    func = attention_prim_func(macro, dtype, shapes, Hm, nqb, W,
                               mshape if has_tensor else None, mdt if has_tensor else None,
                               check_well_formed=not has_sm)
    return finish_kernel(func, score_mod)
