"""LowerInt8Matmul: quantised matmul sites -> ``R.call_tir`` of the VNNI int8 kernel.

What it does
    A site ``R.matmul(R.dequantize(xq, s_a, z_a), R.dequantize(Wq, s_w, 0, axis=1))`` with
    ``xq`` uint8 of static shape ``[..., K]``, per-tensor constant ``s_a``/``z_a`` and an int8
    constant ``[K, N]`` weight becomes
    ``R.call_tir(int8_matmul_cpu, (xq as [M, K], Wp, scale, offset))`` (fp32 ``[M, N]``,
    reshaped back to ``[..., N]``) with the kernel of
    :func:`attnforge.schedules.matmul_int8_cpu.int8_matmul_func` (one PrimFunc per
    ``(M, N, K)``), the weight packed offline to ``[N/16, K/4, 16, 4]`` and the dequantisation
    folded into ``scale = s_a s_w``, ``offset = -scale z_a colsum(Wq)``. A bias ``R.add`` after
    the matmul stays a separate (fused elementwise) op. A 2-D site whose activation is
    ``R.dequantize(xq, s, z, axis=0)`` with run-time per-row ``s`` (fp32 ``[M]``) and ``z``
    (int32 ``[M]``) (:class:`InsertDynamicQuantize`) gets the kernel's ``per_row`` variant,
    ``(xq, Wp, s, z, w_scale, colsum(Wq))``. Other sites are left as they are (QDQ in fp32:
    TVM legalises them). Unused dequantize bindings are removed.

Preconditions: :class:`QuantizeWeights`, :class:`InsertActivationQuantize`; an ``llvm`` target
whose CPU has AVX-512 VNNI (the caller checks). Place: last INT8 pass, before legalisation.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..schedules.matmul_int8_cpu import fold_dequant, int8_matmul_func, pack_weight
from ._quant_ir import (
    DEQUANTIZE, call_op, const_array, int8_weight,
    lookup, rewrite_functions, site_calls,
)

__all__ = ["KERNEL_SYMBOL", "LowerInt8Matmul"]

KERNEL_SYMBOL = "int8_matmul_cpu"


def _static_shape(expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


def _plan(call, var2val):
    """``(xq, shape, a_scale, a_zp, Wq [K, N], w_scale)`` for a lowerable site, else None."""
    weight = int8_weight(call, var2val)
    x_dq = lookup(call.args[0], var2val)
    if weight is None or call_op(x_dq) != DEQUANTIZE:
        return None
    xq = x_dq.args[0]
    a_scale, a_zp = const_array(x_dq.args[1]), const_array(x_dq.args[2])
    shape = _static_shape(xq)
    if a_scale is None and shape is not None and len(shape) == 2:  # per-row, run-time qparams
        s, z = x_dq.args[1], x_dq.args[2]
        per_row = (int(x_dq.attrs.axis) == 0 and str(xq.ty.dtype) == "uint8"
                   and _static_shape(s) == shape[:1] and str(s.ty.dtype) == "float32"
                   and _static_shape(z) == shape[:1] and str(z.ty.dtype) == "int32")
        return (xq, shape, s, z, *weight) if per_row else None
    if (a_scale is None or a_zp is None or a_scale.size != 1 or a_zp.size != 1
            or str(xq.ty.dtype) != "uint8" or shape is None or len(shape) < 2):
        return None
    return xq, shape, float(a_scale.reshape(())), int(a_zp.reshape(())), *weight


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, plans: dict, mr: int, nb: int):
        super().__init__(mod)
        self.plans, self.mr, self.nb = plans, mr, nb
        self.kernels, self.reshaped = {}, {}

    def _kernel(self, m: int, n: int, k: int, per_row: bool = False):
        key = (m, n, k, per_row)
        if key not in self.kernels:
            prim = int8_matmul_func(m, n, k, mr=self.mr, nb=self.nb, per_row=per_row)
            gv = self.builder_.add_func(prim, KERNEL_SYMBOL)
            # one symbol per kernel variant, or the build links duplicates
            self.builder_.update_func(gv, prim.with_attr("global_symbol", gv.name_hint))
            self.kernels[key] = gv
        return self.kernels[key]

    def visit_call_(self, call):
        new = super().visit_call_(call)
        plan = self.plans.get(call)
        if plan is None:
            return new
        xq, shape, a_scale, a_zp, wq, w_scale = plan
        k, n = wq.shape
        m = math.prod(shape[:-1])
        bb = self.builder_
        x2 = self.visit_expr(xq)
        if len(shape) != 2:
            if x2 not in self.reshaped:  # q/k/v projections share one reshape
                self.reshaped[x2] = bb.emit(relax.op.reshape(x2, [m, k]))
            x2 = self.reshaped[x2]
        w_nk = np.ascontiguousarray(wq.T)
        packed = relax.const(pack_weight(w_nk, self.nb))
        per_row = isinstance(a_scale, relax.Expr)
        if per_row:  # run-time per-row scale / zero point; per-column scale and sum of W
            colsum = w_nk.astype(np.int64).sum(axis=1).astype(np.float32)
            ins = [x2, packed, self.visit_expr(a_scale), self.visit_expr(a_zp),
                   relax.const(w_scale.astype(np.float32)), relax.const(colsum)]
        else:
            scale, offset = fold_dequant(w_nk, w_scale, a_scale, a_zp)
            ins = [x2, packed, relax.const(scale), relax.const(offset)]
        out = relax.call_tir(self._kernel(m, n, k, per_row), relax.Tuple(ins),
                             out_ty=relax.TensorType([m, n], "float32"))
        if len(shape) != 2:
            out = relax.op.reshape(bb.emit(out), [*shape[:-1], n])
        return out


@tvm.transform.module_pass(opt_level=0, name="attnforge.LowerInt8Matmul")
class LowerInt8Matmul:
    """Replace fully quantised matmul sites by the VNNI kernel.

    Parameters
    ----------
    mr, nb : the kernel's register tile (rows, 16-channel blocks); see ``int8_matmul_func``.
    """

    def __init__(self, mr: int = 4, nb: int = 2):
        self.mr, self.nb = mr, nb

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            var2val = relax.analysis.get_var2val(func)
            plans = {c: p for c in site_calls(func) if (p := _plan(c, var2val)) is not None}
            plans = {c: p for c, p in plans.items() if str(c.ty.dtype) == "float32"}
            return _Rewriter(out, plans, self.mr, self.nb) if plans else None

        return rewrite_functions(mod, make_rewriter)
