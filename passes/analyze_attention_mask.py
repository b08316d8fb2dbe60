"""AnalyzeAttentionMask: recover the structure of every fused attention site's mask.

What it does
    For each call to an ``attnforge.attention`` function (made by ``FuseAttention``) it looks
    at the mask operand in the caller:

    * no mask: ``MaskSpec.full()``;
    * computed only from constants (iotas, ``arange``, HF's mask builders on constant
      position ids): the subgraph is built and run once on ``llvm`` (one build per caller
      function for all its masks) and the array is classified: full, causal (top-left or
      bottom-right), sliding window (left/right), chunked, else ``static`` block-sparse (bool
      ``[Hm, Nq, Nk]``).  An additive mask is turned into a boolean one only where that is
      exact: values in {0, -inf, <= -1e30} and, when a finite fill is used, no fully masked
      row (PyTorch gives such a row *uniform* weights; a bool/-inf row gives NaN, or 0 under
      SDPA's safe softmax).  Otherwise it stays additive and is passed to the kernel as a
      constant; a mask that varies over the batch is passed as a constant bool tensor;
    * depending on run-time data (a padding ``attention_mask``): ``dynamic``, passed to the
      kernel element-wise.  When the boolean mask is ``static & dynamic`` (an AND tree with
      constant conjuncts) and masked scores become -inf, the constant part's structure is kept
      for block skipping; the kernel applies both.

    Results are attrs on the attention function: ``attnforge.mask_spec`` (MaskSpec fields),
    ``attnforge.static_mask``, ``attnforge.mask_input`` (``none``/``bool``/``additive``),
    ``attnforge.mask_const``, ``attnforge.empty_rows`` (``zero``/``nan``) and
    ``attnforge.mask_note``.  A function shared by calls whose masks differ is cloned.

Preconditions: ``FuseAttention`` has run.  Symbolic lengths: a constant mask is evaluated at
sample lengths and kept structured when every sample agrees (:mod:`._symbolic_mask_eval`).
Place in the pipeline: between ``FuseAttention`` and ``LowerAttentionToTIR``.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..schedules.block_mask import MaskSpec
from . import _attention_ir as ir
from ._symbolic_mask_eval import (
    evaluate_at_samples,
    sample_lengths,
    sample_values,
    substitute_dim,
)
from ._symbolic_shape import is_symbolic, shape_exprs

__all__ = ["AnalyzeAttentionMask", "classify_bool_mask", "spec_from_attrs", "spec_to_attrs"]

_AND_OPS = ("relax.bitwise_and", "relax.logical_and")


def spec_to_attrs(spec: MaskSpec) -> dict:
    d = {"kind": spec.kind}
    for key in ("q_offset", "min_diff", "max_diff", "chunk"):
        val = getattr(spec, key)
        if val is not None and (key != "q_offset" or val):
            d[key] = int(val)
    return d


def spec_from_attrs(func) -> MaskSpec | None:
    """The MaskSpec recorded on an attention function (None before the analysis)."""
    d = ir.attr(func, ir.A_MASK_SPEC)
    if d is None:
        return None
    if d["kind"] == "static":
        return MaskSpec.static(ir.attr(func, ir.A_STATIC_MASK).astype(bool))
    return MaskSpec(d["kind"], q_offset=d.get("q_offset", 0), min_diff=d.get("min_diff"),
                    max_diff=d.get("max_diff"), chunk=d.get("chunk"))


def classify_bool_mask(mask: np.ndarray) -> MaskSpec:
    """Smallest MaskSpec for a bool ``[Nq, Nk]`` or ``[Hm, Nq, Nk]`` mask (exact)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 3:
        if m.shape[0] > 1 and not (m == m[:1]).all():
            return MaskSpec.static(m)
        m = m[0]
    if m.all():
        return MaskSpec.full()
    nq, nk = m.shape
    for spec in _candidates(m):
        if np.array_equal(spec.dense(nq, nk)[0], m):
            return spec
    return MaskSpec.static(m)


def _candidates(m: np.ndarray):
    nq, nk = m.shape
    if m.any():
        d = np.arange(nq)[:, None] - np.arange(nk)[None, :]
        lo, hi = int(d[m].min()), int(d[m].max())
        min_diff = None if lo <= -(nk - 1) else lo
        max_diff = None if hi >= nq - 1 else hi
        off = nk - nq
        if off and min_diff is not None and min_diff == -off:  # bottom-right aligned
            yield MaskSpec("structured", q_offset=off, min_diff=0,
                           max_diff=None if max_diff is None else max_diff + off)
        yield MaskSpec("structured", min_diff=min_diff, max_diff=max_diff)
    row0 = np.nonzero(m[0])[0]
    if row0.size and row0[0] == 0 and row0.size == row0[-1] + 1:
        yield MaskSpec.chunked(int(row0.size))
    col0 = np.nonzero(~m[:, 0])[0]
    if m[0, 0] and col0.size:
        yield MaskSpec.chunked(int(col0[0]), causal=True)


def _depends_on_params(func, var2val, expr, memo) -> bool:
    """Whether ``expr`` depends on a function parameter or an opaque/impure call."""
    if isinstance(expr, tvm.ir.expr.Constant) or not isinstance(expr, relax.Expr):
        return False
    if isinstance(expr, relax.Var):
        if isinstance(expr.ty, tvm.ir.PrimType) and not any(p.same_as(expr) for p in func.params):
            return False  # a symbolic dim (defined by the shapes), not run-time data
        if expr in memo:
            return memo[expr]
        val = var2val.get(expr)
        memo[expr] = True  # parameters, or cycles (none in SSA)
        memo[expr] = val is None or _depends_on_params(func, var2val, val, memo)
        return memo[expr]
    if isinstance(expr, relax.Call):
        if not isinstance(expr.op, tvm.ir.Op) or any(
                isinstance(a, (tvm.ir.GlobalVar, relax.ExternFunc)) for a in expr.args):
            return True  # calls into other functions are not evaluated here
        return any(_depends_on_params(func, var2val, a, memo) for a in expr.args)
    if isinstance(expr, relax.Tuple):
        return any(_depends_on_params(func, var2val, a, memo) for a in expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        return _depends_on_params(func, var2val, expr.tuple_value, memo)
    return False


def _evaluate(func, exprs: list) -> list:
    """Build the constant subgraphs computing ``exprs`` on llvm, run once, return arrays."""
    out: list = [None] * len(exprs)
    todo = []
    for i, e in enumerate(exprs):
        if isinstance(e, tvm.ir.expr.Constant):
            out[i] = e.value.numpy()
        else:
            todo.append(i)
    if not todo:
        return out
    bindings = ir.bindings_computing(func, [exprs[i] for i in todo])
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            subst = ir.Subst({})
            for b in bindings:
                subst.mapping[b.var] = bb.emit(subst.visit_expr(b.value), name_hint=b.var.name)
            res = bb.emit_output(relax.Tuple([subst.visit_expr(exprs[i]) for i in todo]))
        bb.emit_func_output(res)
    ex = tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"}))
    vals = relax.VirtualMachine(ex, tvm.cpu())["main"]()
    for j, i in enumerate(todo):
        out[i] = vals[j].numpy()
    return out


def _conjuncts(var2val, expr) -> list:
    """Leaves of an AND tree (through broadcast_to)."""
    val = var2val.get(expr) if isinstance(expr, relax.Var) else expr
    name = ir.op_name(val)
    if name in _AND_OPS:
        return _conjuncts(var2val, val.args[0]) + _conjuncts(var2val, val.args[1])
    if name == "relax.broadcast_to":
        return _conjuncts(var2val, val.args[0])
    return [expr]


class _Site:
    """One attention call being analysed."""

    def __init__(self, func, call):
        self.func, self.call = func, call
        self.kind = ir.attr(func, ir.A_MASK_KIND, "none")
        self.invert = ir.attr(func, ir.A_MASK_INVERT, False)
        self.fill = ir.attr(func, ir.A_MASK_FILL)
        self.safe = ir.attr(func, ir.A_SAFE_SOFTMAX, False)
        self.layout = ir.attr(func, ir.A_LAYOUT, "BHND")
        q, k = call.args[0], call.args[1]
        qs, ks = shape_exprs(q), shape_exprs(k)
        self.symbolic = is_symbolic(q) or is_symbolic(k)
        self.nq_expr, self.nk_expr = qs[-2], ks[-2]  # PrimExprs (symbolic sites)
        self.nq, self.nk = (None, None) if self.symbolic else (int(qs[-2]), int(ks[-2]))
        self.mask = call.args[3] if len(call.args) > 3 else None
        self.empty = "zero" if self.safe else "nan"
        self.static_val = None  # evaluated mask (bool keep-mask or additive values)
        self.static_parts: list = []  # constant conjuncts of a dynamic bool mask
        self.from_where = False  # additive mask is where(C, 0, fill) built at run time
        self.eval_error = None  # why a constant mask could not be evaluated

    def _to4d(self, arr: np.ndarray) -> np.ndarray:
        """Broadcast a mask array to ``[b, h, Nq, Nk]`` (b, h possibly 1)."""
        a = np.asarray(arr)
        if self.layout == "BND" and a.ndim == 3:
            a = a[None]
        a = a.reshape((1,) * (4 - a.ndim) + a.shape)
        return np.broadcast_to(a, a.shape[:2] + (self.nq, self.nk))

    def result(self) -> dict:
        if self.kind == "none":
            return self._done(MaskSpec.full(), "none", "no mask")
        if self.static_val is not None:
            return self._static(self._to4d(self.static_val))
        note = f"{self.kind} mask depends on run-time data"
        if self.eval_error:
            note = f"{self.kind} mask kept dynamic: evaluating it failed ({self.eval_error})"
        spec = MaskSpec.dynamic()
        if self.static_parts and not self.invert and self._neg_inf_fill():
            keep = np.ones((1, 1, self.nq, self.nk), dtype=bool)
            for part in self.static_parts:
                keep = keep & self._to4d(part.astype(bool))
            if (keep == keep[:1, :1]).all():
                part_spec = classify_bool_mask(keep[0, 0])
                if part_spec.kind == "structured":
                    spec = part_spec
                    note += f"; its constant part is {part_spec.describe()} (block skipping)"
        mask_input = self.kind
        if self.kind == "bool" and not self._neg_inf_fill():
            mask_input = "additive"  # where(keep, 0, fill): rows may be fully masked
            note += f"; finite fill {self.fill} passed as an additive mask"
        out = self._done(spec, mask_input, note)
        if self.kind == "additive" and self.from_where and self._neg_inf_fill():
            out[ir.A_MASK_INPUT] = "bool"  # where(C, 0, -inf): pass C (exact, 4x smaller)
            out[ir.A_MASK_FROM_WHERE] = True
        return out

    def _neg_inf_fill(self) -> bool:
        return self.fill is not None and self.fill == -math.inf

    def _static(self, val: np.ndarray) -> dict:
        if self.kind == "bool":
            keep = (~val.astype(bool)) if self.invert else val.astype(bool)
            rows_empty = (~keep).all(-1).any()
            if self.fill != -math.inf and rows_empty:
                add = np.where(keep, 0.0, self.fill).astype(str(self.call.args[0].ty.dtype))
                return self._const(add, "additive", "finite fill with fully masked rows "
                                   "(uniform weights): kept additive")
            return self._bool(keep, f"bool mask (fill {self.fill})")
        val = val.astype(str(self.call.args[0].ty.dtype))
        zero, ninf = val == 0, np.isneginf(val)
        finite_neg = np.isfinite(val) & (val <= -1e30)
        if not (zero | ninf | finite_neg).all():
            return self._const(val, "additive", "additive mask with arbitrary values")
        keep = zero
        if finite_neg.any() and (~keep).all(-1).any():
            return self._const(val, "additive", "finfo.min mask with fully masked rows "
                               "(uniform weights): kept additive")
        what = "0/finfo.min, no fully masked row" if finite_neg.any() else "0/-inf"
        return self._bool(keep, f"additive {what} mask converted to bool (exact)")

    def _bool(self, keep: np.ndarray, note: str) -> dict:
        if keep.shape[0] > 1 and not (keep == keep[:1]).all():
            return self._const(keep, "bool", note + "; varies over the batch")
        spec = classify_bool_mask(keep[0])
        return self._done(spec, "bool" if spec.kind == "static" else "none", note)

    def _const(self, arr, mask_input, note) -> dict:
        out = self._done(MaskSpec.dynamic(), mask_input, note)
        out[ir.A_MASK_CONST] = ir.tensor_attr(np.ascontiguousarray(arr))
        return out

    def _done(self, spec: MaskSpec, mask_input: str, note: str) -> dict:
        out = {ir.A_MASK_SPEC: spec_to_attrs(spec), ir.A_MASK_INPUT: mask_input,
               ir.A_EMPTY_ROWS: self.empty, ir.A_MASK_NOTE: note}
        if spec.kind == "static":
            out[ir.A_STATIC_MASK] = ir.tensor_attr(spec.static_mask)
        return out


def _analyze_caller(mod, func, sites) -> list:
    var2val = relax.analysis.get_var2val(func)
    memo: dict = {}
    pending: list = []  # (site, expr, is_part)
    for s in sites:
        if s.mask is None:
            continue
        if not _depends_on_params(func, var2val, s.mask, memo):
            pending.append((s, s.mask, False))
            continue
        expr = s.mask
        if s.kind == "additive":  # where(C, 0, -inf) built at run time
            w = var2val.get(expr) if isinstance(expr, relax.Var) else None
            if ir.op_name(w) == "relax.where" and ir.scalar_value(w.args[1], var2val) == 0.0:
                fill = ir.scalar_value(w.args[2], var2val)
                if fill is not None:
                    s.fill, s.from_where = fill, True
                    expr = w.args[0]
        if s.kind == "additive" and not s.from_where:
            continue
        for part in _conjuncts(var2val, expr):
            if not _depends_on_params(func, var2val, part, memo):
                pending.append((s, part, True))
    if any(s.symbolic for s in sites):
        return _analyze_symbolic(func, sites, pending)
    try:
        values = _evaluate(func, [e for _, e, _ in pending]) if pending else []
    except Exception as e:  # noqa: BLE001 - an unbuildable mask graph stays dynamic
        values = [None] * len(pending)
        for s in sites:
            s.eval_error = f"{type(e).__name__}: {str(e)[:200]}"
    for (s, _, is_part), val in zip(pending, values):
        if val is None:
            continue
        if is_part:
            s.static_parts.append(val)
        else:
            s.static_val = val
    return [s.result() for s in sites]


def _analyze_symbolic(func, sites, pending) -> list:
    """Sites with a symbolic length: evaluate the constant masks at sample lengths and keep a
    structure only when every sample gives the same one (:mod:`._symbolic_mask_eval`)."""
    lengths = sample_lengths(func)
    try:
        per_len, values = (evaluate_at_samples(func, [e for _, e, _ in pending], lengths)
                           if pending else ([[]] * len(lengths), sample_values(func, lengths)))
    except Exception as e:  # noqa: BLE001 - an unbuildable mask graph stays dynamic
        per_len, values = None, None
        for s in sites:
            s.eval_error = f"{type(e).__name__}: {str(e)[:200]}"
    if per_len is None:
        return [_symbolic_fallback(s, s.result() if not s.symbolic else None) for s in sites]
    results: list = [[] for _ in sites]
    for arrays, vals in zip(per_len, values):
        for s in sites:
            s.static_val, s.static_parts = None, []
            if s.symbolic:
                s.nq, s.nk = substitute_dim(s.nq_expr, vals), substitute_dim(s.nk_expr, vals)
        for (s, _, is_part), val in zip(pending, arrays):
            if is_part:
                s.static_parts.append(val)
            else:
                s.static_val = val
        for i, s in enumerate(sites):
            results[i].append(s.result())
    out = []
    for s, res in zip(sites, results):
        if not s.symbolic:
            out.append(res[0])
            continue
        s.nq, s.nk = None, None
        first = res[0]
        same = all(_same(first, r) for r in res[1:])
        if same and ir.A_MASK_CONST not in first and ir.A_STATIC_MASK not in first:
            if s.kind != "none":
                first[ir.A_MASK_NOTE] += (f"; symbolic length: the same structure at the "
                                          f"sampled lengths {lengths}")
            out.append(first)
        else:
            why = ("its structure differs across the sampled lengths " + str(lengths)
                   if not same else "it has no structured form (static or constant tensor)")
            out.append(_symbolic_fallback(s, None, why))
    return out


def _symbolic_fallback(s, res, why: str | None = None) -> dict:
    """A symbolic-length site whose mask could not be summarised: a run-time mask tensor."""
    if res is not None:
        return res
    note = f"{s.kind} mask of a symbolic-length site kept as a run-time tensor"
    if why or s.eval_error:
        note += f" ({why or 'evaluating it failed: ' + s.eval_error})"
    mask_input = s.kind if not (s.kind == "bool" and not s._neg_inf_fill()) else "additive"
    return s._done(MaskSpec.dynamic(), mask_input, note)


@tvm.transform.module_pass(opt_level=0, name="AnalyzeAttentionMask")
class AnalyzeAttentionMask:
    """Annotate attention functions with their mask structure (module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mod.clone()  # functions are replaced below: never mutate the caller's module
        per_caller: dict = {}
        for caller, callee, call, var in ir.iter_sites(mod):
            per_caller.setdefault(caller, []).append((callee, call, var))
        results: dict = {}  # callee -> list of (var, attrs)
        for caller, items in per_caller.items():
            sites = [_Site(mod[c], call) for c, call, _ in items]
            for (callee, _, var), res in zip(items, _analyze_caller(mod, mod[caller], sites)):
                results.setdefault(callee, []).append((caller, var, res))
        retarget: dict = {}  # (caller, var) -> attrs of a clone
        for callee, entries in results.items():
            groups: list = []
            for caller, var, res in entries:
                for g in groups:
                    if _same(g[0], res):
                        g[1].append((caller, var))
                        break
                else:
                    groups.append((res, [(caller, var)]))
            base = mod[callee]
            mod[callee] = base.with_attrs(groups[0][0])
            for res, users in groups[1:]:
                for u in users:
                    retarget[u] = (base, res)
        return _retarget(mod, retarget) if retarget else mod


@mutator
class _Retarget(PyExprMutator):
    """Point calls whose analysis differs from their callee's at annotated clones."""

    def __init__(self, mod, retarget):
        super().__init__(mod)
        self.retarget, self.caller = retarget, None

    def visit_var_binding_(self, binding):
        hit = self.retarget.get((self.caller, binding.var))
        if hit is None:
            return super().visit_var_binding_(binding)
        base, res = hit
        clone = relax.utils.copy_with_new_vars(base).with_attrs(res)
        gv = self.builder_.add_func(clone, "attention")
        args = [self.visit_expr(a) for a in binding.value.args]
        new = self.builder_.normalize(relax.Call(gv, args))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, new))


def _retarget(mod, retarget):
    r = _Retarget(mod, retarget)
    for gv in {caller for caller, _ in retarget}:
        r.caller = gv
        r.builder_.update_func(gv, r.visit_expr(mod[gv]))
    return r.builder_.get()


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        x, y = ir.to_py(va), ir.to_py(b[k])
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                    and x.shape == y.shape and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True
