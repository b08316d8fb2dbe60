"""A vectorisable ``exp2`` for TIR kernels on CPU.

``T.exp``/``T.exp2`` lower to scalar libm calls even inside ``T.vectorized`` loops, which
halves the speed of a fused attention kernel.  :func:`exp2_poly` builds ``2**x`` from plain
arithmetic that LLVM vectorises (AVX-512 on Zen 4):

* clamp ``x`` at -127 (every input at or below gives exactly ``0.0``, so masked ``-inf`` scores
  give zero weight),
* split ``x = n + f`` with ``n = floor(x)``, ``f`` in ``[0, 1)``,
* ``2**n`` by writing ``n + 127`` into the float exponent bits (``n = -127`` -> ``0.0``),
* ``2**f`` by a degree-5 polynomial (max. relative error 9e-8, below fp32 rounding).

Valid for ``x <= 0`` (the online softmax only exponentiates ``score - running_max``); results
for ``x > 128`` overflow the exponent field.
"""

from __future__ import annotations

from tvm import tirx

__all__ = ["EXP2_COEFFS", "exp2_poly"]

# 2**f on [0, 1): relative-error minimax fit (iteratively re-weighted least squares).
EXP2_COEFFS = (
    0.9999999403953552,
    0.6931530833244324,
    0.24015362560749054,
    0.05582631379365921,
    0.008989343419671059,
    0.001877575763501227,
)


def exp2_poly(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2**x`` for a float32 expression ``x <= 0`` (see module docstring)."""
    f32 = "float32"
    xv, nv, fv = tirx.Var("e2x", f32), tirx.Var("e2n", f32), tirx.Var("e2f", f32)
    p = tirx.const(EXP2_COEFFS[-1], f32)
    for c in reversed(EXP2_COEFFS[:-1]):
        p = p * fv + tirx.const(c, f32)
    bits = tirx.shift_left(tirx.Cast("int32", nv) + 127, tirx.const(23, "int32"))
    body = tirx.Let(fv, xv - nv, tirx.reinterpret(f32, bits) * p)
    return tirx.Let(xv, tirx.max(x, tirx.const(-127.0, f32)), tirx.Let(nv, tirx.floor(xv), body))
