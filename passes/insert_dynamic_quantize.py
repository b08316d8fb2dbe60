"""InsertDynamicQuantize: per-token (per-row) uint8 activations computed at run time.

What it does
    For each site (see :mod:`._quant_ir`) whose weight is already int8 (:class:`QuantizeWeights`)
    and whose activation ``x [..., K]`` (static shape) is still fp32, and whose index is in
    ``sites`` (default: all such sites), the matmul becomes::

        x2 = reshape(x, [M, K])                          (M = prod of the leading dims)
        lo = minimum(min(x2, axis=1), 0);  hi = maximum(max(x2, axis=1), 0)
        s  = maximum((hi - lo) / 255, 1e-30)             per-row scale [M]
        z  = astype(clip(round(-lo / s), 0, 255), int32) per-row zero point [M]
        y  = reshape(matmul(dequantize(quantize(x2, s, z, axis=0, uint8), s, z, axis=0), W),
                     [..., N])

    i.e. asymmetric uint8 with one scale / zero point per token, so rows of very different
    magnitude (e.g. causal attention outputs: the first rows average few values, the last ones
    hundreds) each use the full 8-bit range. Sites reading the same ``x``, or reshapes of one
    tensor to the same ``[M, K]`` (BERT's q/k/v each reshape the hidden state), share one
    quantisation. :class:`LowerInt8Matmul` turns the result into the per-row VNNI kernel.

Preconditions: :class:`QuantizeWeights`. Place: after :class:`InsertActivationQuantize` (sites
that got static per-tensor parameters there are skipped: their activation is no longer fp32),
before :class:`LowerInt8Matmul`.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import DEQUANTIZE, call_op, int8_weight, lookup, rewrite_functions, site_calls

__all__ = ["InsertDynamicQuantize"]


def _static_shape(expr) -> list[int] | None:
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


def _f32(v: float):
    return relax.const(v, "float32")


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, todo: dict, var2val: dict):
        super().__init__(mod)
        self.todo = todo  # site call -> static shape of x
        self.var2val = var2val
        self.cache = {}

    def _key(self, x, shape):
        """Sites whose inputs are reshapes of one tensor to the same [M, K] share a key."""
        value = self.var2val.get(x)
        if call_op(value) == "relax.reshape" and isinstance(value.args[0], relax.Var):
            return (value.args[0], math.prod(shape[:-1]), shape[-1])
        return (x, math.prod(shape[:-1]), shape[-1])

    def _quantize(self, x, shape, key):
        if key in self.cache:
            return self.cache[key]
        bb, op = self.builder_, relax.op
        m, k = math.prod(shape[:-1]), shape[-1]
        x2 = bb.emit(op.reshape(x, [m, k])) if len(shape) != 2 else x
        lo = bb.emit(op.minimum(op.min(x2, axis=[1]), _f32(0.0)))
        hi = bb.emit(op.maximum(op.max(x2, axis=[1]), _f32(0.0)))
        s = bb.emit(op.maximum(op.divide(op.subtract(hi, lo), _f32(255.0)), _f32(1e-30)))
        z = bb.emit(op.astype(op.clip(op.round(op.divide(op.negative(lo), s)), 0, 255),
                              "int32"))
        q = bb.emit(op.quantize(x2, s, z, axis=0, out_dtype="uint8"))
        self.cache[key] = bb.emit(op.dequantize(q, s, z, axis=0, out_dtype="float32"))
        return self.cache[key]

    def visit_call_(self, call):
        new = super().visit_call_(call)
        shape = self.todo.get(call)
        if shape is None:
            return new
        xd = self._quantize(new.args[0], shape, self._key(call.args[0], shape))
        y = relax.op.matmul(xd, new.args[1], out_dtype=new.attrs.out_dtype)
        if len(shape) == 2:
            return y
        n = int(new.ty.shape.values[-1])
        return relax.op.reshape(self.builder_.emit(y), [*shape[:-1], n])


@tvm.transform.module_pass(opt_level=0, name="attnforge.InsertDynamicQuantize")
class InsertDynamicQuantize:
    """Per-token dynamic uint8 QDQ on the fp32 inputs of int8-weight matmuls.

    Parameters
    ----------
    sites : site indices to quantise this way (None: every eligible site).
    """

    def __init__(self, sites=None):
        self.sites = None if sites is None else {int(i) for i in sites}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            var2val = relax.analysis.get_var2val(func)
            todo = {}
            for i, call in enumerate(site_calls(func)):
                if self.sites is not None and i not in self.sites:
                    continue
                x = call.args[0]
                shape = _static_shape(x)
                if (int8_weight(call, var2val) is None or shape is None or len(shape) < 2
                        or str(x.ty.dtype) != "float32"
                        or call_op(lookup(x, var2val)) == DEQUANTIZE):
                    continue
                todo[call] = shape
            return _Rewriter(out, todo, var2val) if todo else None

        return rewrite_functions(mod, make_rewriter)
