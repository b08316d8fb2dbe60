"""StoreWeightsBF16: constant matmul weights stored in bfloat16, computed in fp32 (CPU).

What it does
    Every site (``R.matmul(x, W)`` with a constant fp32 ``[K, N]`` weight, see
    :mod:`._quant_ir`) not excluded becomes ``R.matmul(x, W_bf16, out_dtype="float32")`` with
    ``W_bf16 = bfloat16(W)`` (round to nearest even) as the constant: the weight takes half the
    memory, the product and the accumulation stay fp32. TVM legalises the mixed-dtype matmul to
    a PrimFunc that reads ``float32(W_bf16[k, n])``; our ``MatmulCPU`` rule schedules it like an
    fp32 matmul (the bf16 -> fp32 widening happens on the packed weight panel, one shift per
    loaded vector). On CPUs with AVX-512 BF16, ``LowerBF16Matmul`` then moves the sites with
    >= 16 rows onto bf16 x bf16 -> fp32 ``vdpbf16ps``; this pass alone is the path for the
    smaller sites and for CPUs without it.

Preconditions: weights bound as constants and folded to ``[K, N]`` (``FoldConstant``).
Place: after the attention passes, before legalisation (``precision="bfloat16"`` on llvm).
Raises ValueError for a weight with NaN / inf, naming the site.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import fp32_weight, resolve_exclude, rewrite_functions, site_calls

__all__ = ["StoreWeightsBF16", "to_bfloat16"]


def to_bfloat16(w: np.ndarray) -> tvm.runtime.Tensor:
    """fp32 array -> bfloat16 ``tvm.runtime.Tensor`` (round to nearest even)."""
    import ml_dtypes

    return tvm.runtime.tensor(np.ascontiguousarray(w).astype(ml_dtypes.bfloat16))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, todo: dict):
        super().__init__(mod)
        self.todo = todo  # site call -> index

    def visit_call_(self, call):
        new = super().visit_call_(call)
        index = self.todo.get(call)
        if index is None:
            return new
        w = fp32_weight(call)
        if not np.isfinite(w).all():
            raise ValueError(f"StoreWeightsBF16: matmul site {index} has a NaN/inf weight")
        return relax.op.matmul(new.args[0], relax.const(to_bfloat16(w)), out_dtype="float32")


@tvm.transform.module_pass(opt_level=0, name="attnforge.StoreWeightsBF16")
class StoreWeightsBF16:
    """bfloat16 storage for constant matmul weights, fp32 compute.

    Parameters
    ----------
    exclude : site indices or names (with ``names``) to keep in fp32.
    names : ``{site index: name}`` for name-based exclusion.
    """

    def __init__(self, exclude=(), names: dict[int, str] | None = None):
        self.exclude, self.names = tuple(exclude), names

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            sites = site_calls(func)
            skip = resolve_exclude(self.exclude, len(sites), self.names) if sites else set()
            todo = {c: i for i, c in enumerate(sites)
                    if i not in skip and fp32_weight(c) is not None
                    and str(c.ty.dtype) == "float32"}
            return _Rewriter(out, todo) if todo else None

        return rewrite_functions(mod, make_rewriter)
