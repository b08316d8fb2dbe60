"""attnforge's converters for ATen ops that TVM's Relax importer gets wrong.

Each converter has TVM's ``custom_convert_map`` signature ``fn(node, importer) -> relax.Var``,
so :data:`CONVERTERS` also works with stock ``from_exported_program(custom_convert_map=...)``.
They take result dtypes from the node's fake tensor (``node.meta["val"]``): torch already
applied its type-promotion rules there, so the Relax program gets the same dtypes as eager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from tvm import relax

from .index_put import convert_index_put


def torch_dtype_str(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (TVM's dtype spelling)."""
    return str(dtype).removeprefix("torch.")


def meta_dtype(node: fx.Node) -> str | None:
    """dtype of the node's (single tensor) result as recorded by torch.export, if any."""
    val = node.meta.get("val")
    return torch_dtype_str(val.dtype) if isinstance(val, torch.Tensor) else None


def _cumsum(node: fx.Node, importer: Any) -> relax.Var:
    """``aten.cumsum.default``: sum bool/integer inputs in int64, as torch does.

    TVM's converter keeps the input dtype, so ``cumsum(mask)`` on a bool mask (HF's
    position-id / padding code in GPT-2, Llama, Mistral) is typed bool; later arithmetic on it
    fails to build ("CreateAdd ... kDLFloat") or gives wrong values.  torch promotes bool and
    integer inputs to int64 unless ``dtype=`` is given; we cast the input to the result dtype
    recorded by torch.export first, then sum in that dtype.
    """
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    out_dtype = meta_dtype(node)
    if out_dtype is None:
        given = node.kwargs.get("dtype")
        in_dtype = x.ty.dtype
        if given is not None:
            out_dtype = torch_dtype_str(given)
        elif in_dtype == "bool" or in_dtype.startswith(("int", "uint")):
            out_dtype = "int64"
        else:
            out_dtype = in_dtype
    if x.ty.dtype != out_dtype:
        x = bb.emit(relax.op.astype(x, out_dtype))
    axis = int(dim) % max(x.ty.ndim, 1)  # legalization rejects negative axes on dynamic shapes
    return bb.emit(relax.op.cumsum(x, axis=axis, dtype=out_dtype))


def _addmm(node: fx.Node, importer: Any) -> relax.Var:
    """``aten.addmm.default`` (``nn.Linear`` with bias): ``beta * bias + alpha * (m1 @ m2)``.

    TVM's converter always emits the matmul with ``out_dtype="float32"`` and then adds the bias
    in its own dtype, so fp16 / bf16 models fail to import ("Binary operators must have the
    same datatype").  We accumulate in fp32 as torch's kernels do, add the bias in fp32 and
    cast the sum to the dtype torch.export recorded for the node.
    """
    bb = importer.block_builder
    bias, m1, m2 = (importer.env[a] for a in node.args[:3])
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    out_dtype = meta_dtype(node) or m1.ty.dtype
    res = bb.emit(relax.op.matmul(m1, m2, out_dtype="float32"))
    if alpha != 1:
        res = bb.emit(relax.op.multiply(res, relax.const(alpha, "float32")))
    if beta != 0:
        if bias.ty.dtype != "float32":
            bias = bb.emit(relax.op.astype(bias, "float32"))
        if beta != 1:
            bias = bb.emit(relax.op.multiply(bias, relax.const(beta, "float32")))
        res = bb.emit(relax.op.add(res, bias))
    return res if out_dtype == "float32" else bb.emit(relax.op.astype(res, out_dtype))


#: ``{op key: converter}`` in TVM's ``custom_convert_map`` format (keys are ``target.__name__``).
CONVERTERS: dict[str, Callable[[fx.Node, Any], relax.Var]] = {
    "addmm.default": _addmm,
    "cumsum.default": _cumsum,
    "index_put.default": convert_index_put,
}
