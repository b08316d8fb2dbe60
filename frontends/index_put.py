"""Converter for ``aten.index_put`` with one index tensor and slices elsewhere.

Hugging Face's static KV cache writes the new keys/values with ``cache[:, :, cache_position] =
k`` (``index_put(cache, [None, None, cache_position], k)``: fewer index entries than dims, the
rest sliced).  TVM 0.27's converter requires one entry per dim ("IndexPut requires the number
of index tensors (3) to match the data tensor dimensions (4)").  With exactly one 1-D index
tensor at axis ``a`` the op is ``index_copy`` along ``a``, which we express as
``scatter_elements(data, broadcast(idx), broadcast(values), axis=a)`` (``reduction="add"``
when ``accumulate``).  Every other form goes to TVM's own converter unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import fx
from tvm import relax


def _single_index(indices, ndim: int):
    present = [(i, ix) for i, ix in enumerate(indices) if ix is not None]
    if len(present) != 1 or len(indices) > ndim:
        return None
    return present[0]


def convert_index_put(node: fx.Node, importer: Any) -> relax.Var:
    """``index_put(data, indices, values, accumulate=False)``."""
    bb = importer.block_builder
    data = importer.env[node.args[0]]
    indices = node.args[1]
    accumulate = bool(node.args[3] if len(node.args) > 3 else
                      node.kwargs.get("accumulate", False))
    ndim = data.ty.ndim
    single = _single_index(indices, ndim)
    idx = importer.env[single[1]] if single is not None else None
    if single is None or idx.ty.ndim != 1 or len(indices) == ndim and ndim == 1:
        return importer._index_put(node)  # TVM's converter for the forms it handles
    axis = single[0]
    values = importer.env[node.args[2]]
    shape = list(data.ty.shape.values)
    upd_shape = shape[:axis] + [idx.ty.shape.values[0]] + shape[axis + 1:]
    if values.ty.dtype != data.ty.dtype:
        values = bb.emit(relax.op.astype(values, data.ty.dtype))
    values = bb.emit(relax.op.broadcast_to(values, upd_shape))
    view = [1] * ndim
    view[axis] = -1
    idx_full = bb.emit(relax.op.broadcast_to(
        bb.emit(relax.op.reshape(bb.emit(relax.op.astype(idx, "int64")), view)), upd_shape))
    return bb.emit(relax.op.scatter_elements(data, idx_full, values, axis=axis,
                                             reduction="add" if accumulate else "update"))
