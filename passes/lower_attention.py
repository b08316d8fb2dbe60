"""LowerAttentionToTIR: replace annotated attention calls by the fused TIR kernel.

What it does
    For an ``llvm`` target, every call to an ``attnforge.attention`` function becomes
    ``R.call_tir(fused_attention_cpu, (Q, K, V, kv_num_blocks, kv_indices, kv_is_full[, mask]))``
    with the kernel from :func:`attnforge.schedules.attention_cpu.fused_attention_cpu` (one
    PrimFunc per distinct configuration), the BlockMask arrays as Relax constants, batch-folded
    3-D tensors reshaped to ``[1, B*H, N, D]`` and the output reshaped back to the call's shape.
    The mask operand is what ``AnalyzeAttentionMask`` chose: nothing (structured/full), the
    static bool mask, a compile-time constant, or the run-time tensor (``logical_not`` for a
    ``masked_fill`` mask, ``where(keep, 0, fill)`` for a bool mask with a finite fill).
    For ``cuda`` the kernel is :func:`attnforge.schedules.attention_cuda.fused_attention_cuda`
    (tensor cores: fp16/bf16 only, block 128x64 by default).  ``compute_dtype`` casts Q/K/V
    to a lower precision around the kernel (output cast back): how ``precision="float16"``
    reaches attention.  A site the kernel rejects keeps the call to the fused-but-unlowered
    function, with the reason in the report.  Lowered attention functions are removed.

    One report entry per site (see :mod:`.attention_report`) is written to the module attr
    ``attnforge.attention_sites``, so the information survives lowering.

Preconditions: ``FuseAttention`` (and normally ``AnalyzeAttentionMask``; without it a masked
site is treated as ``dynamic``).  Place in the pipeline: last attention pass, before
``tvm.compile`` (legalisation and the default build handle the rest of the graph).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..schedules.block_mask import MaskSpec
from . import _attention_ir as ir
from ._attention_qk import check_attention_qk, select_qk_kernel
from .analyze_attention_mask import spec_from_attrs

__all__ = ["KERNEL_NAME", "KERNEL_NAMES", "LowerAttentionToTIR"]

KERNEL_NAMES = {"llvm": "attnforge.fused_attention_cpu", "cuda": "attnforge.fused_attention_cuda"}
KERNEL_NAME = KERNEL_NAMES["llvm"]


def _as_target(target) -> tvm.target.Target:
    if isinstance(target, str):
        target = {"kind": target.split()[0]}
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    return target


def _kernel_builder(target: tvm.target.Target):
    """``(generator, symbol, extra kwargs)`` of the fused kernel for ``target``, or None."""
    kind = str(target.kind.name)
    if kind == "llvm":
        from ..schedules.attention_cpu import fused_attention_cpu

        return fused_attention_cpu, "fused_attention_cpu", {}
    if kind == "cuda":
        from ..schedules.attention_cuda import fused_attention_cuda

        return fused_attention_cuda, "fused_attention_cuda", {
            "arch": str(target.attrs.get("arch", "sm_90"))}
    return None


class _Plan:
    """Everything needed to lower one site, and its report entry."""

    def __init__(self, func, call, block_q, block_kv, var2val=None, compute_dtype=None):
        self.func, self.call = func, call
        self.cond = None  # C of a run-time where(C, 0, -inf) mask passed as bool
        if ir.attr(func, ir.A_MASK_FROM_WHERE, False) and var2val is not None:
            self.cond = var2val[call.args[3]].args[0]
        q, k, v = call.args[:3]
        qs, ks, vs = (ir.static_shape(t) for t in (q, k, v))
        self.layout = ir.attr(func, ir.A_LAYOUT, "BHND")
        if self.layout == "BND":
            qs, ks, vs = [1] + qs, [1] + ks, [1] + vs
        self.q4, self.k4, self.v4 = qs, ks, vs
        self.io_dtype = str(q.ty.dtype)
        self.dtype = compute_dtype or self.io_dtype
        self.groups = ir.attr(func, ir.A_GROUPS, 1)
        self.scale = ir.attr(func, ir.A_SCALE)
        self.kind = ir.attr(func, ir.A_MASK_KIND, "none")
        spec = spec_from_attrs(func)
        self.analysed = spec is not None
        if spec is None:
            spec = MaskSpec.full() if self.kind == "none" else MaskSpec.dynamic()
        self.spec = spec
        self.mask_input = ir.attr(func, ir.A_MASK_INPUT, "none" if self.kind == "none"
                                  else self.kind)
        self.empty_rows = ir.attr(func, ir.A_EMPTY_ROWS,
                                  "zero" if ir.attr(func, ir.A_SAFE_SOFTMAX) else "nan")
        self.mask_const = ir.attr(func, ir.A_MASK_CONST)
        self.score_mod, self.score_consts = _score_mod(func)
        self.block = [block_q, block_kv]
        self.out_shape = ir.static_shape(call)
        self.mask_shape = self._mask_shape()
        self.lowered_to = None
        self.reason = None
        self.block_mask = None

    def _mask_shape(self):
        if self.mask_input == "none":
            return None
        if self.spec.kind == "static":
            return (1,) + tuple(self.spec.static_mask.shape)
        if self.mask_const is not None:
            shape = tuple(self.mask_const.shape)
        elif self.cond is not None:
            shape = tuple(ir.static_shape(self.cond))
        else:
            shape = tuple(ir.static_shape(self.call.args[3]))
        if self.layout == "BND" and len(shape) == 3:
            shape = (1,) + shape
        return shape

    def kernel_args(self) -> dict:
        b, hq, nq, d = self.q4
        return {"batch": b, "q_heads": hq, "kv_heads": self.k4[1], "q_len": nq,
                "kv_len": self.k4[2], "head_dim": d, "v_head_dim": self.v4[3],
                "dtype": self.dtype, "scale": self.scale, "mask": self.spec,
                "block_q": self.block[0], "block_kv": self.block[1],
                "mask_input": None if self.mask_input == "none" else self.mask_input,
                "mask_input_shape": self.mask_shape, "empty_rows": self.empty_rows,
                **({"score_mod": self.score_mod} if self.score_mod is not None else {})}

    def entry(self, site: int, caller: str, var: str) -> dict:
        b, hq, nq, d = self.q4
        bm = self.block_mask
        return {
            "site": site, "fused": True, "function": caller, "var": var,
            "lowered_to": self.lowered_to, "reason": self.reason,
            "mask": self.spec.describe(), "mask_kind": self.kind,
            "mask_input": self.mask_input, "empty_rows": self.empty_rows,
            "mask_note": ir.attr(self.func, ir.A_MASK_NOTE, "not analysed"),
            "scale": self.scale, "gqa_groups": self.groups, "layout": self.layout,
            "shape": {"batch": b, "q_heads": hq, "kv_heads": self.k4[1], "q_len": nq,
                      "kv_len": self.k4[2], "head_dim": d, "v_head_dim": self.v4[3],
                      "dtype": self.io_dtype},
            "compute_dtype": self.dtype,
            "block": self.block,
            "sparsity": ir.attr(self.func, "attnforge.sparsity"),
            "sparsity_changed": bool(ir.attr(self.func, "attnforge.sparsity_changed", False)),
            "visited_fraction": None if bm is None else round(bm.visited_fraction, 6),
            **_flex_entry(self.func),
        }


@mutator
class _Lowerer(PyExprMutator):
    def __init__(self, mod, plans, kernel_builder):
        super().__init__(mod)
        self.plans = plans  # bound var -> _Plan (only sites being lowered)
        self.kernels: dict = {}
        self.generate, self.symbol, self.extra = kernel_builder

    def _kernel(self, plan: _Plan) -> tvm.ir.GlobalVar:
        if getattr(plan, "dynamic", False):  # symbolic lengths: lower_attention_dynamic
            return plan.kernel(self)
        kw = {**plan.kernel_args(), **self.extra}
        # int8 Q K^T kernel when _attention_qk.select_qk_kernel chose it for this site
        generate, symbol = getattr(plan, "qk_kernel", None) or (self.generate, self.symbol)
        key = repr(sorted((k, repr(v)) for k, v in kw.items() if k != "mask")) + repr(
            ir.spec_key(plan.spec)) + symbol
        if key not in self.kernels:
            prim, bm = generate(**kw)
            gv = self.builder_.add_func(prim, symbol)
            # one symbol per kernel variant, or the build links duplicates
            self.builder_.update_func(gv, prim.with_attr("global_symbol", gv.name_hint))
            self.kernels[key] = (gv, bm)
        gv, plan.block_mask = self.kernels[key]
        return gv

    def visit_var_binding_(self, binding):
        plan = self.plans.get(binding.var)
        if plan is None:
            return super().visit_var_binding_(binding)
        if getattr(plan, "dynamic", False):
            return plan.emit(self, binding)
        gv = self._kernel(plan)
        bm = plan.block_mask
        args = [self.visit_expr(a) for a in plan.call.args]
        bb = self.builder_
        if plan.layout == "BND":
            args[:3] = [bb.emit(relax.op.reshape(a, s)) for a, s in
                        zip(args[:3], (plan.q4, plan.k4, plan.v4))]
        if plan.dtype != plan.io_dtype:
            args[:3] = [bb.emit(relax.op.astype(a, plan.dtype)) for a in args[:3]]
        full = bm.kv_is_full * 0 if getattr(plan, "zero_full", False) else bm.kv_is_full
        ins = args[:3] + [relax.const(np.ascontiguousarray(a, dtype="int32")) for a in
                          (bm.kv_num_blocks, bm.kv_indices, full)]
        mask = self._mask(plan, args)
        if mask is not None:
            ins.append(mask)
        ins += [relax.const(np.ascontiguousarray(c)) for c in plan.score_consts]
        b, hq, nq, _ = plan.q4
        out_ty = relax.TensorType([b, hq, nq, plan.v4[3]], plan.dtype)
        out = relax.call_tir(gv, relax.Tuple(ins), out_ty=out_ty)
        if plan.dtype != plan.io_dtype:
            out = relax.op.astype(bb.emit(out), plan.io_dtype)
        if list(plan.out_shape) != [b, hq, nq, plan.v4[3]]:
            out = relax.op.reshape(bb.emit(out), plan.out_shape)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(out)))

    def _mask(self, plan: _Plan, args):
        if plan.mask_input == "none":
            return None
        if hasattr(plan, "mask_operand"):  # lower_attention_static_runtime
            return plan.mask_operand(self, args)
        if plan.spec.kind == "static":
            m = plan.spec.static_mask
            return relax.const(np.ascontiguousarray(m.reshape((1,) + m.shape)))
        if plan.mask_const is not None:
            return self._mask_dtype(plan, relax.const(np.ascontiguousarray(plan.mask_const)))
        m = args[3]
        kind, invert = plan.kind, ir.attr(plan.func, ir.A_MASK_INVERT, False)
        if plan.cond is not None:
            m = self.visit_expr(plan.cond)  # where(C, 0, -inf) -> C
        if kind == "bool" and invert:
            m = self.builder_.emit(relax.op.logical_not(m))
        if kind == "bool" and plan.mask_input == "additive":
            fill = ir.attr(plan.func, ir.A_MASK_FILL)
            m = self.builder_.emit(relax.op.where(m, relax.const(0.0, plan.dtype),
                                                  relax.const(fill, plan.dtype)))
        if plan.layout == "BND" and len(plan.mask_shape) == 4 and m.ty.ndim == 3:
            m = self.builder_.emit(relax.op.reshape(m, plan.mask_shape))
        return self._mask_dtype(plan, m)

    def _mask_dtype(self, plan: _Plan, m):
        if plan.mask_input == "additive" and plan.dtype != plan.io_dtype:
            return self.builder_.emit(relax.op.astype(m, plan.dtype))
        return m


@tvm.transform.module_pass(opt_level=0, name="LowerAttentionToTIR")
class LowerAttentionToTIR:
    """Lower attention calls to the fused kernel of ``target`` (module docstring)."""

    def __init__(self, target, block_q: int | None = None, block_kv: int = 64,
                 compute_dtype: str | None = None, attention_qk: str = "float32"):
        self.target, self.block_kv, self.compute_dtype = target, block_kv, compute_dtype
        self.block_q = block_q
        self.attention_qk = attention_qk  # "int8": Q K^T on VNNI (passes/_attention_qk.py)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = _as_target(self.target)
        kind = str(target.kind.name)
        check_attention_qk(self.attention_qk, target)
        builder = _kernel_builder(target)
        # Tensor-core tiles want 128 query rows; the CPU kernel's register tile wants 64.
        block_q = self.block_q or (128 if kind == "cuda" else 64)
        sites = list(ir.iter_sites(mod))
        plans, entries = {}, []
        lowerer = None
        var2val = {c: relax.analysis.get_var2val(mod[c]) for c in {s[0] for s in sites}}
        for i, (caller, callee, call, var) in enumerate(sites):
            plan = make_plan(mod[callee], call, block_q, self.block_kv, var2val[caller],
                             self.compute_dtype)
            if builder is None:
                plan.reason = f"no fused attention kernel for target kind {kind!r} yet"
            else:
                lowerer = lowerer or _Lowerer(mod, plans, builder)
                try:
                    select_qk_kernel(lowerer, plan, self.attention_qk)
                    lowerer._kernel(plan)
                    plan.lowered_to = KERNEL_NAMES[kind]
                    plans[var] = plan
                except (ValueError, NotImplementedError) as e:
                    plan.reason = f"kernel rejected the site: {e}"
                except Exception as e:  # noqa: BLE001 - a kernel bug must not break the build
                    plan.reason = f"kernel build failed: {type(e).__name__}: {str(e)[:300]}"
            entries.append((plan, caller.name_hint, var.name))
        if plans:
            for caller in {c for c, _, _, v in sites if v in plans}:
                lowerer.builder_.update_func(caller, lowerer.visit_expr(mod[caller]))
            mod = _drop_unused_attention(lowerer.builder_.get())
        report = [{**p.entry(i, c, v), **getattr(p, "qk_entry", {})}
                  for i, (p, c, v) in enumerate(entries)]
        return mod.with_attr(ir.M_SITES, report) if report else mod


def make_plan(func, call, block_q, block_kv, var2val=None, compute_dtype=None):
    """``_Plan`` for a static-shape site, ``DynamicPlan`` for a symbolic-length one."""
    from .lower_attention_dynamic import DynamicPlan, is_symbolic_site
    from .lower_attention_static_runtime import A_RUNTIME_AND_STATIC, StaticAndRuntimePlan

    cls = DynamicPlan if is_symbolic_site(call) else _Plan
    if cls is _Plan and ir.attr(func, A_RUNTIME_AND_STATIC, False):
        cls = StaticAndRuntimePlan
    return cls(func, call, block_q, block_kv, var2val, compute_dtype)


def _score_mod(func) -> tuple:
    """A FlexAttention site's score mod (scalar PrimFunc, see
    ``schedules.attention_score_mod``) and its captured arrays; ``(None, [])`` elsewhere."""
    from ..schedules.attention_score_mod import score_mod_from_attr

    if func.attrs is None or "attnforge.score_mod" not in func.attrs:
        return None, []
    return (score_mod_from_attr(func.attrs["attnforge.score_mod"]),
            list(ir.attr(func, "attnforge.score_mod_consts", [])))


def _flex_entry(func) -> dict:
    """Report keys of a site imported from ``flex_attention`` (none for other sites)."""
    if ir.attr(func, "attnforge.source_op") is None:
        return {}
    return {"source_op": ir.attr(func, "attnforge.source_op"),
            "mask_mod": ir.attr(func, "attnforge.mask_mod"),
            "score_mod": ir.attr(func, "attnforge.score_mod_desc")}


def _drop_unused_attention(mod: tvm.IRModule) -> tvm.IRModule:
    used = {c.name_hint for _, c, _, _ in ir.iter_sites(mod)}
    for gv, func in list(mod.functions_items()):
        if ir.is_attention_func(func) and gv.name_hint not in used:
            del mod[gv]
    return mod
