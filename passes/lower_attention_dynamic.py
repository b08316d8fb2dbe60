"""Lowering of attention sites with a symbolic batch or sequence length (used by
``LowerAttentionToTIR``, which picks :class:`DynamicPlan` for such sites).

A site becomes two ``call_tir``\\ s: the run-time block layout
(:func:`attnforge.schedules.block_mask_runtime.runtime_block_mask_func`, from the shapes of Q
and K) and the fused kernel with symbolic lengths
(:func:`attnforge.schedules.attention_cpu_dynamic.fused_attention_cpu_dynamic`, or for CUDA
:func:`attnforge.schedules.attention_cuda_dynamic.fused_attention_cuda_dynamic`: built and
checked with ptxas and the CPU emulation only, never run on a GPU).  The mask must
be full or structured (what ``AnalyzeAttentionMask`` recognised, possibly ANDed with a
structured policy by ``InsertSparsity``), or a length dispatch (attr ``attnforge.dispatch``):
one kernel whose rule and layout switch on ``kv_len``.  A run-time mask tensor (a padding
``attention_mask``) is passed to the kernel with its symbolic dims named after the site's batch
/ lengths and applied on every visited block (llvm only).  Static layouts and compile-time mask
tensors are not supported with symbolic lengths yet: such sites stay fused but unlowered, with
the reason in the report.
"""

from __future__ import annotations

import tvm
import tvm.sym
from tvm import relax

from ..schedules.block_mask import MaskSpec
from . import _attention_ir as ir
from ._symbolic_shape import is_symbolic, shape_exprs
from .analyze_attention_mask import spec_from_attrs

__all__ = ["A_DISPATCH", "DynamicPlan", "dispatch_from_attrs", "is_symbolic_site"]

A_DISPATCH = "attnforge.dispatch"  # dict: {"threshold": int, "long": MaskSpec attrs, "policy"}


def is_symbolic_site(call) -> bool:
    """Whether an attention call has a symbolic dim in Q, K or V."""
    return any(is_symbolic(a) for a in call.args[:3])


def dispatch_from_attrs(func):
    """The site's ``DispatchMask`` (short = its own mask) or None."""
    from ..schedules.block_mask_runtime import DispatchMask

    d = ir.attr(func, A_DISPATCH)
    if d is None:
        return None
    long = d["long"]
    long_spec = MaskSpec(long["kind"], q_offset=long.get("q_offset", 0),
                         min_diff=long.get("min_diff"), max_diff=long.get("max_diff"),
                         chunk=long.get("chunk"))
    return DispatchMask(int(d["threshold"]), spec_from_attrs(func) or MaskSpec.full(), long_spec)


def _int_or_none(e):
    return int(e.value) if isinstance(e, tvm.tirx.IntImm) else None


class DynamicPlan:
    """Plan of one symbolic-length site (the ``_Plan`` interface ``LowerAttentionToTIR`` uses)."""

    dynamic = True

    def __init__(self, func, call, block_q, block_kv, var2val=None, compute_dtype=None):
        self.func, self.call = func, call
        self.cond = None  # C of a run-time where(C, 0, -inf) mask passed as bool
        if ir.attr(func, ir.A_MASK_FROM_WHERE, False) and var2val is not None:
            self.cond = var2val[call.args[3]].args[0]
        self.layout = ir.attr(func, ir.A_LAYOUT, "BHND")
        q4, k4, v4 = (shape_exprs(a) for a in call.args[:3])
        if self.layout == "BND":
            one = tvm.tirx.IntImm("int64", 1)
            q4, k4, v4 = [one] + q4, [one] + k4, [one] + v4
        self.q4, self.k4, self.v4 = q4, k4, v4
        self.io_dtype = str(call.args[0].ty.dtype)
        self.dtype = compute_dtype or self.io_dtype
        self.groups = ir.attr(func, ir.A_GROUPS, 1)
        self.scale = ir.attr(func, ir.A_SCALE)
        self.kind = ir.attr(func, ir.A_MASK_KIND, "none")
        spec = spec_from_attrs(func)
        self.spec = spec if spec is not None else (
            MaskSpec.full() if self.kind == "none" else MaskSpec.dynamic())
        self.dispatch = dispatch_from_attrs(func)
        self.mask_input = ir.attr(func, ir.A_MASK_INPUT, "none" if self.kind == "none"
                                  else self.kind)
        self.empty_rows = ir.attr(func, ir.A_EMPTY_ROWS,
                                  "zero" if ir.attr(func, ir.A_SAFE_SOFTMAX) else "nan")
        self.block = [block_q, block_kv]
        self.out_shape = shape_exprs(call)
        self.lowered_to = self.reason = self.block_mask = None
        self.gvs = None  # (kernel, layout) GlobalVars once built

    def mask(self):
        return self.dispatch if self.dispatch is not None else self.spec

    def kernel(self, lowerer) -> None:
        """Build (or reuse) the kernel and layout PrimFuncs; raises for unsupported sites."""
        cuda = lowerer.symbol == "fused_attention_cuda"
        if lowerer.symbol not in ("fused_attention_cpu", "fused_attention_cuda"):
            raise NotImplementedError(f"symbolic sequence length: no kernel {lowerer.symbol}")
        if cuda and self.mask_input != "none":
            raise NotImplementedError("symbolic sequence length on CUDA with a mask tensor "
                                      "(e.g. padding) is not supported yet; the llvm kernel has it")
        if self.mask_input != "none" and (ir.attr(self.func, ir.A_MASK_CONST) is not None
                                          or self.spec.kind == "static"):
            raise NotImplementedError("symbolic sequence length with a compile-time mask "
                                      "tensor or static layout is not supported")
        mshape = self._mask_names() if self.mask_input != "none" else None
        static = [_int_or_none(e) for e in (self.q4[1], self.k4[1], self.q4[3], self.v4[3])]
        if None in static:
            raise NotImplementedError("symbolic heads or head_dim are not supported")
        hq, hkv, d, dv = static
        from ..schedules.attention_cpu_dynamic import fused_attention_cpu_dynamic
        from ..schedules.attention_cuda_dynamic import fused_attention_cuda_dynamic

        kw = {"batch": _int_or_none(self.q4[0]), "q_heads": hq, "kv_heads": hkv,
              "q_len": _int_or_none(self.q4[2]), "kv_len": _int_or_none(self.k4[2]),
              "head_dim": d, "v_head_dim": dv, "dtype": self.dtype, "scale": self.scale,
              "block_q": self.block[0], "block_kv": self.block[1],
              "empty_rows": self.empty_rows,
              "mask_input": None if mshape is None else self.mask_input,
              "mask_input_shape": mshape}
        generate, name = fused_attention_cpu_dynamic, "fused_attention_cpu_dynamic"
        if cuda:
            generate, name = fused_attention_cuda_dynamic, "fused_attention_cuda_dynamic"
            del kw["mask_input"], kw["mask_input_shape"]
            kw.update(lowerer.extra)  # arch
        mask = self.mask()
        key = ("dynamic", repr(sorted(kw.items())), repr(mask))
        if key not in lowerer.kernels:
            kernel, layout = generate(mask=mask, **kw)
            gvs = []
            for prim, fname in ((kernel, name), (layout, "attnforge_block_mask")):
                gv = lowerer.builder_.add_func(prim, fname)
                lowerer.builder_.update_func(gv, prim.with_attr("global_symbol", gv.name_hint))
                gvs.append(gv)
            lowerer.kernels[key] = (tuple(gvs), None)
        self.gvs = lowerer.kernels[key][0]
        return self.gvs[0]

    def _mask_tensor_shape(self) -> list:
        base = self.cond if self.cond is not None else self.call.args[3]
        shape = shape_exprs(base)
        if self.layout == "BND" and len(shape) == 3:
            shape = [tvm.tirx.IntImm("int64", 1)] + shape
        return shape

    def _mask_names(self) -> tuple:
        """The mask's dims for the kernel: ints, or the names of the symbolic dims they equal."""
        shape = self._mask_tensor_shape()
        ana = tvm.sym.Analyzer()
        named = {0: [("batch", self.q4[0])], 2: [("q_len", self.q4[2]), ("kv_len", self.k4[2])],
                 3: [("kv_len", self.k4[2]), ("q_len", self.q4[2])], 1: []}
        out = []
        for pos, d in zip(range(4 - len(shape), 4), shape):
            if _int_or_none(d) is not None:
                out.append(_int_or_none(d))
                continue
            for name, e in named[pos]:
                if ana.can_prove_equal(d, e):
                    out.append(name)
                    break
            else:
                raise NotImplementedError(f"mask tensor dim {d} (axis {pos}) is not the batch or "
                                          "a sequence length of the site")
        return tuple(out)

    def _mask_operand(self, lowerer, args):
        bb = lowerer.builder_
        m = lowerer.visit_expr(self.cond) if self.cond is not None else args[3]
        if self.kind == "bool" and ir.attr(self.func, ir.A_MASK_INVERT, False):
            m = bb.emit(relax.op.logical_not(m))
        if self.kind == "bool" and self.mask_input == "additive":
            fill = ir.attr(self.func, ir.A_MASK_FILL)
            m = bb.emit(relax.op.where(m, relax.const(0.0, self.dtype),
                                       relax.const(fill, self.dtype)))
        if self.layout == "BND" and m.ty.ndim == 3:
            m = bb.emit(relax.op.reshape(m, self._mask_tensor_shape()))
        if self.mask_input == "additive" and str(m.ty.dtype) != self.dtype:
            m = bb.emit(relax.op.astype(m, self.dtype))
        return m

    def emit(self, lowerer, binding) -> None:
        """Replace the attention call bound to ``binding`` by layout + kernel calls."""
        bb = lowerer.builder_
        kernel_gv, layout_gv = self.gvs
        args = [lowerer.visit_expr(a) for a in self.call.args[:3]]
        if self.layout == "BND":
            args = [bb.emit(relax.op.reshape(a, s)) for a, s in
                    zip(args, (self.q4, self.k4, self.v4))]
        if self.dtype != self.io_dtype:
            args = [bb.emit(relax.op.astype(a, self.dtype)) for a in args]
        bq, bk = self.block
        nq, nk = self.q4[2], self.k4[2]
        nqb = tvm.tirx.floordiv(nq + (bq - 1), bq)
        nkb = tvm.tirx.floordiv(nk + (bk - 1), bk)
        lay_ty = [relax.TensorType([1, nqb], "int32"), relax.TensorType([1, nqb, nkb], "int32"),
                  relax.TensorType([1, nqb, nkb], "int32")]
        lay = bb.emit(relax.call_tir(layout_gv, relax.Tuple(args[:2]), out_ty=lay_ty))
        ins = args + [bb.emit(relax.TupleGetItem(lay, i)) for i in range(3)]
        if self.mask_input != "none":
            ins.append(self._mask_operand(lowerer, [lowerer.visit_expr(a) for a in
                                                    self.call.args]))
        b, hq = self.q4[0], self.q4[1]
        out_ty = relax.TensorType([b, hq, nq, self.v4[3]], self.dtype)
        out = relax.call_tir(kernel_gv, relax.Tuple(ins), out_ty=out_ty)
        if self.dtype != self.io_dtype:
            out = relax.op.astype(bb.emit(out), self.io_dtype)
        if self.layout == "BND":
            out = relax.op.reshape(bb.emit(out), self.out_shape)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(out)))

    def entry(self, site: int, caller: str, var: str) -> dict:
        def dim(e):
            v = _int_or_none(e)
            return str(e) if v is None else v

        b, hq, nq, d = (dim(e) for e in self.q4)
        out = {
            "site": site, "fused": True, "function": caller, "var": var,
            "lowered_to": self.lowered_to, "reason": self.reason,
            "mask": self.mask().describe(), "mask_kind": self.kind,
            "mask_input": self.mask_input, "empty_rows": self.empty_rows,
            "mask_note": ir.attr(self.func, ir.A_MASK_NOTE, "not analysed"),
            "scale": self.scale, "gqa_groups": self.groups, "layout": self.layout,
            "shape": {"batch": b, "q_heads": hq, "kv_heads": dim(self.k4[1]), "q_len": nq,
                      "kv_len": dim(self.k4[2]), "head_dim": d, "v_head_dim": dim(self.v4[3]),
                      "dtype": self.io_dtype},
            "compute_dtype": self.dtype, "block": self.block,
            "sparsity": ir.attr(self.func, "attnforge.sparsity"),
            "sparsity_changed": bool(ir.attr(self.func, "attnforge.sparsity_changed", False)),
            "visited_fraction": None,  # depends on the run-time length
            "symbolic_shape": True,
            "block_layout": "computed at run time (attnforge_block_mask before the kernel)",
        }
        if self.dispatch is not None:
            out["dispatch"] = {"threshold": self.dispatch.threshold, "on": "kv_len",
                               "short": self.dispatch.short.describe(),
                               "long": self.dispatch.long.describe(),
                               "policy": ir.attr(self.func, A_DISPATCH)["policy"]}
        return out
