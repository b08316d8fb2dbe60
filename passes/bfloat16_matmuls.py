"""``BFloat16Matmuls``: run fp32 matmuls with bf16 operands and fp32 accumulation.

``precision="bfloat16"``: every ``R.matmul`` of two fp32 tensors becomes
``R.matmul(astype(a, bf16), astype(b, bf16), out_dtype="float32")``; ``FoldConstant`` then
stores constant weights in bf16 (half the bytes).  Everything else (norms, softmax, residual
adds, activations) stays fp32, and attention sites (functions with a ``Composite`` attr) are
left to the attention lowering, which has its own ``compute_dtype``.

Why not TVM's ``ToMixedPrecision``: it always chooses float16, and re-targeting its casts to
bf16 also moves the ops it runs in low precision after a matmul (e.g. GPT-2's ``pow`` in
``gelu_new``) to bf16, which TVM 0.27's legalization rejects ("power only applies to float").
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["BFloat16Matmuls"]


def _is_f32_tensor(expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


@mutator
class _ToBF16(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.changed = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        a, b = call.args
        out_dtype = call.attrs.out_dtype
        if not (_is_f32_tensor(a) and _is_f32_tensor(b)) or (
                out_dtype is not None and str(out_dtype) not in ("", "void", "float32")):
            return call
        self.changed += 1
        return relax.op.matmul(relax.op.astype(a, "bfloat16"), relax.op.astype(b, "bfloat16"),
                               out_dtype="float32")


@tvm.transform.module_pass(opt_level=0, name="attnforge.BFloat16Matmuls")
def BFloat16Matmuls(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 - TVM pass naming
    """fp32 matmuls -> bf16 operands, fp32 accumulation (see the module docstring)."""
    out = mod
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or "Composite" in (func.attrs or {}):
            continue
        rewriter = _ToBF16(out)
        new = rewriter.visit_expr(func)
        if rewriter.changed:
            out.update_func(gv, new)
    return out
