"""The online-softmax pieces shared by the CPU fused attention kernels (fp32, bf16, int8 QKᵀ).

Each factory returns a hygienic ``T.macro`` that the kernels' TVMScript bodies call, so the
three kernels expand the same statements (and the fp32 kernel's TIR, which its MetaSchedule
records hash, is what it was before the split). Scores live in ``S[key, query]`` (queries in
the vector lanes), in log2 units scaled by ``emul``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .attention_cpu_exp import exp2_poly

__all__ = ["accumulate_pv", "normalize_and_store", "online_softmax_step"]


def online_softmax_step(BQ: int, BK: int, emul: float):
    """Macro ``(S, m, mu, alpha, lsum)``: fold one key block into the running max ``m`` and sum
    ``lsum``; ``S`` becomes the block's probabilities ``exp2((S - mu) * emul)`` and ``alpha``
    the factor that rescales what was accumulated before (fully masked rows: ``-inf`` max,
    zero probabilities, no NaN)."""
    neg_inf = tirx.const(float("-inf"), "float32")
    zero = tirx.const(0.0, "float32")

    def step(S, m, mu, alpha, lsum):
        for i in T.vectorized(BQ):
            mu[i] = m[i]
        for kk in range(BK):
            for i in T.vectorized(BQ):
                mu[i] = T.max(mu[i], S[kk, i])
        for i in T.vectorized(BQ):
            alpha[i] = exp2_poly((m[i] - T.Select(mu[i] == neg_inf, zero,
                                                  mu[i])) * T.float32(emul))
            m[i] = mu[i]
            mu[i] = T.Select(mu[i] == neg_inf, zero, mu[i])
            lsum[i] = lsum[i] * alpha[i]
        for kk in range(BK):
            for i in T.vectorized(BQ):
                S[kk, i] = exp2_poly((S[kk, i] - mu[i]) * T.float32(emul))
                lsum[i] = lsum[i] + S[kk, i]

    return T.macro(step, hygienic=True)


def accumulate_pv(BK: int, BQ: int, Dv: int, Rv: int, f32c, kclamp):
    """Macro ``(OT, acc0, acc1, V, S, alpha, b, hk, k0)``: ``OT = alpha * OT + V_blkᵀ P`` in
    fp32, ``Rv`` output channels per step split over two register tiles (``acc0``: the first
    ``Rv - Rv // 2`` rows, ``acc1``: the rest; each under LowerTVMBuiltin's 1 KiB stack-alloca
    limit). ``f32c`` widens a V element to fp32, ``kclamp`` clamps a key index into range."""
    Rv0, Rv1 = Rv - Rv // 2, Rv // 2

    def pv(OT, acc0, acc1, V, S, alpha, b, hk, k0):
        for dr in range(Dv // Rv):
            for r, i in T.grid(Rv0, BQ):
                acc0[r, i] = OT[dr * Rv + r, i] * alpha[i]
            for r, i in T.grid(Rv1, BQ):
                acc1[r, i] = OT[dr * Rv + Rv0 + r, i] * alpha[i]
            for kk in range(BK):
                for r in T.unroll(Rv0):
                    for i in T.vectorized(BQ):
                        acc0[r, i] = acc0[r, i] + f32c(
                            V[b, hk, kclamp(k0 + kk), dr * Rv + r]) * S[kk, i]
                for r in T.unroll(Rv1):
                    for i in T.vectorized(BQ):
                        acc1[r, i] = acc1[r, i] + f32c(
                            V[b, hk, kclamp(k0 + kk), dr * Rv + Rv0 + r]) * S[kk, i]
            for r, i in T.grid(Rv0, BQ):
                OT[dr * Rv + r, i] = acc0[r, i]
            for r, i in T.grid(Rv1, BQ):
                OT[dr * Rv + Rv0 + r, i] = acc1[r, i]

    return T.macro(pv, hygienic=True)


def normalize_and_store(BQ: int, Dv: int, Nq, dtype: str, empty_rows: str):
    """Macro ``(O, OT, alpha, lsum, b, h, q0)``: ``O[b, h, q0 + i, :] = OT[:, i] / lsum[i]`` for
    the block's rows inside ``Nq``; a row with no visible key gets zeros (``empty_rows="zero"``)
    or NaN (``"nan"``, SDPA's behaviour)."""
    zero = tirx.const(0.0, "float32")

    def store(O, OT, alpha, lsum, b, h, q0):
        for i in T.vectorized(BQ):
            if empty_rows == "zero":
                alpha[i] = T.Select(lsum[i] > zero, T.float32(1) / lsum[i], zero)
            else:
                alpha[i] = T.float32(1) / lsum[i]
        for i in range(BQ):
            if q0 + i < Nq:
                for d in range(Dv):
                    if empty_rows == "zero":
                        O[b, h, q0 + i, d] = T.Cast(dtype, OT[d, i] * alpha[i])
                    else:
                        O[b, h, q0 + i, d] = T.Cast(dtype, OT[d, i] / lsum[i])

    return T.macro(store, hygienic=True)
