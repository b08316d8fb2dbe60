"""InsertActivationQuantize: quantise / dequantise the activation of int8-weight matmul sites.

What it does
    For each site (see :mod:`._quant_ir`) whose weight is already int8 (:class:`QuantizeWeights`)
    and that has calibration parameters ``qparams[index] = (scale, zero_point)``, the input
    ``x`` becomes ``R.dequantize(R.quantize(x, scale, zp, out_dtype="uint8"), scale, zp)``:
    per-tensor asymmetric uint8, the form the VNNI kernel consumes (u8 x s8). Sites sharing the
    same input and parameters (q/k/v projections) share one quantize. Sites without parameters
    keep an fp32 activation (weight-only quantisation).

Preconditions: :class:`QuantizeWeights`; ``qparams`` from ``attnforge.quantization.calibrate``
(same site numbering). Place: after QuantizeWeights, before :class:`FoldDequantizeQuantize`.
Raises ValueError for a non-positive / non-finite scale or a zero point outside [0, 255].
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import int8_weight, rewrite_functions, site_calls

__all__ = ["InsertActivationQuantize"]


def _check(index: int, scale: float, zp: int) -> tuple[float, int]:
    scale, zp = float(scale), int(zp)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"InsertActivationQuantize: site {index} has scale {scale}; need > 0")
    if not 0 <= zp <= 255:
        raise ValueError(f"InsertActivationQuantize: site {index} zero point {zp} not in [0, 255]")
    return scale, zp


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, todo: dict):
        super().__init__(mod)
        self.todo = todo  # site call -> (scale, zp)
        self.cache = {}

    def visit_call_(self, call):
        new = super().visit_call_(call)
        params = self.todo.get(call)
        if params is None:
            return new
        x = new.args[0]
        key = (x, *params)
        if key not in self.cache:
            scale, zp = relax.const(params[0], "float32"), relax.const(params[1], "uint8")
            q = self.builder_.emit(relax.op.quantize(x, scale, zp, axis=-1, out_dtype="uint8"))
            self.cache[key] = self.builder_.emit(
                relax.op.dequantize(q, scale, zp, axis=-1, out_dtype="float32"))
        return relax.op.matmul(self.cache[key], new.args[1], out_dtype=new.attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="attnforge.InsertActivationQuantize")
class InsertActivationQuantize:
    """Per-tensor uint8 QDQ on the inputs of int8-weight matmuls.

    Parameters
    ----------
    qparams : ``{site index: (scale, zero_point)}``.
    """

    def __init__(self, qparams: dict[int, tuple[float, int]]):
        self.qparams = {int(i): _check(int(i), *p) for i, p in qparams.items()}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            var2val = relax.analysis.get_var2val(func)
            sites = site_calls(func)
            todo = {c: self.qparams[i] for i, c in enumerate(sites)
                    if i in self.qparams and int8_weight(c, var2val) is not None}
            return _Rewriter(out, todo) if todo else None

        return rewrite_functions(mod, make_rewriter)
