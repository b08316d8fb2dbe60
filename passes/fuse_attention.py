"""FuseAttention: outline every scaled-dot-product attention into one annotated call.

What it does
    Anchored at each ``R.nn.softmax(S, axis=-1)``, it proves the surrounding subgraph is
    ``softmax(scale * Q Kᵀ + mask) V`` and replaces it by a call ``attention(Q, K, V[, mask])``
    to a private Relax function holding the *original* ops (so an unlowered module computes
    exactly what it did before) with attrs ``Composite="attnforge.attention"``,
    ``attnforge.scale``, ``attnforge.gqa_groups``, ``attnforge.mask_kind``
    (``none``/``additive``/``bool``), ``attnforge.mask_invert``, ``attnforge.mask_fill``,
    ``attnforge.safe_softmax`` and ``attnforge.layout`` (``BHND`` or batch-folded ``BND``).
    K and V are passed *before* any GQA head repetition.  Structurally identical sites (the
    layers of one model) share one function.

Recognised forms (what ``from_exported_program`` gives for HF eager/sdpa attention,
hand-written attention and ``F.scaled_dot_product_attention``): ``matmul(Q, permute_dims(K))``
with the batch fold ``broadcast_to``/``reshape`` the importer inserts around ``bmm``; scale as
multiply or divide by a scalar constant on Q, on Kᵀ and/or on the scores (before the mask);
an additive float mask (``add``) or a boolean ``where(keep, S, fill)`` /
``where(masked, fill, S)`` (``masked_fill``) with fill ``-inf`` or a huge negative value; the
SDPA "safe softmax" (fully masked rows give 0); GQA/MQA via ``expand_dims``+``broadcast_to``+
``reshape`` (HF ``repeat_kv``, ``repeat_interleave``, ``enable_gqa``); 4-D ``[B,H,N,D]`` and
batch-folded 3-D ``[B*H,N,D]`` tensors.

Anything else is left untouched; a softmax next to a matmul that does not match is recorded
with the reason in the module attr ``attnforge.attention_rejections`` (see
:func:`attnforge.passes.attention_report.attention_rejections`).

Preconditions: Relax as imported (before ``LegalizeOps``); static or symbolic shapes
(symbolic dims compare by proof, :mod:`._symbolic_shape`).
Place in the pipeline: first of the attention passes (then ``AnalyzeAttentionMask``,
``LowerAttentionToTIR``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import _attention_ir as ir
from ._symbolic_shape import shape_dims  # static dims: ints, symbolic: SymDim

__all__ = ["FuseAttention"]

_VIEW_OPS = ("relax.broadcast_to", "relax.reshape")
# ops peel_input may walk through (views, scalar scales, Kᵀ); any other producer ends the walk
_PEELABLE = frozenset(_VIEW_OPS + ("relax.multiply", "relax.divide", "relax.permute_dims"))
_MIN_FILL = -1e30  # a where-fill at or below this acts like -inf on realistic scores


class _Reject(Exception):
    def __init__(self, reason: str, candidate: bool = True):
        super().__init__(reason)
        self.reason, self.candidate = reason, candidate


@dataclass
class _Site:
    root: relax.Var
    inputs: list  # [Q, K, V] (+ mask)
    body: set = field(default_factory=set)  # vars whose bindings move into the function
    exclusive: set = field(default_factory=set)  # vars that must have no use outside
    attrs: dict = field(default_factory=dict)


class _Matcher:
    """Match attention sites inside one Relax function."""

    def __init__(self, func: relax.Function):
        self.var2val = relax.analysis.get_var2val(func)
        self.users: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                for v in relax.analysis.free_vars(b.value):
                    self.users.setdefault(v, []).append(b.var)
        for v in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(v, []).append(None)

    def call(self, e, *ops) -> relax.Call | None:
        val = self.var2val.get(e) if isinstance(e, relax.Var) else None
        if ir.op_name(val) is not None and (not ops or ir.op_name(val) in ops):
            return val
        return None

    def scalar(self, e) -> float | None:
        return ir.scalar_value(e, self.var2val)

    def only_user(self, v) -> relax.Var | None:
        users = self.users.get(v, [])
        return users[0] if len(users) == 1 else None

    # ------------------------------------------------------------------ input side
    def peel_input(self, e, site: _Site, k_side: bool):
        """Walk back from a matmul operand through views, scales, Kᵀ and GQA repetition."""
        scale, transposed, groups = 1.0, False, 1
        while True:
            c = self.call(e)
            name = ir.op_name(c)
            if name not in _PEELABLE:  # e.g. concat (a tuple argument): the operand starts here
                break
            arg = c.args[0]
            in_shape, out_shape = shape_dims(arg), shape_dims(e)
            if in_shape is None or out_shape is None:
                raise _Reject(f"{name} on {e.name}: dynamic shapes are not supported")
            is_view = (name == "relax.broadcast_to" and in_shape == out_shape) or (
                name == "relax.reshape" and self._is_fold(in_shape, out_shape))
            if is_view:
                pass
            elif name == "relax.reshape" and self._gqa(arg) is not None:
                base, g = self._gqa(arg)
                site.body.update({self._var(arg), self._var(self.call(arg).args[0])})
                site.body.add(e)
                groups *= g
                e = base
                continue
            elif name in ("relax.multiply", "relax.divide") and self.scalar(c.args[1]) is not None:
                s = self.scalar(c.args[1])
                scale *= s if name == "relax.multiply" else 1.0 / s
                self._add_const(c.args[1], site)
            elif name == "relax.multiply" and self.scalar(arg) is not None:
                scale *= self.scalar(arg)
                self._add_const(arg, site)
                arg = c.args[1]
            elif (k_side and not transposed and name == "relax.permute_dims"
                  and self._swaps_last_two(c, len(in_shape))):
                transposed = True
            else:
                break
            site.body.add(e)
            e = arg
        if k_side and not transposed:
            raise _Reject("the second QK operand is not permute_dims(K) over its last two axes")
        return e, scale, groups

    def _var(self, e):
        return e if isinstance(e, relax.Var) else None

    def _add_const(self, e, site):
        if isinstance(e, relax.Var):
            site.body.add(e)

    @staticmethod
    def _is_fold(in_shape, out_shape) -> bool:
        return (len(in_shape) == 4 and len(out_shape) == 3
                and out_shape == [in_shape[0] * in_shape[1]] + in_shape[2:])

    @staticmethod
    def _swaps_last_two(call, ndim) -> bool:
        axes = call.attrs.axes
        want = list(range(ndim))
        want[-1], want[-2] = want[-2], want[-1]
        return axes is not None and [int(a) for a in axes] == want

    def _gqa(self, e):
        """``broadcast_to(expand_dims(K, 2), [B,Hkv,g,N,D])`` -> (K, g)."""
        bc = self.call(e, "relax.broadcast_to")
        if bc is None:
            return None
        ex = self.call(bc.args[0], "relax.expand_dims")
        shape = shape_dims(e)
        if ex is None or shape is None or len(shape) != 5:
            return None
        if [int(a) for a in ex.attrs.axis] != [2] or shape_dims(bc.args[0])[2] != 1:
            return None
        return ex.args[0], shape[2]

    # ------------------------------------------------------------------ score side
    def match(self, sm_var, sm) -> _Site:
        x = sm.args[0]
        ndim = x.ty.ndim
        axis = int(sm.attrs.axis)
        near_matmul = self._near_matmul(x, sm_var)
        if axis not in (-1, ndim - 1):
            raise _Reject(f"softmax over axis {axis}, not the last (key) axis", near_matmul)
        if ndim not in (3, 4) or shape_dims(x) is None:
            raise _Reject(f"scores must be 3-D or 4-D with static shape, got {x.ty}", near_matmul)
        site = _Site(root=sm_var, inputs=[])
        site.body.add(sm_var)
        site.exclusive.add(sm_var)
        # Forward: optional safe softmax, views, then matmul(P, V).
        p, safe = sm_var, False
        users = [u for u in self.users.get(p, [])]
        if len(users) == 2:
            safe_var = self._safe_softmax(p, x, users, site)
            if safe_var is None:
                raise _Reject("softmax output has 2 uses (probabilities used outside)",
                              near_matmul)
            p, safe = safe_var, True
        while True:
            u = self.only_user(p)
            if u is None:
                raise _Reject(f"softmax output {p.name} has {len(self.users.get(p, []))} "
                              "uses; fusing would need the probabilities", near_matmul)
            uc = self.call(u)
            name = ir.op_name(uc)
            if name in _VIEW_OPS and self._view_ok(uc.args[0], u):
                site.body.add(u)
                site.exclusive.add(u)
                p = u
                continue
            if name == "relax.matmul" and uc.args[0].same_as(p):
                break
            raise _Reject(f"softmax output feeds {name or 'a non-op'} ({u.name}) instead of "
                          "matmul(P, V)", near_matmul)
        pv_var, pv = u, uc
        site.body.add(pv_var)
        root = pv_var
        nxt = self.only_user(pv_var)
        nc = self.call(nxt, "relax.reshape") if nxt is not None else None
        if nc is not None and ndim == 4 and len(shape_dims(pv_var)) == 3:
            o_shape = shape_dims(pv_var)
            if shape_dims(nxt) == shape_dims(x)[:2] + o_shape[1:]:
                site.body.add(nxt)
                root = nxt
        site.exclusive.add(pv_var)
        site.root = root
        v, v_scale, v_groups = self.peel_input(pv.args[1], site, k_side=False)
        if v_scale != 1.0:
            raise _Reject("V is scaled inside the attention")
        # Backward from the scores: mask, scale, unfold reshape, matmul(Q, Kᵀ).
        e, scale, mask = x, 1.0, None
        while True:
            c = self.call(e)
            name = ir.op_name(c)
            if e is not x:
                site.exclusive.add(e)
            site.body.add(e)
            if name == "relax.add" and mask is None and scale == 1.0:
                a, b = c.args
                if self._leads_to_matmul(a):
                    mask, e = ("additive", b, False, None), a
                elif self._leads_to_matmul(b):
                    mask, e = ("additive", a, False, None), b
                else:
                    raise _Reject("add before softmax: neither operand comes from Q Kᵀ")
                if mask[1].ty.dtype != x.ty.dtype:
                    raise _Reject(f"additive mask dtype {mask[1].ty.dtype} != {x.ty.dtype}")
                continue
            if name == "relax.where" and mask is None and scale == 1.0:
                cond, a, b = c.args
                fa, fb = self.scalar(a), self.scalar(b)
                if fb is not None and self._leads_to_matmul(a):
                    mask, e, fill = ("bool", cond, False, fb), a, fb
                    self._add_const(b, site)
                elif fa is not None and self._leads_to_matmul(b):
                    mask, e, fill = ("bool", cond, True, fa), b, fa
                    self._add_const(a, site)
                else:
                    raise _Reject("where before softmax is not a mask fill of the scores")
                if not (fill == -math.inf or fill <= _MIN_FILL):
                    raise _Reject(f"masked scores are filled with {fill}, not -inf/finfo.min")
                continue
            if name in ("relax.add", "relax.where"):
                raise _Reject(f"{name} after scaling or a second mask; only one mask applied "
                              "after the scale is supported")
            if name in ("relax.multiply", "relax.divide"):
                s = self.scalar(c.args[1])
                if s is not None:
                    scale *= s if name == "relax.multiply" else 1.0 / s
                    self._add_const(c.args[1], site)
                    e = c.args[0]
                    continue
                if name == "relax.multiply" and self.scalar(c.args[0]) is not None:
                    scale *= self.scalar(c.args[0])
                    self._add_const(c.args[0], site)
                    e = c.args[1]
                    continue
                raise _Reject(f"{name} of the scores by a non-scalar")
            if name == "relax.reshape" and len(shape_dims(c.args[0])) == 3:
                e = c.args[0]
                continue
            if name == "relax.matmul":
                break
            raise _Reject(f"{name or 'non-op'} between Q Kᵀ and softmax is not supported",
                          near_matmul)
        qk = c
        q, q_scale, q_groups = self.peel_input(qk.args[0], site, k_side=False)
        k, k_scale, k_groups = self.peel_input(qk.args[1], site, k_side=True)
        if q_groups != 1:
            raise _Reject("Q is repeated over heads")
        if k_groups != v_groups:
            raise _Reject(f"K and V are repeated differently ({k_groups} vs {v_groups})")
        site.inputs = [q, k, v]
        kind = "none"
        if mask is not None:
            kind, m, invert, fill = mask
            site.inputs.append(m)
            site.attrs.update({ir.A_MASK_INVERT: invert})
            if fill is not None:
                site.attrs[ir.A_MASK_FILL] = float(fill)
        layout = self._check_shapes(q, k, v, x, k_groups)
        site.attrs.update({
            ir.A_SCALE: float(scale * q_scale * k_scale), ir.A_GROUPS: int(k_groups),
            ir.A_MASK_KIND: kind, ir.A_SAFE_SOFTMAX: safe, ir.A_LAYOUT: layout,
        })
        return site

    def _check_shapes(self, q, k, v, x, groups) -> str:
        qs, ks, vs, xs = (shape_dims(t) for t in (q, k, v, x))
        if None in (qs, ks, vs):
            raise _Reject("Q, K, V need static shapes")
        if not len(qs) == len(ks) == len(vs) or len(qs) not in (3, 4):
            raise _Reject(f"Q/K/V ranks differ or are not 3/4: {qs} {ks} {vs}")
        if len(qs) == 3 and groups != 1:
            raise _Reject("GQA on batch-folded 3-D tensors")
        lead_q, lead_k = qs[:-2], ks[:-2]
        want_k = lead_q[:-1] + [lead_q[-1] // groups]
        ok = (lead_k == want_k and vs[:-2] == lead_k and ks[-1] == qs[-1] and vs[-2] == ks[-2]
              and lead_q[-1] % groups == 0)
        folded = [math.prod(lead_q)] if len(qs) == 4 and len(xs) == 3 else lead_q
        if not ok or xs != folded + [qs[-2], ks[-2]]:
            raise _Reject(f"inconsistent shapes Q{qs} K{ks} V{vs} scores{xs} (groups {groups})")
        return "BHND" if len(qs) == 4 else "BND"

    def _view_ok(self, src, dst) -> bool:
        a, b = shape_dims(src), shape_dims(dst)
        return a is not None and b is not None and (a == b or self._is_fold(a, b))

    def _leads_to_matmul(self, e, depth: int = 6) -> bool:
        """Whether e is (a short chain of elementwise/view ops over) a matmul."""
        for _ in range(depth):
            c = self.call(e)
            name = ir.op_name(c)
            if name == "relax.matmul":
                return True
            if name not in ("relax.multiply", "relax.divide", "relax.reshape",
                            "relax.add", "relax.where"):
                return False
            if name == "relax.where":
                e = c.args[1] if self.scalar(c.args[2]) is not None else c.args[2]
            elif name == "relax.multiply" and self.scalar(c.args[0]) is not None:
                e = c.args[1]
            else:
                e = c.args[0]
        return False

    def _near_matmul(self, x, p) -> bool:
        """Whether a failed match is worth reporting: softmax feeds a matmul, or its scores
        come from ``matmul(A, permute_dims(B))`` of activations (not a linear layer)."""
        frontier = [p]
        for _ in range(3):
            nxt = []
            for v in frontier:
                for u in self.users.get(v, []):
                    if u is not None and ir.op_name(self.call(u)) == "relax.matmul":
                        return True
                    if u is not None:
                        nxt.append(u)
            frontier = nxt
        e = x
        for _ in range(6):
            c = self.call(e)
            if c is None:
                return False
            if ir.op_name(c) == "relax.matmul":
                rhs = self.call(c.args[1])
                while ir.op_name(rhs) in _VIEW_OPS:
                    rhs = self.call(rhs.args[0])
                return (ir.op_name(rhs) == "relax.permute_dims"
                        and not isinstance(rhs.args[0], tvm.ir.expr.Constant))
            e = c.args[0]
        return False

    def _safe_softmax(self, p, x, users, site) -> relax.Var | None:
        """SDPA's ``where(no_key_allowed, 0, softmax(x))``: return the where's var."""
        full = [u for u in users if self.call(u, "relax.full_like") is not None]
        wh = [u for u in users if self.call(u, "relax.where") is not None]
        if len(full) != 1 or len(wh) != 1:
            return None
        w = self.call(wh[0])
        if not (w.args[1].same_as(full[0]) and w.args[2].same_as(p)):
            return None
        fv = self.call(full[0]).args[1]
        if self.scalar(fv) != 0.0:
            return None
        chain = [w.args[0]]
        e = w.args[0]
        for op in ("relax.logical_not", "relax.astype", "relax.max", "relax.astype",
                   "relax.logical_not", "relax.equal"):
            c = self.call(e, op)
            if c is None:
                return None
            if op == "relax.max" and not (bool(c.attrs.keepdims)
                                          and [int(a) for a in c.attrs.axis] in ([-1],
                                                                                 [x.ty.ndim - 1])):
                return None
            if op == "relax.equal":
                if not (c.args[0].same_as(x) and self.scalar(c.args[1]) == -math.inf):
                    return None
                break
            e = c.args[0]
            chain.append(e)
        site.body.update(chain + [full[0], wh[0]])
        site.exclusive.update(chain + [full[0], wh[0]])
        return wh[0]


def _outline(func: relax.Function, site: _Site) -> relax.Function:
    names = ("q", "k", "v", "mask")
    params = [relax.Var(n, t.ty) for n, t in zip(names, site.inputs)]
    mapping = {t: p for t, p in zip(site.inputs, params) if isinstance(t, relax.Var)}
    consts = [(t, p) for t, p in zip(site.inputs, params) if not isinstance(t, relax.Var)]
    bindings = [b for blk in func.body.blocks for b in blk.bindings if b.var in site.body]
    bb = relax.BlockBuilder()
    attrs = {"Composite": ir.COMPOSITE, **site.attrs}
    with bb.function("attention", params, attrs=attrs, private=True):
        with bb.dataflow():
            subst = ir.Subst(mapping)
            for b in bindings:
                val = b.value
                for t, p in consts:  # a constant mask operand
                    val = _replace_arg(val, t, p)
                emit = bb.emit_output if b.var.same_as(site.root) else bb.emit
                subst.mapping[b.var] = emit(subst.visit_expr(val), name_hint=b.var.name)
            out = subst.mapping[site.root]
        bb.emit_func_output(out)
    out = bb.get()["attention"]
    if relax.analysis.free_symbolic_vars(out) or relax.analysis.defined_symbolic_vars(out):
        out = relax.utils.copy_with_new_vars(out)  # own symbolic vars (well-formed module)
    return out


def _replace_arg(call, target, repl):
    if isinstance(call, relax.Call) and any(a.same_as(target) for a in call.args):
        args = [repl if a.same_as(target) else a for a in call.args]
        return relax.Call(call.op, args, call.attrs, call.ty_args)
    return call


@mutator
class _Fuser(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.calls: dict = {}

    def visit_var_binding_(self, binding):
        call = self.calls.get(binding.var)
        if call is None:
            return super().visit_var_binding_(binding)
        gv, inputs = call
        new = self.builder_.normalize(relax.Call(gv, [self.visit_expr(a) for a in inputs]))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, new))


def _check_site(m: _Matcher, func, site: _Site) -> None:
    for v in site.exclusive:
        if v is site.root:
            continue
        outside = [u for u in m.users.get(v, []) if u is None or u not in site.body]
        if outside:
            raise _Reject(f"intermediate {v.name} is also used outside the attention")
    inputs = {t for t in site.inputs if isinstance(t, relax.Var)}
    for blk in func.body.blocks:
        for b in blk.bindings:
            if b.var in site.body:
                for fv in relax.analysis.free_vars(b.value):
                    if isinstance(fv.ty, tvm.ir.PrimType):  # a symbolic dim (tir var)
                        continue
                    if fv not in site.body and fv not in inputs:
                        raise _Reject(f"{b.var.name} uses {fv.name}, which is not an input")


@tvm.transform.module_pass(opt_level=0, name="FuseAttention")
class FuseAttention:
    """Outline attention subgraphs into annotated ``attention`` functions (module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fuser = _Fuser(mod)
        rejections = list(ir.to_py(mod.attrs[ir.M_REJECTIONS])) if (
            mod.attrs is not None and ir.M_REJECTIONS in mod.attrs) else []
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or ir.is_attention_func(func):
                continue
            m = _Matcher(func)
            fuser.calls = {}
            claimed: set = set()
            for blk in func.body.blocks:
                for b in blk.bindings:
                    if ir.op_name(b.value) != "relax.nn.softmax":
                        continue
                    try:
                        site = m.match(b.var, b.value)
                        _check_site(m, func, site)
                        if site.exclusive & claimed:
                            raise _Reject("overlaps another attention site")
                    except _Reject as r:
                        if r.candidate:
                            rejections.append({"function": gv.name_hint, "var": b.var.name,
                                               "reason": r.reason})
                        continue
                    claimed |= site.exclusive
                    callee = fuser.builder_.add_func(_outline(func, site), "attention")
                    fuser.calls[site.root] = (callee, site.inputs)
            if fuser.calls:
                new = relax.analysis.remove_all_unused(fuser.visit_expr(func))
                fuser.builder_.update_func(gv, new)
        out = fuser.builder_.get()
        if mod.attrs is not None:
            out = out.with_attrs(mod.attrs) if hasattr(out, "with_attrs") else out
        if rejections:
            out = out.with_attr(ir.M_REJECTIONS, rejections)
        return out
