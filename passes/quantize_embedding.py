"""QuantizeEmbedding: constant gather tables (embeddings) -> int8 rows + fp32 scales per row/group.

What it does
    Every ``R.take(T, ids, axis=0)`` whose table ``T`` is a constant fp32 ``[V, H]`` and whose
    ``ids`` are not constant (an embedding lookup) becomes::

        q = R.take(Tq, ids, axis=0)                  int8 [..., H]
        s = R.take(S, ids, axis=0)                   fp32 [...]
        y = R.multiply(R.astype(q, "float32"), R.expand_dims(s, -1))   fp32 [..., H], as before

    with ``S[v] = max_h |T[v, h]| / 127`` (an all-zero row gets ``S = 1``) and
    ``Tq = clip(round(T / S), -127, 127)``: symmetric int8 per row. With ``group=g`` each row
    has ``H / g`` scales, one per ``g`` consecutive values (stored ``[H / g, V]``, gathered on
    axis 1, multiplied into the ``[..., H / g, g]`` view of the rows): a finer step, since the
    row's largest value no longer sets the step of all H values. Only the gathered rows are
    dequantised (FuseOps puts the two gathers and the multiply into one kernel); the table is
    stored as ``V * H`` bytes plus ``4 V`` for the scales instead of ``4 V H``. The gather's
    ``mode`` is kept. Tables gathered with constant indices are left alone (``FoldConstant``
    folds them), as are non-fp32 or non-2-D tables and ``axis != 0``.

Preconditions: weights bound as constants (``FoldConstant`` after import). Place: with the
INT8 passes (``attnforge.quantization.quantize_int8``), independent of the matmul sites.
Raises ValueError for a table with NaN / inf, naming the take's table shape.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import call_op, const_array, rewrite_functions

__all__ = ["QuantizeEmbedding", "embedding_tables", "quantize_rows"]

TAKE = "relax.take"


def quantize_rows(table: np.ndarray, group: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """fp32 ``[V, H]`` -> ``(int8 [V, H], fp32 scale [V])``, symmetric per row; with ``group``
    (dividing H) one scale per ``group`` consecutive values: scale ``[V, H / group]``."""
    v, h = table.shape
    g = h if group is None else group
    if h % g:
        raise ValueError(f"quantize_rows: group {g} does not divide the row length {h}")
    parts = table.reshape(v, h // g, g)
    amax = np.abs(parts).max(axis=2).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(parts / scale[:, :, None]), -127, 127).astype(np.int8).reshape(v, h)
    return q, (scale[:, 0] if group is None else scale)


def _table(call) -> np.ndarray | None:
    """The fp32 ``[V, H]`` constant table of an embedding gather, else None."""
    if call_op(call) != TAKE or const_array(call.args[1]) is not None:
        return None
    axis = call.attrs.axis
    if axis is None or int(axis) != 0:
        return None
    table = const_array(call.args[0])
    if table is None or table.dtype != np.float32 or table.ndim != 2:
        return None
    return table


def _func_tables(func: relax.Function) -> list[tuple[int, int]]:
    found = []

    def visit(expr):
        table = _table(expr) if isinstance(expr, relax.Call) else None
        if table is not None:
            found.append(tuple(table.shape))

    relax.analysis.post_order_visit(func.body, visit)
    return found


def embedding_tables(mod: tvm.IRModule) -> list[tuple[int, int]]:
    """Shapes ``(V, H)`` of the gathers :class:`QuantizeEmbedding` would quantise."""
    return [shape for _, func in mod.functions_items() if isinstance(func, relax.Function)
            for shape in _func_tables(func)]


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, group: int | None):
        super().__init__(mod)
        self.group = group
        self.cache = {}  # id of the fp32 table constant -> (Tq, S) constants

    def visit_call_(self, call):
        new = super().visit_call_(call)
        table = _table(call)
        if table is None:
            return new
        if not np.isfinite(table).all():
            raise ValueError(f"QuantizeEmbedding: the gather table {list(table.shape)} has "
                             "NaN/inf values")
        h = table.shape[1]
        group = self.group if self.group and h % self.group == 0 and self.group < h else None
        key = call.args[0]
        if key not in self.cache:
            q, scale = quantize_rows(table, group)
            # grouped scales stored transposed [G, V] and gathered on axis 1: a 2-D fp32
            # table gathered on axis 0 would look like another embedding to this pass
            self.cache[key] = (relax.const(q), relax.const(np.ascontiguousarray(scale.T)))
        tq, s = self.cache[key]
        ids, mode = new.args[1], str(call.attrs.mode)
        emit = self.builder_.emit
        rows = emit(relax.op.take(tq, ids, axis=0, mode=mode))
        wide = emit(relax.op.astype(rows, "float32"))
        if group is None:
            scales = emit(relax.op.take(s, ids, axis=0, mode=mode))
            return relax.op.multiply(wide, emit(relax.op.expand_dims(scales, -1)))
        lead = list(call.ty.shape.values)[:-1]
        scales = emit(relax.op.take(s, ids, axis=1, mode=mode))  # [G, *ids]
        n = len(lead)
        scales = emit(relax.op.permute_dims(scales, [*range(1, n + 1), 0]))  # [*ids, G]
        parts = emit(relax.op.reshape(wide, [*lead, h // group, group]))
        scaled = emit(relax.op.multiply(parts, emit(relax.op.expand_dims(scales, -1))))
        return relax.op.reshape(scaled, [*lead, h])


@tvm.transform.module_pass(opt_level=0, name="attnforge.QuantizeEmbedding")
class QuantizeEmbedding:
    """Symmetric int8 storage of constant embedding tables, dequantised on the gather.

    Parameters
    ----------
    group : None (one scale per row) or the number of consecutive values per scale (used
        when it divides the row length H and is smaller; otherwise one scale per row).
    """

    def __init__(self, group: int | None = None):
        if group is not None and group < 1:
            raise ValueError(f"QuantizeEmbedding: group={group} must be >= 1 or None")
        self.group = group

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            return _Rewriter(out, self.group) if _func_tables(func) else None

        return rewrite_functions(mod, make_rewriter)
