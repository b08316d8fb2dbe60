"""Fused flash-style attention kernel for the ``cuda`` target (tensor cores, sm_80 / sm_90).

Algorithm (FlashAttention-2 over a FlexAttention-style block-sparse layout, same contract as
:func:`schedules.attention_cpu.fused_attention_cpu`): one thread block per (batch, query head,
query tile of ``block_q`` rows) with ``block_q // warp_rows`` warps, each owning ``warp_rows``
(16 or 32: one or two m16 tiles) query rows.

1. The query tile is copied to shared memory with ``cp.async``; with 16 rows per warp it is
   loaded once into registers as ``mma`` A fragments (``ldmatrix``) and its smem reused for K/V,
   with 32 it stays in smem and is re-read per kv block (registers go to the 2x accumulators).
2. The kv blocks listed in ``kv_indices[hm, qb, :kv_num_blocks[hm, qb]]`` stream through a
   ``num_stages``-deep ``cp.async`` ring of K and V tiles (``[block_kv, D + 8]``: the 16-byte row
   padding makes ``ldmatrix`` conflict-free).  Per block and warp:

   * ``S = Q Kᵀ`` (16 x block_kv, fp32) by ``mma.sync.m16n8k16`` (fp16 or bf16 inputs), B
     fragments by ``ldmatrix`` from the K tile;
   * scores are scaled (by ``scale * log2 e``: log2 domain; with an additive mask natural units
     and ``log2 e`` moves into the exponent); the element mask only on partial blocks
     (``kv_is_full == 0``) and the ragged kv tail; the mask tensor as in the CPU kernel;
   * online softmax in registers: row max across the 4 lanes of an mma row (``shfl.xor``),
     ``alpha = 2**(m - m')``, ``P = 2**(S - m')`` (``ex2.approx``), per-lane partial row sums;
   * ``O = alpha O + P V``: the S accumulators are re-packed in registers as A fragments
     (the m16n8 C layout of two n-tiles is the m16k16 A layout), V by ``ldmatrix.trans``.
3. Row sums are reduced across the quad; ``O / l`` is written (``empty_rows``: 0 or NaN for rows
   with no allowed key).  GQA: head ``h`` reads kv head ``h // (Hq // Hkv)``.

The same body, built with ``emu=True`` (:func:`fused_attention_cuda_reference_tir`), emulates
every PTX op in plain TIR per the ISA's fragment layouts and builds for ``llvm``, which is how
the kernel's index maps and numerics are tested without a GPU.
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
    check_mask_shape,
    element_allowed,
)
from .attention_cuda_ptx import Ops
from .attention_score_mod import apply_score_mod, check_score_mod, finish_kernel
from .block_mask import BlockMask, MaskSpec

__all__ = ["cuda_target", "fused_attention_cuda", "fused_attention_cuda_reference_tir",
           "shared_memory_bytes"]

_LOG2E = 1.4426950408889634
_DTYPES = ("float16", "bfloat16")
_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
_MASK_INPUTS = (None, "bool", "additive")
_EMPTY_ROWS = ("zero", "nan")


def cuda_target(arch: str = "sm_90"):
    """``tvm.target.Target`` for one CUDA arch (JSON form; CLI strings are rejected here)."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch})


def check_cuda_tiles(D: int, Dv: int, block_q: int, block_kv: int, num_stages: int,
                     warp_rows: int) -> None:
    """Head dims, tiles, pipeline depth and shared memory the tensor-core kernel supports."""
    check(D % 16 == 0 and Dv % 16 == 0,
          f"head_dim ({D}) and v_head_dim ({Dv}) must be multiples of 16 (mma k/n tiles)")
    check(block_q in (64, 128), f"block_q must be 64 or 128, got {block_q}")
    check(block_kv > 0 and block_kv % 16 == 0,
          f"block_kv must be a positive multiple of 16, got {block_kv}")
    check(num_stages in (1, 2, 3), f"num_stages must be 1, 2 or 3, got {num_stages}")
    check(warp_rows in (16, 32), f"warp_rows must be 16 or 32, got {warp_rows}")
    smem = shared_memory_bytes(D, Dv, block_q, block_kv, num_stages, warp_rows)
    check(smem <= 227 * 1024, f"shared memory {smem} B exceeds 227 KB: lower num_stages")


def fused_attention_cuda(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype: str = "float16",
    scale: float | None = None,
    mask: MaskSpec | None = None,
    block_q: int = 128,
    block_kv: int = 64,
    mask_input: str | None = None,
    mask_input_shape: Sequence[int] | None = None,
    empty_rows: str = "zero",
    arch: str = "sm_90",
    num_stages: int = 2,
    warp_rows: int = 16,
    global_symbol: str = "fused_attention_cuda",
    emu: bool = False,
    score_mod: tirx.PrimFunc | None = None,
) -> tuple[tirx.PrimFunc, BlockMask]:
    """Build the CUDA fused attention PrimFunc and the BlockMask whose arrays it consumes.

    PrimFunc parameters (DPS, output last): ``Q[B,Hq,Nq,D]``, ``K[B,Hkv,Nk,D]``,
    ``V[B,Hkv,Nk,Dv]``, ``kv_num_blocks[Hm,nqb]``, ``kv_indices[Hm,nqb,W]``,
    ``kv_is_full[Hm,nqb,W]`` (int32), the mask tensor when ``mask_input`` is set (bool, or
    ``dtype`` for ``"additive"``), ``O[B,Hq,Nq,Dv]`` (``dtype``).  ``D`` and ``Dv`` must be
    multiples of 16; ``block_q`` 64 or 128 (4 or 8 warps); ``block_kv`` a multiple of 16.
    ``arch`` only gates support (the kernel is the same mma.sync code on sm_80..sm_90).
    ``warp_rows``: query rows per warp, 16 (``block_q // 16`` warps, Q fragments kept in
    registers) or 32 (FlashAttention-2's layout: half the warps, every K/V fragment feeds two
    m-tiles so shared-memory traffic per mma halves; Q is re-read from resident smem).
    ``emu=True`` returns the llvm-buildable emulation (see module docstring).
    ``score_mod``: a FlexAttention score modification (``schedules.attention_score_mod``)
    applied to every visited score before the masks; its captured buffers precede ``O``.
    """
    B, Hq, Hkv, Nq, Nk, D = (int(v) for v in (batch, q_heads, kv_heads, q_len, kv_len, head_dim))
    Dv = D if v_head_dim is None else int(v_head_dim)
    mask = MaskSpec.full() if mask is None else mask
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if dtype not in _DTYPES:
        raise NotImplementedError(f"fused_attention_cuda: dtype={dtype!r} is not supported; use "
                                  f"one of {_DTYPES} (tensor-core mma inputs)")
    if arch not in _ARCHS:
        raise NotImplementedError(f"fused_attention_cuda: arch={arch!r} is not supported; use one "
                                  f"of {_ARCHS} (needs mma.sync m16n8k16 and cp.async)")
    check_dims(B, Hq, Hkv, Nq, Nk, D, Dv)
    check_cuda_tiles(D, Dv, block_q, block_kv, num_stages, warp_rows)
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
    mshape = check_mask_shape(mask_input_shape, (B, Hq, Nq, Nk)) if mask_input is not None else None
    bm = BlockMask.from_spec(mask, Nq, Nk, block_q, block_kv)
    Hm, W = int(bm.kv_num_blocks.shape[0]), bm.max_blocks
    check(Hm in (1, Hq), f"static mask has {Hm} heads; expected 1 or q_heads={Hq}")
    biggest = max(B * Hq * Nq * max(D, Dv), B * Hkv * Nk * max(D, Dv))
    check(biggest < 2**31, f"tensors of {biggest} elements need 64-bit indexing, which this "
           "kernel does not emit: split the batch")
    func = _build(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale, mask, block_q, block_kv, mask_input,
                  mshape, empty_rows, num_stages, Hm, W, emu, warp_rows, score_mod=score_mod)
    attrs = {"global_symbol": global_symbol, "tir.noalias": True, "op_pattern": 8}
    if not emu:  # hand-scheduled: dlight / MetaSchedule must leave it alone
        attrs["tirx.is_scheduled"] = True
        from .attention_cuda_space import design_space_attrs  # MetaSchedule design space

        attrs.update(design_space_attrs(
            batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Nq, kv_len=Nk, head_dim=D, v_head_dim=Dv,
            dtype=dtype, scale=scale, mask=mask, block_q=block_q, block_kv=block_kv,
            mask_input=mask_input, mask_input_shape=mask_input_shape, empty_rows=empty_rows,
            arch=arch, num_stages=num_stages, warp_rows=warp_rows, score_mod=score_mod))
    return func.with_attr(attrs), bm


def fused_attention_cuda_reference_tir(**kwargs) -> tuple[tirx.PrimFunc, BlockMask]:
    """Same kernel body with every PTX op emulated in TIR: build it for ``llvm`` to test."""
    kwargs.setdefault("global_symbol", "fused_attention_cuda_emu")
    return fused_attention_cuda(**kwargs, emu=True)


def shared_memory_bytes(D: int, Dv: int, block_q: int, block_kv: int, num_stages: int,
                        warp_rows: int = 16) -> int:
    """Dynamic shared memory of one thread block (with ``warp_rows=16`` the Q tile is read
    into registers once and its smem is reused by the K/V ring; with 32 it stays resident)."""
    ring = num_stages * block_kv * (D + 8 + Dv + 8)
    q = block_q * (D + 8)
    return 2 * (max(q, ring) if warp_rows == 16 else q + ring)


def _build(B, Hq, Hkv, Nq, Nk, D, Dv, dt, scale, spec, BQ, BK, mask_input, mshape,
           empty_rows, ST, Hm, W, emu, WR, score_mod=None):
    f32 = "float32"
    nqb = -(-Nq // BQ)
    MT = WR // 16  # m16 tiles per warp
    q_regs = MT == 1  # Q fragments live in registers (else re-read from resident smem)
    NT = BQ // WR * 32
    SD, SDv = D + 8, Dv + 8  # padded smem row strides (elements)
    SMEM = shared_memory_bytes(D, Dv, BQ, BK, ST, WR) // 2
    KOFF = 0 if q_regs else BQ * SD
    VOFF = KOFF + ST * BK * SD
    NS, NO = BK // 8 * 4, Dv // 8 * 4  # fp32 score / output accumulators per thread and m-tile
    QREGS = D // 2 if q_regs else MT * 8

    def qoff(mt, ks):
        return ks * 8 if q_regs else mt * 8

    def sst(i):  # softmax-state slot (m-tile, row half) of score register i
        return i // NS * 2 + i % 4 // 2

    def ost(i):  # same for output register i
        return i // NO * 2 + i % 4 // 2

    def srow(i):
        return i // NS * 16 + i % 4 // 2 * 8

    def scol(i):
        return i % NS // 4 * 8 + i % 2

    def orow(i):
        return i // NO * 16 + i % 4 // 2 * 8

    group = Hq // Hkv
    additive = mask_input == "additive"
    has_sm = score_mod is not None  # a score mod also works on natural units
    if has_sm:
        check_score_mod(score_mod)
    qmul = scale if additive or has_sm else scale * _LOG2E
    emul = _LOG2E if additive or has_sm else 1.0
    neg_inf = tirx.const(float("-inf"), f32)
    k_tail = not isinstance(Nk, int) or Nk % BK != 0  # symbolic Nk: checked at run time
    structured = spec.kind == "structured"
    has_tensor = mask_input is not None
    tensor_every_block = has_tensor and spec.kind not in ("static", "dynamic")
    mdt = "bool" if mask_input == "bool" else dt
    mpad = (1,) * (4 - len(mshape)) + mshape if has_tensor else (1, 1, 1, 1)
    ops = Ops(dt, NT, max(ST - 1, 0), emu)
    cp16, ldsm, mma = ops.make_macros()
    rg, U = ops.reg, (T.serial if emu else T.unroll)
    sscope = "global" if emu else "shared.dyn"

    def allowed(q, k):
        return element_allowed(spec, structured, q, k, Nk, k_tail)

    def mindex(b, h, q, k):
        idx = [b if mpad[0] > 1 else 0, h if mpad[1] > 1 else 0,
               tirx.min(q, Nq - 1) if mpad[2] > 1 else 0, tirx.min(k, Nk - 1) if mpad[3] > 1 else 0]
        return tuple(idx[4 - len(mshape):])

    def tile_iters(rows, cols):
        chunks = rows * cols // 8
        return -(-chunks // NT), chunks % NT == 0, chunks

    @T.macro(hygienic=True)
    def load_tile(smem, soff, G, b, hh, r0, rmax, rows, cols, scols, tx):
        """cp.async a ``[rows, cols]`` tile of ``G[b, hh]`` from row ``r0`` (zero past rmax)."""
        n_it, even, chunks = T.meta_var(tile_iters(rows, cols))
        for it in U(n_it):
            c = T.bind(it * NT + tx)
            if even or c < chunks:
                row = T.bind(c // (cols // 8))
                col = T.bind(c % (cols // 8) * 8)
                cp16(smem, soff + row * scols + col, G,
                     [b, hh, T.min(r0 + row, rmax - 1), col], r0 + row < rmax)

    def body(Q, K, V, KNB, KIDX, KFULL, M, O):
        for bh in ops.grid(B * Hq, "blockIdx.y"):
            for qbr in ops.grid(nqb, "blockIdx.x"):
                smem = T.alloc_buffer((SMEM,), dt, scope=sscope)
                qf = T.alloc_buffer(ops.reg_shape(QREGS), dt, scope="local")
                kf = T.alloc_buffer(ops.reg_shape(8), dt, scope="local")
                pf = T.alloc_buffer(ops.reg_shape(MT * NS), dt, scope="local")
                sacc = T.alloc_buffer(ops.reg_shape(MT * NS), f32, scope="local")
                oacc = T.alloc_buffer(ops.reg_shape(MT * NO), f32, scope="local")
                mrow = T.alloc_buffer(ops.reg_shape(2 * MT), f32, scope="local")
                lrow = T.alloc_buffer(ops.reg_shape(2 * MT), f32, scope="local")
                red = T.alloc_buffer(ops.reg_shape(2 * MT), f32, scope="local")
                mu = T.alloc_buffer(ops.reg_shape(2 * MT), f32, scope="local")
                al = T.alloc_buffer(ops.reg_shape(2 * MT), f32, scope="local")
                b = T.bind(bh // Hq)
                h = T.bind(bh % Hq)
                hk = T.bind(h // group)
                hm = T.bind(h if Hm > 1 else 0)
                qb = T.bind(nqb - 1 - qbr)  # heaviest (causal) query tiles first
                q0 = T.bind(qb * BQ)
                nblk = T.bind(KNB[hm, qb])
                # -- Q tile -> smem (-> A fragments in registers); online-softmax state.
                for tx in ops.threads():
                    for r in U(2 * MT):
                        mrow[rg(tx, r)] = neg_inf
                        lrow[rg(tx, r)] = T.float32(0)
                    for i in U(MT * NO):
                        oacc[rg(tx, i)] = T.float32(0)
                    load_tile(smem, 0, Q, b, h, q0, Nq, BQ, D, SD, tx)
                    ops.commit()
                    ops.wait(0)
                ops.sync()
                if q_regs:
                    for tx in ops.threads():
                        for ks in U(D // 16):
                            ldsm(qf, tx, ks * 8, smem, tx // 32 * 16 * SD + ks * 16, SD, False,
                                 False)
                    ops.sync()  # the K/V ring reuses the Q tile's smem
                # -- prologue of the cp.async ring
                for s in U(ST - 1):
                    for tx in ops.threads():
                        if s < nblk:
                            load_tile(smem, KOFF + s * BK * SD, K, b, hk, KIDX[hm, qb, s] * BK,
                                      Nk, BK, D, SD, tx)
                            load_tile(smem, VOFF + s * BK * SDv, V, b, hk,
                                      KIDX[hm, qb, s] * BK, Nk, BK, Dv, SDv, tx)
                        ops.commit()
                for j in T.serial(nblk):
                    for tx in ops.threads():
                        if j + ST - 1 < nblk:
                            load_tile(smem, KOFF + (j + ST - 1) % ST * BK * SD, K, b, hk,
                                      KIDX[hm, qb, j + ST - 1] * BK, Nk, BK, D, SD, tx)
                            load_tile(smem, VOFF + (j + ST - 1) % ST * BK * SDv, V, b, hk,
                                      KIDX[hm, qb, j + ST - 1] * BK, Nk, BK, Dv, SDv, tx)
                        ops.commit()
                        ops.wait(ST - 1)
                    ops.sync()
                    kst = T.bind(j % ST)
                    k0 = T.bind(KIDX[hm, qb, j] * BK)
                    # -- S = Q K^T (each K fragment feeds the warp's MT m-tiles)
                    for tx in ops.threads():
                        for i in U(MT * NS):
                            sacc[rg(tx, i)] = T.float32(0)
                    for ks in U(D // 16):
                        if not q_regs:
                            for tx in ops.threads():
                                for mt in U(MT):
                                    ldsm(qf, tx, mt * 8, smem,
                                         (tx // 32 * MT + mt) * 16 * SD + ks * 16, SD, False,
                                         False)
                        for np_ in U(BK // 16):
                            for tx in ops.threads():
                                ldsm(kf, tx, 0, smem,
                                     KOFF + kst * BK * SD + np_ * 16 * SD + ks * 16, SD, True,
                                     False)
                            for tx in ops.threads():
                                for mt in U(MT):
                                    mma(sacc, tx, mt * NS + np_ * 8, qf, qoff(mt, ks), kf, 0)
                                    mma(sacc, tx, mt * NS + np_ * 8 + 4, qf, qoff(mt, ks), kf, 4)
                    # -- scale, masks, partial row max
                    for tx in ops.threads():
                        qr = T.bind(q0 + tx // 32 * 16 * MT + tx % 32 // 4)
                        kc = T.bind(k0 + tx % 4 * 2)
                        for i in U(MT * NS):
                            sacc[rg(tx, i)] = sacc[rg(tx, i)] * T.float32(qmul)
                        if has_sm:  # FlexAttention score_mod, before the masks
                            for i in U(MT * NS):
                                sacc[rg(tx, i)] = apply_score_mod(
                                    score_mod, sacc[rg(tx, i)], b, h, qr + srow(i), kc + scol(i))
                        if structured or k_tail:  # noqa: SIM102 (static, then run-time)
                            if KFULL[hm, qb, j] == 0 or k0 + BK > Nk:
                                for i in U(MT * NS):
                                    sacc[rg(tx, i)] = T.Select(
                                        allowed(qr + srow(i), kc + scol(i)), sacc[rg(tx, i)],
                                        neg_inf)
                        if has_tensor:  # noqa: SIM102
                            if tensor_every_block or KFULL[hm, qb, j] == 0:
                                for i in U(MT * NS):
                                    if additive:
                                        sacc[rg(tx, i)] = sacc[rg(tx, i)] + T.Cast(f32, M[mindex(
                                            b, h, qr + srow(i), kc + scol(i))])
                                    else:
                                        sacc[rg(tx, i)] = T.Select(M[mindex(
                                            b, h, qr + srow(i), kc + scol(i))], sacc[rg(tx, i)],
                                            neg_inf)
                        for r in U(2 * MT):
                            red[rg(tx, r)] = neg_inf
                        for i in U(MT * NS):
                            red[rg(tx, sst(i))] = T.max(red[rg(tx, sst(i))], sacc[rg(tx, i)])
                    # -- online softmax (row max across the quad), P in registers
                    for tx in ops.threads():
                        for r in U(2 * MT):
                            mnew = T.bind(T.max(mrow[rg(tx, r)], ops.quad_max(red, tx, r)))
                            mu[rg(tx, r)] = T.Select(mnew == neg_inf, T.float32(0), mnew)
                            al[rg(tx, r)] = ops.exp2((mrow[rg(tx, r)] - mu[rg(tx, r)])
                                                     * T.float32(emul))
                            mrow[rg(tx, r)] = mnew
                            lrow[rg(tx, r)] = lrow[rg(tx, r)] * al[rg(tx, r)]
                        for i in U(MT * NO):
                            oacc[rg(tx, i)] = oacc[rg(tx, i)] * al[rg(tx, ost(i))]
                        for i in U(MT * NS):
                            sacc[rg(tx, i)] = ops.exp2((sacc[rg(tx, i)] - mu[rg(tx, sst(i))])
                                                       * T.float32(emul))
                            lrow[rg(tx, sst(i))] = lrow[rg(tx, sst(i))] + sacc[rg(tx, i)]
                            pf[rg(tx, i)] = T.Cast(dt, sacc[rg(tx, i)])
                    # -- O += P V (each V fragment feeds the warp's MT m-tiles)
                    for ks in U(BK // 16):
                        for np_ in U(Dv // 16):
                            for tx in ops.threads():
                                ldsm(kf, tx, 0, smem,
                                     VOFF + kst * BK * SDv + ks * 16 * SDv + np_ * 16,
                                     SDv, False, True)
                            for tx in ops.threads():
                                for mt in U(MT):
                                    mma(oacc, tx, mt * NO + np_ * 8, pf, mt * NS + ks * 8, kf, 0)
                                    mma(oacc, tx, mt * NO + np_ * 8 + 4, pf, mt * NS + ks * 8,
                                        kf, 4)
                    ops.sync()
                # -- epilogue: O / l
                for tx in ops.threads():
                    qr = T.bind(q0 + tx // 32 * 16 * MT + tx % 32 // 4)
                    for r in U(2 * MT):
                        if empty_rows == "zero":
                            lsum = T.bind(ops.quad_sum(lrow, tx, r))
                            al[rg(tx, r)] = T.Select(lsum > T.float32(0), T.float32(1) / lsum,
                                                     T.float32(0))
                        else:
                            al[rg(tx, r)] = T.float32(1) / ops.quad_sum(lrow, tx, r)
                    for i in U(MT * NO):
                        if qr + orow(i) < Nq:
                            O[b, h, qr + orow(i), i % NO // 4 * 8 + tx % 4 * 2 + i % 2] = T.Cast(
                                dt, oacc[rg(tx, i)] * al[rg(tx, ost(i))])

    macro = T.macro(body, hygienic=True)
    shapes = (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), (B, Hq, Nq, Dv)
    func = attention_prim_func(macro, dt, shapes, Hm, nqb, W,
                               mshape if has_tensor else None, mdt if has_tensor else None,
                               check_well_formed=not has_sm)
    return finish_kernel(func, score_mod)
