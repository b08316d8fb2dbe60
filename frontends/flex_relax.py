"""A FlexAttention score mod (scalar TIR PrimFunc) as broadcast Relax ops on the score tensor.

The kernels inline the score mod's TIR expression; the *reference* body of a FlexAttention site
(what runs when no kernel takes it) needs the same rule on a dense ``[B, H, Nq, Nk]`` score
tensor.  We rebuild it from Relax operators rather than calling a TIR PrimFunc, because TVM's
``ToMixedPrecision`` (``precision="float16"``) rejects modules holding ``call_tir``.  Index
variables become ``arange`` constants shaped to broadcast (``b`` ``[B,1,1,1]``, ``h``
``[1,H,1,1]``, ``q`` ``[1,1,Nq,1]``, ``kv`` ``[1,1,1,Nk]``), captured-buffer reads become
``take`` on the flattened constant.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

__all__ = ["score_mod_relax"]

_BIN = {"Add": relax.op.add, "Sub": relax.op.subtract, "Mul": relax.op.multiply,
        "Div": relax.op.divide, "FloorDiv": relax.op.floor_divide,
        "FloorMod": relax.op.floor_mod, "Min": relax.op.minimum, "Max": relax.op.maximum,
        "EQ": relax.op.equal, "NE": relax.op.not_equal, "LT": relax.op.less,
        "LE": relax.op.less_equal, "GT": relax.op.greater, "GE": relax.op.greater_equal,
        "And": relax.op.logical_and, "Or": relax.op.logical_or}
_CALLS = {"tanh": relax.op.tanh, "exp": relax.op.exp, "log": relax.op.log,
          "sqrt": relax.op.sqrt, "rsqrt": relax.op.rsqrt, "sigmoid": relax.op.sigmoid,
          "sin": relax.op.sin, "cos": relax.op.cos, "erf": relax.op.erf, "fabs": relax.op.abs,
          "floor": relax.op.floor, "ceil": relax.op.ceil, "round": relax.op.round,
          "trunc": relax.op.trunc, "pow": relax.op.power}


def score_mod_relax(bb: relax.BlockBuilder, score_mod, score, shape, consts) -> relax.Expr:
    """Emit ``score_mod`` applied element-wise to ``score`` ([B, H, Nq, Nk] float32)."""
    B, H, Nq, Nk = shape
    params = list(score_mod.params)
    env = {params[0]: score}
    for i, (p, n) in enumerate(zip(params[1:5], (B, H, Nq, Nk), strict=True)):
        idx = np.arange(n, dtype="int32").reshape([n if d == i else 1 for d in range(4)])
        env[p] = relax.const(idx)
    bufs = {p: (relax.const(np.ascontiguousarray(c).reshape(-1)), c.shape)
            for p, c in zip(params[5:], consts, strict=True)}
    memo: dict = {}

    def emit(e):
        if e in memo:
            return memo[e]
        memo[e] = out = bb.emit(_convert(e))
        return out

    def _convert(e):
        kind = type(e).__name__
        if e in env:
            return env[e]
        if kind in ("IntImm", "FloatImm"):
            return relax.const(e.value, str(e.ty.dtype))
        if kind in _BIN:
            return _BIN[kind](emit(e.a), emit(e.b))
        if kind == "Not":
            return relax.op.logical_not(emit(e.a))
        if kind == "Select":
            return relax.op.where(emit(e.condition), emit(e.true_value), emit(e.false_value))
        if kind == "Cast":
            return relax.op.astype(emit(e.value), str(e.ty.dtype))
        if kind == "Call":
            name = e.op.name.split(".")[-1]
            if name == "exp2":
                return relax.op.power(relax.const(2.0, "float32"), emit(e.args[0]))
            if name == "log2":
                return relax.op.divide(relax.op.log(emit(e.args[0])),
                                       relax.const(float(np.log(2.0)), "float32"))
            if name in _CALLS:
                return _CALLS[name](*[emit(a) for a in e.args])
        if kind == "TensorLoad" and e.source in bufs:
            flat, cshape = bufs[e.source]
            lin = None
            for i, ix in enumerate(e.indices):  # row-major linear index
                stride = int(np.prod(cshape[i + 1:], dtype=np.int64))
                term = emit(ix) if stride == 1 else relax.op.multiply(
                    emit(ix), relax.const(stride, "int32"))
                lin = term if lin is None else relax.op.add(lin, term)
            return relax.op.take(flat, lin, axis=0)
        raise NotImplementedError(f"score_mod: no Relax form for TIR {kind} ({e})")

    out = emit(score_mod.body.value)
    if str(out.ty.dtype) != "float32":
        out = bb.emit(relax.op.astype(out, "float32"))
    if [int(s) for s in out.ty.shape.values] != list(shape):
        out = bb.emit(relax.op.broadcast_to(out, list(shape)))
    return out
