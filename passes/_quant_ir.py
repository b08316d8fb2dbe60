"""Shared helpers of the INT8 passes: finding quantisable matmul sites, reading constants.

A *site* is an ``R.matmul(x, W)`` binding in a function whose weight ``W`` is a 2-D ``[K, N]``
constant (or a batch-broadcast copy of one, see :func:`fp32_weight`): fp32 (before
:class:`QuantizeWeights`) or ``R.dequantize(<int8 constant>, <scale constant [N]>,
<zero point>, axis=1)`` (after). Sites are numbered in binding order; every INT8
pass and the calibration use the same numbering, so a site keeps its index through them.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

MATMUL = "relax.matmul"
QUANTIZE = "relax.quantize"
DEQUANTIZE = "relax.dequantize"



def call_op(expr) -> str | None:
    """The op name of a ``relax.Call`` to an operator, else None."""
    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return None


def const_array(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def lookup(expr, var2val: dict):
    """Follow ``expr`` through variable bindings to its value."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr


def fp32_weight(call: relax.Call) -> np.ndarray | None:
    """The ``[K, N]`` fp32 constant weight of a matmul site, else None.

    A ``[B, K, N]`` constant whose B slices are identical (the importer broadcasts a Linear
    weight for a batched ``bmm``, e.g. BERT's attention output at batch > 1) counts as its
    ``[K, N]`` slice: ``x @ W`` broadcasts the same way.
    """
    w = const_array(call.args[1])
    if w is None or w.dtype != np.float32:
        return None
    if w.ndim == 3 and all(np.array_equal(w[0], w[b]) for b in range(1, w.shape[0])):
        w = w[0]
    return w if w.ndim == 2 else None


def int8_weight(call: relax.Call, var2val: dict):
    """``(Wq int8 [K, N], scale fp32 [N])`` of a matmul over a dequantised constant, else None."""
    dq = lookup(call.args[1], var2val)
    if call_op(dq) != DEQUANTIZE or int(dq.attrs.axis) not in (1, -1):
        return None
    wq, scale, zp = (const_array(a) for a in dq.args)
    if wq is None or scale is None or zp is None or wq.ndim != 2 or wq.dtype != np.int8:
        return None
    if np.any(zp != 0) or scale.shape not in ((wq.shape[1],), ()):
        return None
    return wq, np.broadcast_to(scale, (wq.shape[1],)).astype(np.float32)


def is_site(call, var2val: dict) -> bool:
    """True for a matmul site (fp32 constant weight or dequantised int8 constant weight)."""
    if call_op(call) != MATMUL:
        return False
    ty = call.args[0].ty
    if not isinstance(ty, relax.TensorType) or ty.ndim < 2:
        return False
    return fp32_weight(call) is not None or int8_weight(call, var2val) is not None


def site_calls(func: relax.Function) -> list[relax.Call]:
    """The site calls of ``func`` in binding order."""
    var2val = relax.analysis.get_var2val(func)
    sites = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding) and is_site(binding.value, var2val):
                sites.append(binding.value)
    return sites


def rewrite_functions(mod: tvm.IRModule, make_rewriter) -> tvm.IRModule:
    """Run a per-function rewrite over every Relax function of a copy of ``mod``.

    ``make_rewriter(module, func)`` returns a ``PyExprMutator`` bound to ``module`` for
    ``func``, or None when ``func`` has nothing to rewrite.  Works on a copy because a
    mutator's builder updates its module in place; unused bindings are removed afterwards.
    """
    out = mod.clone()
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        rewriter = make_rewriter(out, func)
        if rewriter is None:
            continue
        new_func = rewriter.visit_expr(func)
        out = rewriter.builder_.finalize()
        out[gv] = relax.analysis.remove_all_unused(new_func)
    return out


def resolve_exclude(exclude, n_sites: int, names: dict[int, str] | None) -> set[int]:
    """Site indices named by ``exclude`` (ints, negative from the end, or names in ``names``)."""
    names = names or {}
    by_name = {v: k for k, v in names.items()}
    out = set()
    for item in exclude:
        if isinstance(item, (int, np.integer)):
            if not -n_sites <= int(item) < n_sites:
                raise ValueError(f"exclude: site {item} out of range (module has {n_sites})")
            out.add(int(item) % n_sites)
        elif item in by_name:
            out.add(by_name[item])
        else:
            known = ", ".join(sorted(by_name)) or "none (pass names=)"
            raise ValueError(f"exclude: no matmul site named {item!r}; known names: {known}")
    return out
