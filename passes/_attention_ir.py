"""Shared vocabulary of the attention passes: attribute names and small IR helpers.

An attention *site* is a call from a Relax function to a private Relax function whose attr
``Composite`` is :data:`COMPOSITE`.  :class:`~.fuse_attention.FuseAttention` creates them,
:class:`~.analyze_attention_mask.AnalyzeAttentionMask` annotates them and
:class:`~.lower_attention.LowerAttentionToTIR` replaces them; every pass reads the attrs below.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

COMPOSITE = "attnforge.attention"
# Set by FuseAttention on the outlined function.
A_SCALE = "attnforge.scale"  # float: product of every scale factor (on Q, K or the scores)
A_GROUPS = "attnforge.gqa_groups"  # int: query heads per kv head (1: MHA)
A_MASK_KIND = "attnforge.mask_kind"  # "none" | "additive" | "bool"
A_MASK_INVERT = "attnforge.mask_invert"  # bool: the mask arg is True where *masked* (masked_fill)
A_MASK_FILL = "attnforge.mask_fill"  # float: fill of a bool mask (-inf or a finite minimum)
A_SAFE_SOFTMAX = "attnforge.safe_softmax"  # bool: fully masked rows give 0 (SDPA decomposition)
A_LAYOUT = "attnforge.layout"  # "BHND" or "BND" (batch-folded 3-D)
# Set by AnalyzeAttentionMask.
A_MASK_SPEC = "attnforge.mask_spec"  # dict: MaskSpec fields (kind, q_offset, min_diff, ...)
A_STATIC_MASK = "attnforge.static_mask"  # tensor bool [Hm, Nq, Nk] for MaskSpec "static"
A_MASK_INPUT = "attnforge.mask_input"  # "none" | "bool" | "additive": what the kernel receives
A_EMPTY_ROWS = "attnforge.empty_rows"  # "zero" | "nan"
A_MASK_CONST = "attnforge.mask_const"  # tensor: compile-time mask passed to the kernel as is
A_MASK_FROM_WHERE = "attnforge.mask_from_where"  # bool: pass C of the mask where(C, 0, -inf)
A_MASK_NOTE = "attnforge.mask_note"  # str: why the analysis chose what it chose
# Module attrs.
M_REJECTIONS = "attnforge.attention_rejections"  # list of {function, var, reason}
M_SITES = "attnforge.attention_sites"  # list of report entries, written by LowerAttentionToTIR


def bindings_computing(func: relax.Function, exprs) -> list:
    """The bindings of ``func`` that ``exprs`` depend on (transitively), in binding order."""
    need: set = set()
    var2val = relax.analysis.get_var2val(func)
    stack = list(exprs)
    while stack:
        e = stack.pop()
        for v in relax.analysis.free_vars(e) if not isinstance(e, relax.Var) else [e]:
            if v not in need and v in var2val:
                need.add(v)
                stack.append(var2val[v])
    return [b for blk in func.body.blocks for b in blk.bindings if b.var in need]


def op_name(expr) -> str | None:
    """``"relax.matmul"`` for a call to an operator, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def static_shape(expr) -> list[int] | None:
    """The static int shape of a tensor expression, or None (unknown or symbolic)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None or not all(isinstance(s, tvm.tirx.IntImm) for s in shape):
        return None
    return [int(s) for s in shape]


def scalar_value(expr, var2val: dict) -> float | None:
    """The float value of a one-element constant (directly or through a var binding)."""
    if isinstance(expr, relax.Var):
        expr = var2val.get(expr)
    if isinstance(expr, tvm.ir.expr.Constant):
        arr = expr.value.numpy()
        if arr.size == 1:
            return float(arr.reshape(()))
    return None


def attr(func, key, default=None):
    """A function attr as a plain Python value."""
    if func.attrs is None or key not in func.attrs:
        return default
    return to_py(func.attrs[key])


def to_py(value):
    """Convert FFI containers/scalars from attrs to plain Python."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (tvm.tirx.IntImm,)):
        return bool(value.value) if value.dtype == "bool" else int(value.value)
    if isinstance(value, tvm.tirx.FloatImm):
        return float(value.value)
    if hasattr(value, "numpy"):
        return value.numpy()
    if hasattr(value, "items"):
        return {str(k): to_py(v) for k, v in value.items()}
    if hasattr(value, "__len__"):
        return [to_py(v) for v in value]
    return value


def is_attention_func(func) -> bool:
    return isinstance(func, relax.Function) and attr(func, "Composite") == COMPOSITE


def iter_sites(mod: tvm.IRModule) -> Iterator[tuple]:
    """Yield ``(caller, callee, call, bound_var)`` for every attention call, in program order."""
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or is_attention_func(func):
            continue
        for block in func.body.blocks:
            for b in block.bindings:
                val = getattr(b, "value", None)
                if (isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.GlobalVar)
                        and is_attention_func(mod[val.op])):
                    yield gv, val.op, val, b.var


def tensor_attr(arr: np.ndarray):
    """A numpy array as an attr value."""
    return tvm.runtime.tensor(np.ascontiguousarray(arr))


@mutator
class Subst(PyExprMutator):
    """Replace variables by expressions (``mapping`` may be extended while in use)."""

    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var):
        return self.mapping.get(var, var)

    def visit_dataflow_var_(self, var):
        return self.mapping.get(var, var)


def spec_key(spec) -> tuple:
    """A hashable key for a MaskSpec (static masks by content)."""
    m = spec.static_mask
    mk = None if m is None else (m.shape, hash(np.ascontiguousarray(m).tobytes()))
    return (spec.kind, spec.q_offset, spec.min_diff, spec.max_diff, spec.chunk, mk)
