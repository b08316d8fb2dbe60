"""Score modifications for the fused attention kernels (FlexAttention's ``score_mod``).

A score mod is a scalar TIR PrimFunc

    ``score_mod(score: float32, b: int32, h: int32, q: int32, k: int32, *captured) -> float32``

whose body is a single ``return expr`` (``captured`` are buffers, e.g. a per-head ALiBi slope
vector, read with indices already clamped into range).  ``score`` is in natural units (after
the ``scale`` multiplication, before the softmax), ``h`` is the *query* head.

The kernels inline it (:func:`apply_score_mod`) on every visited score, before the element
mask, and take the captured buffers as extra parameters just before the output
(:func:`with_captured_buffers`); sites without a score mod pay nothing.
The unlowered (reference) Relax body of a FlexAttention site applies the same expression as
broadcast Relax ops (``frontends/flex_relax.py``).
"""

from __future__ import annotations

from tvm import tirx

__all__ = ["apply_score_mod", "captured_buffers", "check_score_mod", "fast_tanh", "finish_kernel",
           "score_mod_from_attr", "score_mod_to_attr", "verify", "with_captured_buffers",
           "with_fast_tanh"]


def check_score_mod(func) -> None:
    """Raise ``ValueError`` unless ``func`` has the score-mod form (module docstring)."""
    ok = isinstance(func, tirx.PrimFunc) and len(func.params) >= 5 and isinstance(
        func.body, tirx.Return)
    if ok:
        dts = [str(getattr(p.ty, "dtype", "")) for p in func.params[:5]]
        ok = dts == ["float32", "int32", "int32", "int32", "int32"]
    if not ok:
        raise ValueError("score_mod must be a PrimFunc (score: float32, b, h, q, k: int32, "
                         "*buffers) -> float32 whose body is one return statement")


def captured_buffers(func) -> list:
    """The captured buffers of a score mod, in parameter order."""
    return list(func.params[5:])


def apply_score_mod(func, score, b, h, q, k):
    """The score mod's expression with its scalar parameters replaced by the given values."""
    names = func.params[:5]
    vmap = {}
    for v, e in zip(names, (score, b, h, q, k), strict=True):
        e = tirx.const(e, "int32") if isinstance(e, int) else e
        vt = str(v.ty.dtype)
        vmap[v] = e if str(e.ty.dtype) == vt else tirx.Cast(vt, e)
    return func.specialize(vmap).body.value  # PrimFunc.specialize substitutes the params


def with_captured_buffers(func, score_mod):
    """``func`` with the score mod's buffers as extra parameters inserted before the last one
    (the output, destination-passing style)."""
    bufs = captured_buffers(score_mod) if score_mod is not None else []
    if not bufs:
        return func
    params = list(func.params)
    params = params[:-1] + bufs + params[-1:]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def score_mod_to_attr(func) -> dict:
    """A score mod as a Relax function attr value (a PrimFunc inside attrs breaks TVMScript
    printing; its return expression and parameters print fine)."""
    check_score_mod(func)
    return {"expr": func.body.value, "params": list(func.params)}


def score_mod_from_attr(value):
    """Inverse of :func:`score_mod_to_attr` (``None`` stays ``None``)."""
    if value is None:
        return None
    import tvm

    func = tirx.PrimFunc(list(value["params"]), tirx.Return(value["expr"]),
                         tvm.ir.PrimType("float32"))
    check_score_mod(func)
    return func


def finish_kernel(func, score_mod):
    """Add a score mod's captured buffers to a kernel built with ``check_well_formed=False``
    and run the well-formedness check (no-op without a score mod)."""
    if score_mod is None:
        return func
    func = with_captured_buffers(func, score_mod)
    verify(func)
    return func


_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)


def fast_tanh(x):
    """fp32 ``tanh`` as a rational polynomial (Eigen's, as TVM's ``topi.fast_tanh``): plain
    arithmetic that vectorises, where ``T.tanh`` stays a scalar libm call on llvm."""
    x = tirx.max(tirx.min(x, tirx.const(9.0, "float32")), tirx.const(-9.0, "float32"))
    x2 = x * x
    p = tirx.const(_TANH_P[0], "float32")
    for c in _TANH_P[1:]:
        p = p * x2 + tirx.const(c, "float32")
    q = tirx.const(_TANH_Q[0], "float32")
    for c in _TANH_Q[1:]:
        q = q * x2 + tirx.const(c, "float32")
    return x * p / q


def with_fast_tanh(func):
    """The score mod with every fp32 ``tanh`` replaced by :func:`fast_tanh` (CPU kernel)."""
    if func is None:
        return None

    def rebuild(e):
        kind = type(e).__name__
        if kind == "Call":
            args = [rebuild(a) for a in e.args]
            if e.op.name == "tirx.tanh" and str(e.ty.dtype) == "float32":
                return fast_tanh(args[0])
            return tirx.Call(e.ty.dtype, e.op, args)
        if kind == "Select":
            return tirx.Select(rebuild(e.condition), rebuild(e.true_value),
                               rebuild(e.false_value))
        if kind == "Cast":
            return tirx.Cast(str(e.ty.dtype), rebuild(e.value))
        if kind == "Not":
            return tirx.Not(rebuild(e.a))
        if kind == "TensorLoad":
            return tirx.BufferLoad(e.source, [rebuild(i) for i in e.indices])
        if hasattr(e, "a") and hasattr(e, "b"):  # binary arithmetic / comparison / logic
            return type(e)(rebuild(e.a), rebuild(e.b))
        return e  # vars and immediates

    return tirx.PrimFunc(list(func.params), tirx.Return(rebuild(func.body.value)),
                         func.ret_type, func.attrs)


def verify(func) -> None:
    """TVM's well-formedness check (kernels built with captured buffers skip it at parse time)."""
    from tvm.s_tir.analysis import verify_well_formed

    verify_well_formed(func)
