"""Bring a torch.export program to the Core-ATen form that TVM's importer translates.

TVM's ``from_exported_program`` calls ``ep.run_decompositions()`` itself.  We do it here
instead (and call the importer with decomposition off) so that we can fix the graph first:

``view`` -> ``reshape``.  HF's GPT-2 ``Conv1D`` does ``x.view(-1, x.size(-1))`` on the
output of ``transpose(sdpa_out, 1, 2)``.  In eager mode (and in the exported graph's fake
tensors) SDPA returns a tensor laid out so that this transpose is contiguous, so the view is
legal and HF's ``.contiguous()`` before it is a no-op that export drops.  Decomposing SDPA into
matmul/softmax/matmul yields a plain contiguous ``[B, H, S, D]`` result instead; the transpose
is then non-contiguous and re-tracing the ``view`` raises a fake-tensor stride error ("Cannot
view a tensor with shape [2, 64, 64] and strides (64, 128, 1) ...") at batch > 1.  Without
decomposition the importer lacks ``diff.default`` and other composite ops, so skipping it is
no fix.  Strides do not exist in Relax: in a graph without mutation ``view`` and ``reshape``
compute the same values, and ``reshape`` re-traces for any layout (it decomposes to
``view`` or ``clone`` + ``view``).  Views whose input or output is written in place by a
mutating op keep their aliasing meaning and are left alone.

Negative ``dim`` arguments -> non-negative (:func:`normalize_dims`).  With symbolic shapes
TVM's legalization of e.g. ``strided_slice`` (from ``slice.Tensor``, which ``diff`` in HF's
position-id code decomposes to) rejects ``axis=-1`` ("axis < src_tensor_dim (-1 vs. 2)").
The input's rank is static even when its sizes are not, so we rewrite the argument.
"""

from __future__ import annotations

import torch
from torch import fx

_VIEW_OPS = {torch.ops.aten.view.default: torch.ops.aten.reshape.default}


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _mutated_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value some op writes in place, closed over view/alias chains."""
    written: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_function" and _is_mutating(node):
            written.update(a for a in node.all_input_nodes)
    # Any node aliasing a written node (its view input or its view users) is affected too.
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if node.op != "call_function" or node in written:
                continue
            touches = any(n in written for n in (*node.all_input_nodes, *node.users))
            if touches and _is_view(node):
                written.add(node)
                changed = True
    return written


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    ret = schema.returns[0].alias_info
    return ret is not None and not ret.is_write


def views_to_reshapes(gm: fx.GraphModule) -> int:
    """Rewrite mutation-free ``aten.view`` nodes of ``gm`` (and its subgraphs) to ``reshape``.

    Returns the number of nodes rewritten.
    """
    count = 0
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        mutated = _mutated_nodes(sub.graph)
        for node in sub.graph.nodes:
            if node.op == "call_function" and node.target in _VIEW_OPS and node not in mutated:
                node.target = _VIEW_OPS[node.target]
                count += 1
        if count:
            sub.recompile()
    return count


_aten = torch.ops.aten
#: ops whose ``dim`` argument (at this position) indexes the dims of their first tensor input
_DIM_ARG = {
    _aten.slice.Tensor: 1, _aten.select.int: 1, _aten.cat.default: 1, _aten.split.Tensor: 2,
    _aten.split_with_sizes.default: 2, _aten.index_select.default: 1, _aten.gather.default: 1,
    _aten.narrow.default: 1, _aten.squeeze.dim: 1, _aten.cumsum.default: 1,
}


def normalize_dims(gm: fx.GraphModule) -> int:
    """Make negative ``dim`` arguments of the ops in ``_DIM_ARG`` non-negative; returns count."""
    count = 0
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            pos = _DIM_ARG.get(node.target) if node.op == "call_function" else None
            if pos is None:
                continue
            first = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else node.args[0]
            val = first.meta.get("val") if isinstance(first, fx.Node) else None
            args = list(node.args)
            if "dim" in node.kwargs:
                dim = node.kwargs["dim"]
            elif len(args) > pos:
                dim = args[pos]
            else:
                continue
            if not (isinstance(dim, int) and dim < 0 and isinstance(val, torch.Tensor)):
                continue
            if "dim" in node.kwargs:
                node.update_kwarg("dim", dim % max(val.dim(), 1))
            else:
                node.update_arg(pos, dim % max(val.dim(), 1))
            count += 1
        if count:
            sub.recompile()
    return count


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Fix views, run torch's default Core-ATen decompositions, normalise negative dims."""
    views_to_reshapes(ep.graph_module)
    ep = ep.run_decompositions(torch.export.default_decompositions())
    normalize_dims(ep.graph_module)
    return ep
