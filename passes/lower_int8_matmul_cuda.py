"""LowerInt8MatmulCuda: int8-weight matmul sites -> ``s8 x s8 -> s32`` ``R.matmul`` + dequantize.

What it does
    A site ``R.matmul(x, R.dequantize(Wq, s_w, 0, axis=1))`` (fp32 ``x`` of static shape
    ``[..., K]``, int8 constant ``Wq [K, N]``, fp32 ``s_w [N]``; :class:`QuantizeWeights`)
    becomes, with ``x2 = x`` reshaped to ``[M, K]``::

        s  = max(max_k |x2[m, k]|, 1e-30) / 127        # per token (row), at run time; or a
                                                       # per-tensor constant from calibration
        xq = astype(clip(round(x2 / s), -127, 127), "int8")
        y  = astype(R.matmul(xq, Wq, out_dtype="int32"), "float32") * s * s_w

    reshaped back to ``[..., N]``. Activations are *symmetric* s8 (zero point 0) so the
    integer matmul needs no zero-point correction; dlight's ``gpu.Matmul`` schedules such
    matmuls on int8 tensor cores (``MatmulInt8Tensorization``: sm_70+ targets, static
    M, N, K > 64). No new kernel: the legalised ``R.matmul`` is TVM's own, so the same module
    also builds for llvm (generic int32 loops, not VNNI): the CPU twin of a CUDA build.
    Sites not in this form (fp32 weights, excluded sites, symbolic shapes) are left alone.

Parameters: ``activation_scales`` ``{site index: scale}`` (per-tensor sites; the others are
per token). Preconditions: :class:`QuantizeWeights`. Place: instead of
``InsertActivationQuantize`` ... ``LowerInt8Matmul`` (the CPU VNNI path), before legalisation.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import int8_weight, rewrite_functions, site_calls

__all__ = ["LowerInt8MatmulCuda"]


def _static_shape(expr) -> list[int] | None:
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, plans: dict):
        super().__init__(mod)
        self.plans = plans

    def visit_call_(self, call):
        new = super().visit_call_(call)
        plan = self.plans.get(call)
        if plan is None:
            return new
        shape, wq, w_scale, a_scale = plan
        k, n = wq.shape
        m = math.prod(shape[:-1])
        bb, op = self.builder_, relax.op
        x2 = self.visit_expr(call.args[0])
        if len(shape) != 2:
            x2 = bb.emit(op.reshape(x2, [m, k]))
        if a_scale is None:  # per token: row absmax at run time
            amax = bb.emit(op.max(op.abs(x2), axis=[1], keepdims=True))
            s = bb.emit(op.multiply(op.maximum(amax, relax.const(1e-30, "float32")),
                                    relax.const(1.0 / 127.0, "float32")))
        else:
            s = relax.const(np.float32(a_scale))
        xq = bb.emit(op.astype(op.clip(op.round(op.divide(x2, s)), -127, 127), "int8"))
        acc = bb.emit(op.matmul(xq, relax.const(wq), out_dtype="int32"))
        out = op.multiply(op.multiply(op.astype(acc, "float32"), s),
                          relax.const(w_scale.astype(np.float32)))
        if len(shape) != 2:
            out = op.reshape(bb.emit(out), [*shape[:-1], n])
        return out


@tvm.transform.module_pass(opt_level=0, name="attnforge.LowerInt8MatmulCuda")
class LowerInt8MatmulCuda:
    """Replace int8-weight matmul sites by symmetric s8 x s8 -> s32 ``R.matmul`` + dequantize.

    Parameters
    ----------
    activation_scales : ``{site index: scale}`` for per-tensor activation scales (from
        calibration); sites without one are quantised per token at run time.
    """

    def __init__(self, activation_scales: dict[int, float] | None = None):
        self.activation_scales = dict(activation_scales or {})
        for i, s in self.activation_scales.items():
            if not (np.isfinite(s) and s > 0):
                raise ValueError(f"LowerInt8MatmulCuda: activation scale of site {i} is {s}; "
                                 "it must be finite and > 0")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            var2val = relax.analysis.get_var2val(func)
            plans = {}
            for i, call in enumerate(site_calls(func)):
                weight = int8_weight(call, var2val)
                shape = _static_shape(call.args[0])
                if (weight is None or shape is None or len(shape) < 2
                        or str(call.args[0].ty.dtype) != "float32"
                        or str(call.ty.dtype) != "float32"):
                    continue
                plans[call] = (shape, *weight, self.activation_scales.get(i))
            return _Rewriter(out, plans) if plans else None

        return rewrite_functions(mod, make_rewriter)
