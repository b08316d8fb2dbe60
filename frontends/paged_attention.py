"""Converter for ``attnforge::paged_decode_attention`` (the generator's decode attention op).

The custom op (``torch.library``, defined in ``attnforge/generation/hf_attention.py``)
survives ``torch.export`` as one node; this converter turns it into ``R.call_tir`` to the paged
decode kernel (:mod:`attnforge.schedules.attention_decode_paged`) with the layer index as a
scalar ``R.prim_value`` argument, so all layers share one PrimFunc and the K/V pools are
passed whole (never sliced or copied).  CPU (llvm) only.
"""

from __future__ import annotations

import os
from typing import Any

from torch import fx
from tvm import relax

from ..schedules.attention_decode_paged import default_num_splits, paged_decode_attention_cpu
from .errors import FrontendError

OP_KEY = "paged_decode_attention.default"


def _static(shape, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in shape)
    except TypeError as e:
        raise FrontendError(f"attnforge::paged_decode_attention: {what} must have a static "
                            f"shape, got {shape}") from e


def convert_paged_decode_attention(node: fx.Node, importer: Any) -> relax.Var:
    """``(q, k_new, v_new, k_pool, v_pool, page_table, ctx_lens, layer, scale, window)``."""
    bb = importer.block_builder
    q, kn, vn, kp, vp, pt, cl = (importer.env[a] for a in node.args[:7])
    layer, scale, window = (node.args[7], float(node.args[8]), int(node.args[9]))
    B, H, D = _static(q.ty.shape, "q")
    L, P, KVH, _, S = _static(kp.ty.shape, "k_pool")
    MP = _static(pt.ty.shape, "page_table")[1]
    dtype = q.ty.dtype
    func = paged_decode_attention_cpu(
        batch=B, q_heads=H, kv_heads=KVH, head_dim=D, num_layers=L, num_pages=P,
        page_size=S, max_pages=MP, scale=scale, window=window, dtype=dtype,
        num_splits=default_num_splits(B, KVH, MP, int(os.environ.get("TVM_NUM_THREADS", 0))
                                      or os.cpu_count() or 1))
    gv = bb.add_func(func, "paged_decode_attention")
    return bb.emit(relax.call_tir(gv, relax.Tuple([q, kn, vn, kp, vp, pt, cl,
                                                          relax.prim_value(int(layer))]),
                                  out_ty=relax.TensorType([B, H, D], dtype)))
