"""FoldDequantizeQuantize: ``quantize(dequantize(q, s, z), s, z) -> q``.

What it does
    A ``R.quantize`` whose input is a ``R.dequantize`` with the same (constant) scale, zero
    point, axis and whose output dtype is the dequantised tensor's dtype is the identity on
    ``q`` (round(((q - z) s) / s) + z == q for the scales we produce), so it is replaced by
    ``q``; the dequantize disappears when nothing else uses it. Pairs whose parameters differ
    (a requantisation) are left alone. Such pairs appear when a quantised value flows through
    QDQ-transparent ops or when QDQ graphs from other tools are composed.

Preconditions: none (works on any Relax). Place: after :class:`InsertActivationQuantize`,
before :class:`LowerInt8Matmul`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import DEQUANTIZE, QUANTIZE, call_op, const_array, lookup, rewrite_functions

__all__ = ["FoldDequantizeQuantize"]


def _same_const(a, b) -> bool:
    if a.same_as(b):
        return True
    x, y = const_array(a), const_array(b)
    return x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, var2val):
        super().__init__(mod)
        self.var2val = var2val

    def visit_call_(self, call):
        new = super().visit_call_(call)
        if call_op(call) != QUANTIZE:
            return new
        dq = lookup(call.args[0], self.var2val)
        if call_op(dq) != DEQUANTIZE:
            return new
        q = dq.args[0]
        if str(q.ty.dtype) != str(call.attrs.out_dtype):
            return new
        per_channel = getattr(call.args[1].ty, "ndim", 0) not in (0, -1)
        if per_channel and int(dq.attrs.axis) != int(call.attrs.axis):
            return new
        if not (_same_const(dq.args[1], call.args[1]) and _same_const(dq.args[2], call.args[2])):
            return new
        return self.visit_expr(q)


@tvm.transform.module_pass(opt_level=0, name="attnforge.FoldDequantizeQuantize")
class FoldDequantizeQuantize:
    """Remove ``quantize(dequantize(q))`` round trips with identical parameters."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = rewrite_functions(
            mod, lambda module, func: _Rewriter(module, relax.analysis.get_var2val(func)))
        return relax.transform.CanonicalizeBindings()(out)  # `q2 = q` aliases away
