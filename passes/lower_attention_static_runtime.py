"""Lowering of a static block layout combined with a run-time mask tensor (used by
``LowerAttentionToTIR`` for sites ``InsertSparsity`` marked with ``attnforge.runtime_and_static``).

Example: ``sparsity=BigBird(...)`` on a model called with a padding ``attention_mask``.  The
kernel iterates the policy's static layout (blocks the layout empties are skipped), and its
mask tensor is ``runtime_mask & layout_mask`` built in Relax before the call, shape the
broadcast of both (e.g. ``[B, 1, Nq, Nk]``).  Every visited block is flagged partial
(``kv_is_full = 0``) so that the kernel applies the tensor on all of them: the run-time mask
can mask any element of a block the layout calls full.  Only boolean run-time masks (or
``where(C, 0, -inf)``) qualify; additive masks with finite values are refused by the pass.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from . import _attention_ir as ir
from .lower_attention import _Plan

__all__ = ["A_RUNTIME_AND_STATIC", "StaticAndRuntimePlan"]

A_RUNTIME_AND_STATIC = "attnforge.runtime_and_static"  # bool, set by InsertSparsity


class StaticAndRuntimePlan(_Plan):
    """``_Plan`` whose mask operand is the run-time tensor ANDed with the static layout."""

    zero_full = True  # LowerAttentionToTIR passes kv_is_full = 0 (tensor on every block)

    def _mask_shape(self):
        base = self.cond if self.cond is not None else self.call.args[3]
        shape = tuple(ir.static_shape(base))
        if self.layout == "BND" and len(shape) == 3:
            shape = (1,) + shape
        layout = (1,) + tuple(self.spec.static_mask.shape)
        return tuple(np.broadcast_shapes(shape, layout))

    def mask_operand(self, lowerer, args):
        """``runtime & layout`` as the kernel's bool mask tensor."""
        bb = lowerer.builder_
        m = lowerer.visit_expr(self.cond) if self.cond is not None else args[3]
        if self.kind == "bool" and ir.attr(self.func, ir.A_MASK_INVERT, False):
            m = bb.emit(relax.op.logical_not(m))
        if self.layout == "BND" and m.ty.ndim == 3:
            m = bb.emit(relax.op.reshape(m, (1,) + tuple(ir.static_shape(m))))
        keep = self.spec.static_mask
        layout = relax.const(np.ascontiguousarray(keep.reshape((1,) + keep.shape)))
        both = bb.emit(relax.op.logical_and(m, layout))
        if tuple(ir.static_shape(both)) != tuple(self.mask_shape):
            both = bb.emit(relax.op.broadcast_to(both, self.mask_shape))
        return both
