"""Tensor shapes whose dims may be symbolic (``torch.export`` dynamic dims), for the passes.

``shape_dims(expr)`` is ``_attention_ir.static_shape`` extended to symbolic shapes: static
dims stay Python ints (so static-shape code paths behave exactly as before), symbolic ones
become :class:`SymDim`, which compares by *proof* (``tvm.sym.Analyzer.can_prove_equal``)
instead of building a TIR ``EQ`` node, and supports the ``*``/``//`` the matchers use.
"""

from __future__ import annotations

import tvm
import tvm.sym
from tvm import relax

__all__ = ["SymDim", "is_symbolic", "shape_dims", "shape_exprs"]

_ANALYZER = tvm.sym.Analyzer()


class SymDim:
    """A symbolic dim (``tvm.tirx.PrimExpr``) with Python equality decided by proof."""

    __slots__ = ("expr",)

    def __init__(self, expr):
        self.expr = expr

    @staticmethod
    def wrap(expr):
        """An int for a constant dim, else a SymDim."""
        expr = _ANALYZER.simplify(expr)
        return int(expr.value) if isinstance(expr, tvm.tirx.IntImm) else SymDim(expr)

    def _other(self, other):
        if isinstance(other, SymDim):
            return other.expr
        if isinstance(other, int):
            return tvm.tirx.const(other, self.expr.dtype)
        return None

    def __eq__(self, other):
        o = self._other(other)
        return o is not None and bool(_ANALYZER.can_prove_equal(self.expr, o))

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(str(self.expr))

    def __mul__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else SymDim.wrap(self.expr * o)

    __rmul__ = __mul__

    def __floordiv__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else SymDim.wrap(tvm.tirx.floordiv(self.expr, o))

    def __mod__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else SymDim.wrap(tvm.tirx.floormod(self.expr, o))

    def __repr__(self):
        return str(self.expr)


def shape_exprs(expr) -> list | None:
    """The shape of a tensor expression as PrimExprs, or None (unknown shape or rank)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = getattr(ty.shape, "values", None)
    return None if values is None else list(values)


def shape_dims(expr) -> list | None:
    """The shape as ints (static dims) and :class:`SymDim` (symbolic dims), or None."""
    values = shape_exprs(expr)
    return None if values is None else [SymDim.wrap(v) for v in values]


def is_symbolic(expr) -> bool:
    """Whether a tensor expression has a known shape with at least one symbolic dim."""
    dims = shape_dims(expr)
    return dims is not None and any(isinstance(d, SymDim) for d in dims)
