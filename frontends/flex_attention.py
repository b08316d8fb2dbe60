"""Converter for ``torch.nn.attention.flex_attention.flex_attention`` (the exported HOP).

TVM's importer has no converter for the ``flex_attention`` higher-order op.  We convert it in
two steps:

1. :func:`prepare_flex_attention` (called by :func:`~.torch_import.import_torch_model` before
   translation, with the ExportedProgram at hand) analyses every flex node: the ``mask_mod``
   subgraph is evaluated at compile time on index tensors and combined with the block mask
   tensors (FlexAttention semantics: an element is kept when its block is listed as *full*, or
   listed as *partial* and ``mask_mod`` allows it; unlisted blocks are masked), giving a bool
   keep-mask ``[Bm, Hm, Nq, Nk]``; the ``score_mod`` subgraph is translated into a scalar TIR
   PrimFunc (:mod:`.flex_subgraph`).  Unsupported ops and data-dependent values (a captured
   tensor that is a run-time input, block-mask tensors computed in ``forward``) raise
   :class:`~.flex_subgraph.FlexSubgraphError` (an ``UnsupportedOpError``) naming them.
2. :func:`convert_flex_attention` emits a call to a private Relax function in the form
   ``FuseAttention`` produces (``Composite="attnforge.attention"``, scale, GQA groups, the
   keep-mask as a constant bool operand with fill ``-inf`` and SDPA's safe softmax, since
   FlexAttention gives 0 for rows with no allowed key), so ``AnalyzeAttentionMask`` classifies
   the mask (causal, sliding window, static block-sparse, batch-varying) and
   ``LowerAttentionToTIR`` lowers it like any other site.  The score mod rides along as attrs
   ``attnforge.score_mod`` (the PrimFunc), ``attnforge.score_mod_consts`` (captured arrays) and
   ``attnforge.score_mod_desc``; the function's body is the dense reference (the score mod as
   broadcast Relax ops, :mod:`.flex_relax`), which is what runs when a kernel rejects the site.

The block mask's BLOCK_SIZE (128 by default) does not matter: our BlockMask is rebuilt from
the exact keep-mask at the kernel's block size.  ``return_lse``/``return_aux`` are not
supported (only the attention output may be used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx
from tvm import relax

from .errors import FrontendError
from .flex_relax import score_mod_relax
from .flex_subgraph import FlexSubgraphError, evaluate_mask_mod, node_site, score_mod_to_tir

__all__ = ["FlexSite", "convert_flex_attention", "is_flex_node", "prepare_flex_attention"]

META = "attnforge.flex"
_NOOP_BLOCK = 1 << 30  # BLOCK_SIZE of the block mask flex_attention makes when given none
SOURCE_OP = "flex_attention"


@dataclass
class FlexSite:
    """What :func:`prepare_flex_attention` learnt about one flex_attention node."""

    scale: float
    groups: int
    keep: np.ndarray | None  # bool [Bm, Hm, Nq, Nk]; None: every element allowed
    mask_desc: str
    score_mod: Any  # tirx.PrimFunc or None
    score_consts: list
    score_desc: str


def is_flex_node(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == SOURCE_OP


def _describe(gm: fx.GraphModule | None, what: str) -> str:
    if gm is None:
        return "none"
    ops = [str(n.target).removeprefix("aten.").split(".")[0] for n in gm.graph.nodes
           if n.op == "call_function"]
    return f"{what}({', '.join(ops) or 'identity'})"


class _Values:
    """Compile-time values of the main graph's placeholders (params, buffers, constants)."""

    def __init__(self, ep: torch.export.ExportedProgram):
        from torch.export.graph_signature import InputKind

        self.by_name: dict = {}
        self.memo: dict = {}
        self.user: set = set()
        for spec in ep.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind == InputKind.USER_INPUT:
                self.user.add(name)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER,
                               InputKind.CONSTANT_TENSOR):
                src = ep.state_dict if spec.target in ep.state_dict else ep.constants
                self.by_name[name] = src[spec.target]

    def _fold(self, node):
        """Value of a node computed only from constants (e.g. the block mask tensors
        ``flex_attention`` builds in ``forward`` when given none), else None."""
        if not isinstance(node, fx.Node):
            return node
        if node.op == "placeholder":
            return self.by_name.get(node.name)
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return None
        if node in self.memo:
            return self.memo[node]
        ins = [self._fold(n) for n in node.all_input_nodes]
        val = None
        if all(v is not None for v in ins):
            env = dict(zip(node.all_input_nodes, ins, strict=True))
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            with torch.no_grad():
                val = node.target(*args, **kwargs)
        self.memo[node] = val
        return val

    def get(self, node, what: str, site: str) -> np.ndarray:
        t = self._fold(node)
        if isinstance(t, torch.Tensor):
            t = t.float() if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
            return t.detach().cpu().numpy()
        name = node.name if isinstance(node, fx.Node) else repr(node)
        why = ("it is a run-time input of the model" if name in self.user
               else "it is computed at run time inside forward")
        raise FlexSubgraphError(what, f"data-dependent tensor {name!r}", site,
                                f"{why}; flex_attention's {what} must depend only on indices and "
                                "compile-time tensors (parameters, buffers, constants)")


def _coverage(nb, idx, nq, nk, bq, bk) -> np.ndarray:
    """Bool ``[Bb, Hb, Nq, Nk]``: elements inside the listed blocks."""
    nb, idx = np.asarray(nb), np.asarray(idx)
    bb, hb, nqb = nb.shape
    blk = np.zeros((bb, hb, nqb, int(idx.max(initial=0)) + 1), dtype=bool)
    for b in range(bb):
        for h in range(hb):
            for qb in range(nqb):
                blk[b, h, qb, idx[b, h, qb, : int(nb[b, h, qb])]] = True
    qb_of = np.minimum(np.arange(nq) // bq, nqb - 1)[:, None]
    kb_of = np.arange(nk) // bk
    inside = kb_of < blk.shape[-1]
    dense = blk[:, :, qb_of, np.minimum(kb_of, blk.shape[-1] - 1)[None, :]]
    return dense & inside[None, None, None, :]


def _squeeze_bh(keep: np.ndarray) -> np.ndarray:
    if keep.shape[0] > 1 and (keep == keep[:1]).all():
        keep = keep[:1]
    if keep.shape[1] > 1 and (keep == keep[:, :1]).all():
        keep = keep[:, :1]
    return keep


def _analyse(ep, node: fx.Node, values: _Values) -> FlexSite:
    site = node_site(node)
    q, k, v, score_node, bm, scale = node.args[:6]
    score_bufs = node.args[7] if len(node.args) > 7 else ()
    mask_bufs = node.args[8] if len(node.args) > 8 else ()
    qv, kv = q.meta["val"], k.meta["val"]
    if not all(isinstance(d, int) for d in (*qv.shape, *kv.shape)):
        raise FrontendError(f"flex_attention at {site}: symbolic shapes {tuple(qv.shape)} are not "
                            "supported for flex_attention sites yet; export with static shapes "
                            "(no dynamic_shapes for these dims)", op=SOURCE_OP, source=site)
    B, Hq, Nq, _ = (int(s) for s in qv.shape)
    Hkv, Nk = int(kv.shape[1]), int(kv.shape[2])
    if any(int(u.args[1]) != 0 for u in node.users if u.target.__name__ == "getitem"):
        raise FlexSubgraphError("output", "return_lse / return_aux", site,
                                "only the attention output can be compiled; drop return_lse")
    gm = ep.graph_module
    score_gm = getattr(gm, score_node.target)
    mask_gm = getattr(gm, bm[-1].target) if isinstance(bm[-1], fx.Node) else None
    q_len, kv_len, bq, bk = int(bm[0]), int(bm[1]), int(bm[-3]), int(bm[-2])
    noop = bq == bk == _NOOP_BLOCK  # flex_attention(block_mask=None): one block, no lengths
    if not noop and (q_len, kv_len) != (Nq, Nk):
        raise FrontendError(f"flex_attention at {site}: the block mask was built for "
                            f"Q_LEN={q_len}, KV_LEN={kv_len} but the inputs have {Nq}, {Nk}; "
                            "create the block mask for the input lengths",
                            op=SOURCE_OP, source=site)
    # Element mask: (partial blocks & mask_mod) | full blocks.
    mm = evaluate_mask_mod(mask_gm, [values.get(b, "mask_mod", site) for b in mask_bufs],
                           (B, Hq, Nq, Nk), site) if mask_gm is not None else None
    nb, idx = (values.get(bm[i], "block_mask", site) for i in (2, 3))
    keep = _coverage(nb, idx, Nq, Nk, bq, bk)
    if mm is not None:
        keep = keep & mm
    if bm[4] is not None:
        keep = keep | _coverage(values.get(bm[4], "block_mask", site),
                                values.get(bm[5], "block_mask", site), Nq, Nk, bq, bk)
    keep = _squeeze_bh(keep)
    mask_desc = _describe(mask_gm, "mask_mod")
    score_ops = [n for n in score_gm.graph.nodes if n.op == "call_function"]
    smod, consts, sdesc = None, [], "none"
    if score_ops:
        consts = [values.get(b, "score_mod", site) for b in score_bufs]
        smod = score_mod_to_tir(score_gm, consts, site)
        sdesc = _describe(score_gm, "score_mod")
    return FlexSite(float(scale), Hq // Hkv, None if keep.all() else keep, mask_desc, smod,
                    consts, sdesc)


def prepare_flex_attention(ep: torch.export.ExportedProgram) -> dict:
    """Analyse every flex_attention node of ``ep`` (stored in ``node.meta``) and return the
    converters to add to the importer's map: ``flex_attention`` plus placeholders for the
    ops that occur only inside flex subgraphs (the importer never translates those; without
    an entry its unsupported-op check would reject them).  ``{}`` when there is no flex node."""
    flex = [n for n in ep.graph.nodes if is_flex_node(n)]
    if not flex:
        return {}
    values = _Values(ep)
    sub_names: set = set()
    for node in flex:
        node.meta[META] = _analyse(ep, node, values)
        for a in (node.args[3], node.args[4][-1]):
            if isinstance(a, fx.Node) and a.op == "get_attr":
                sub_names.add(a.target)
        _drop_folded_inputs(node)
    _erase_dead(ep.graph)  # block-mask construction inside forward (sort, ...)
    ep.graph_module.recompile()
    inside, outside = set(), set()
    for name, m in ep.graph_module.named_modules():
        if not isinstance(m, fx.GraphModule):
            continue
        keys = {getattr(n.target, "__name__", str(n.target)) for n in m.graph.nodes
                if n.op == "call_function"}
        (inside if name in sub_names else outside).update(keys)
    table = {key: _never_called for key in inside - outside}
    table[SOURCE_OP] = convert_flex_attention
    return table


def _drop_folded_inputs(node: fx.Node) -> None:
    """Everything but q, k, v is in ``node.meta[META]`` now: detach the block-mask tensors and
    captured buffers so that ops computing them at compile time (e.g. the ``sort`` of
    ``BlockMask.from_kv_blocks`` when flex_attention builds its default mask in forward) are
    dead code, not unsupported ops."""
    args = list(node.args)
    bm = list(args[4])
    bm[2:-3] = [None] * len(bm[2:-3])
    args[4] = tuple(bm)
    args[7:9] = [(), ()][: len(args[7:9])]
    node.args = tuple(args)


def _erase_dead(graph: fx.Graph) -> None:
    """Erase nodes the outputs do not need, including the ``_assert_tensor_metadata`` checks
    on them (impure, so fx's ``eliminate_dead_code`` keeps them and their inputs)."""
    out = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    for n in reversed(list(graph.nodes)):
        if n.op != "call_function" or n in live or n.users:
            continue
        is_assert = "_assert_tensor_metadata" in str(n.target)
        if is_assert and any(i in live for i in n.all_input_nodes):
            continue
        if is_assert or not n.is_impure():
            graph.erase_node(n)


def _never_called(node: fx.Node, _importer) -> None:
    raise FrontendError(f"{node.target} occurs only inside flex_attention subgraphs")


def convert_flex_attention(node: fx.Node, importer: Any):
    """Importer converter (TVM's ``custom_convert_map`` signature); see module docstring."""
    from ..passes import _attention_ir as ir
    from ..schedules.attention_score_mod import score_mod_to_attr

    info: FlexSite | None = node.meta.get(META)
    if info is None:
        raise FrontendError("flex_attention node was not prepared: import the model with "
                            "attnforge.frontends.import_torch_model", op=SOURCE_OP)
    q, k, v = (importer.env[a] for a in node.args[:3])
    bb = importer.block_builder
    dtype = str(q.ty.dtype)
    B, H, Nq = (int(s) for s in q.ty.shape.values[:3])
    Nk = int(k.ty.shape.values[2])
    params = [relax.Var(n, t.ty) for n, t in (("q", q), ("k", k), ("v", v))]
    args = [q, k, v]
    if info.keep is not None:
        params.append(relax.Var("mask", relax.TensorType(list(info.keep.shape), "bool")))
        args.append(relax.const(np.ascontiguousarray(info.keep)))
    attrs = {
        "Composite": ir.COMPOSITE, ir.A_SCALE: info.scale, ir.A_GROUPS: info.groups,
        ir.A_MASK_KIND: "bool" if info.keep is not None else "none",
        ir.A_MASK_INVERT: False, ir.A_MASK_FILL: float("-inf"), ir.A_SAFE_SOFTMAX: True,
        ir.A_LAYOUT: "BHND", "attnforge.source_op": SOURCE_OP,
        "attnforge.mask_mod": info.mask_desc, "attnforge.score_mod_desc": info.score_desc,
    }
    if info.score_mod is not None:
        attrs["attnforge.score_mod"] = score_mod_to_attr(info.score_mod)
        attrs["attnforge.score_mod_consts"] = [ir.tensor_attr(c) for c in info.score_consts]
    fbb = relax.BlockBuilder()
    with fbb.function("attention", params, attrs=attrs, private=True):
        with fbb.dataflow():
            out = _reference(fbb, params, info, (B, H, Nq, Nk), dtype)
        fbb.emit_func_output(out)
    gv = bb.add_func(fbb.get()["attention"], "attention")
    return (bb.emit(relax.Call(gv, args)),)


def _reference(fbb, params, info: FlexSite, shape, dtype):
    """Dense FlexAttention in Relax (fp32): what runs when no kernel takes the site."""
    op = relax.op
    f32 = "float32"
    q, k, v = (fbb.emit(op.astype(p, f32)) if dtype != f32 else p for p in params[:3])
    if info.groups > 1:
        k = fbb.emit(op.repeat(k, info.groups, axis=1))
        v = fbb.emit(op.repeat(v, info.groups, axis=1))
    s = fbb.emit(op.matmul(q, fbb.emit(op.permute_dims(k, [0, 1, 3, 2]))))
    s = fbb.emit(op.multiply(s, relax.const(info.scale, f32)))
    if info.score_mod is not None:
        s = score_mod_relax(fbb, info.score_mod, s, shape, info.score_consts)
    mask = params[3] if len(params) > 3 else None
    if mask is not None:
        s = fbb.emit(op.where(mask, s, relax.const(float("-inf"), f32)))
    p = fbb.emit(op.nn.softmax(s, axis=-1))
    if mask is not None:  # rows with no allowed key give 0, as in FlexAttention
        row = fbb.emit(op.max(fbb.emit(op.astype(mask, f32)), axis=-1, keepdims=True))
        ok = fbb.emit(op.greater(row, relax.const(0.0, f32)))
        p = fbb.emit(op.where(ok, p, relax.const(0.0, f32)))
    if dtype == f32:
        return fbb.emit_output(op.matmul(p, v))
    return fbb.emit_output(op.astype(fbb.emit(op.matmul(p, v)), dtype))
