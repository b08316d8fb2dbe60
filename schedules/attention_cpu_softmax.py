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

__all__ = ["normalize_and_store", "online_softmax_step"]


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
