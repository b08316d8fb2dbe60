"""LowerBF16Matmul: bf16-weight matmuls -> ``R.call_tir`` of the ``vdpbf16ps`` kernel (CPU).

What it does
    A site ``R.matmul(x, W, out_dtype="float32")`` with ``x`` fp32 ``[..., K]`` and ``W`` a
    constant bf16 ``[K, N]`` weight (the form :class:`StoreWeightsBF16` leaves) becomes
    ``R.call_tir(bf16_matmul_cpu, (x as [M, K], Wp))`` (fp32 ``[M, N]``, reshaped back to
    ``[..., N]``) with the kernel of
    :func:`attnforge.schedules.matmul_bf16_cpu.bf16_matmul_func` (one PrimFunc per ``(M, N,
    K)``; one per ``(N, K)`` for a symbolic M) and the weight packed offline to
    ``[N/16, K/2, 16, 2]``. The kernel rounds ``x`` to bf16 (nearest even) and multiplies
    bf16 x bf16 with fp32 accumulation: the numerics of a torch bf16 matmul with fp32 output,
    where the weights-only form kept ``x`` in fp32.

    Sites with a static row count ``M < min_rows`` (decode steps, a last-token LM head) are
    left alone: they are bound by reading the weight, which the weights-only form already
    halves, and the kernel would pad them to its row tile.

Preconditions: :class:`StoreWeightsBF16` (weights bf16 constants); an ``llvm`` target whose
CPU has AVX-512 BF16 (the caller checks). Place: after ``StoreWeightsBF16``, before
legalisation.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..schedules.matmul_bf16_cpu import ATTR, bf16_matmul_func, pack_weight
from ._quant_ir import call_op, const_array, rewrite_functions

__all__ = ["KERNEL_SYMBOL", "LowerBF16Matmul", "count_bf16_matmuls", "register_tile"]

KERNEL_SYMBOL = "bf16_matmul_cpu"


def _plan(call, min_rows: int):
    """``(x, leading dims, M, W bf16 [K, N])`` for a lowerable site, else None."""
    if call_op(call) != "relax.matmul" or str(call.ty.dtype) != "float32":
        return None
    x, w_expr = call.args
    w = const_array(w_expr)
    x_ty = x.ty
    if (w is None or w.ndim != 2 or str(w_expr.ty.dtype) != "bfloat16"
            or not isinstance(x_ty, relax.TensorType) or str(x_ty.dtype) != "float32"
            or x_ty.ndim < 2 or getattr(x_ty.shape, "values", None) is None):
        return None
    dims = list(x_ty.shape.values)
    k_dim = dims[-1]
    if not isinstance(k_dim, tirx.IntImm) or int(k_dim) != w.shape[0]:
        return None
    lead = dims[:-1]
    if all(isinstance(d, tirx.IntImm) for d in lead):
        m = math.prod(int(d) for d in lead)
        if m < min_rows:
            return None
    else:
        m = None  # symbolic
    return x, lead, m, w


def register_tile(n: int, mr: int = 6, nb: int = 4) -> dict:
    """The kernel tile for ``N`` columns: ``nb`` 16-column blocks, at most what N fills (the
    packed weight pads N to ``16 nb``: k/v projections 32 wide are not doubled), and ``mr``
    rows raised for narrow tiles (8 x 2, 8 x 1) to keep enough accumulators in flight."""
    nb = max(1, min(nb, math.ceil(n / 16)))
    return {"mr": max(mr, min(8, 24 // nb)), "nb": nb}


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, plans: dict, mr: int, nb: int):
        super().__init__(mod)
        self.plans, self.mr, self.nb = plans, mr, nb
        self.kernels, self.reshaped, self.packed = {}, {}, {}

    def _kernel(self, m, n: int, k: int):
        key = (m, n, k)
        if key not in self.kernels:
            rows = tirx.Var("m", "int64") if m is None else m
            prim = bf16_matmul_func(rows, n, k, **register_tile(n, self.mr, self.nb))
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
        x, lead, m, w = plan
        k, n = w.shape
        bb = self.builder_
        x2 = self.visit_expr(x)
        rows = m if m is not None else tvm.sym.Analyzer().simplify(
            math.prod(lead[1:], start=lead[0]))
        if len(lead) != 1:
            if x2 not in self.reshaped:  # q/k/v projections share one reshape
                self.reshaped[x2] = bb.emit(relax.op.reshape(x2, [rows, k]))
            x2 = self.reshaped[x2]
        wkey = call.args[1]
        if wkey not in self.packed:  # a weight used twice is packed once
            nb = register_tile(n, self.mr, self.nb)["nb"]
            self.packed[wkey] = relax.const(pack_weight(w, nb))
        out = relax.call_tir(self._kernel(m, n, k), relax.Tuple([x2, self.packed[wkey]]),
                             out_ty=relax.TensorType([rows, n], "float32"))
        if len(lead) != 1:
            out = relax.op.reshape(bb.emit(out), [*lead, n])
        return out


def count_bf16_matmuls(mod: tvm.IRModule) -> int:
    """How many ``call_tir`` bindings of ``mod`` run the bf16 kernel (for reports)."""
    kernels = {gv for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and ATTR in (f.attrs or {})}
    count = 0
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if call_op(value) == "relax.call_tir" and value.args[0] in kernels:
                    count += 1
    return count


@tvm.transform.module_pass(opt_level=0, name="attnforge.LowerBF16Matmul")
class LowerBF16Matmul:
    """Replace bf16-weight matmul sites by the AVX-512 BF16 kernel.

    Parameters
    ----------
    min_rows : sites with a static row count below this stay weights-only (fp32 compute).
    mr, nb : the kernel's register tile (rows, 16-column blocks); see ``bf16_matmul_func``.
    """

    def __init__(self, min_rows: int = 16, mr: int = 6, nb: int = 4):
        self.min_rows, self.mr, self.nb = min_rows, mr, nb

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            plans = {}
            for block in func.body.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        plan = _plan(binding.value, self.min_rows)
                        if plan is not None:
                            plans[binding.value] = plan
            return _Rewriter(out, plans, self.mr, self.nb) if plans else None

        return rewrite_functions(mod, make_rewriter)
