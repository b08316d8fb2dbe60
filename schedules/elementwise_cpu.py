"""Fallback CPU (llvm) schedule rule: parallel outer loops, vectorised inner loops.

What it matches: any PrimFunc whose blocks dlight can normalise (``normalize_prim_func``:
every block iterator is spatial or reduction, one loop per iterator) -- elementwise and
broadcast ops, transposes / reshape copies, ``take`` (embedding), and reductions that no
earlier rule took (sum / max / mean, masks). Funcs with opaque iterators, no blocks, or
blocks that cannot be normalised return ``None``.

Algorithm:

1. Inline every spatial block that can be inlined (dlight's ``try_inline_contiguous_spatial``):
   chains of reshape / transpose / cast / elementwise ops become one loop nest, intermediate
   buffers disappear.
2. For each remaining root block, with ``S`` the leading spatial loops:

   * injective block: split the innermost loop by the widest of 16/8/4 lanes that divides it
     and vectorise that part; fuse all the other loops into one ``parallel`` loop;
   * reduction block: fuse the leading spatial loops into one ``parallel`` loop; the
     reduction loops stay serial and in place (no ``rfactor``; correctness first).

   Loops are parallelised only when the block does at least ``min_parallel`` iterations, so
   tiny ops do not pay for a thread-pool launch.

``fast_math_legalize_map()`` is a ``LegalizeOps`` override for fp32 ``exp``, ``erf``, ``tanh``,
``sigmoid``, ``silu``, ``gelu``, ``gelu_tanh`` and ``softmax``: TVM's polynomial ``fast_*``
forms (max rel. error ~4e-7) instead of libm calls, which LLVM cannot vectorise (erf: 30 ns
per element here, fast_erf 0.3 ns).
"""

from __future__ import annotations

import math

from tvm import ir, s_tir, te, tirx, topi
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline_contiguous_spatial
from tvm.target import Target

__all__ = ["ElementwiseCPU", "fast_math_legalize_map"]


class ElementwiseCPU(ScheduleRule):
    """Parallel + vectorise schedule for injective and leftover reduction PrimFuncs.

    Parameters
    ----------
    lanes : vector widths to try for the innermost loop, widest first.
    min_parallel : iteration count below which a block stays single-threaded.
    """

    def __init__(self, lanes: tuple[int, ...] = (16, 8, 4), min_parallel: int = 16384):
        self.lanes, self.min_parallel = lanes, min_parallel

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or any("O" in info.dom_kind() for info in infos):
            return None
        if any(not isinstance(it.dom, (int, tirx.IntImm)) for info in infos for it in info.iters):
            return None  # symbolic extents: not handled yet
        infos = try_inline_contiguous_spatial(sch, infos)
        if not infos:
            return None
        for info in infos:
            try:
                self._schedule_block(sch, info)
            except Exception:  # noqa: BLE001, S112 - a primitive refused: keep the block as is
                continue
        return sch

    def _schedule_block(self, sch: s_tir.Schedule, info) -> None:
        kinds = info.dom_kind()
        loops = sch.get_loops(info.block_rv)
        if len(loops) != len(kinds) or not kinds:
            return  # not a root-level block with one loop per iterator
        extents = [int(it.dom) for it in info.iters]
        work = math.prod(extents)
        n_lead = len(kinds) - len(kinds.lstrip("S"))
        if info.is_injective():
            outer = list(loops[:-1])
            lanes = next((v for v in self.lanes if extents[-1] % v == 0), None)
            if lanes is not None:
                rest, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)
                outer.append(rest)
            else:
                outer.append(loops[-1])
            if work >= self.min_parallel and outer:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        elif n_lead and work >= self.min_parallel and math.prod(extents[:n_lead]) > 1:
            lead = loops[:n_lead]
            sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])


def _fast_sigmoid(x: te.Tensor) -> te.Tensor:
    return topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x))))


def _fast_gelu(x: te.Tensor) -> te.Tensor:
    erf = topi.fast_erf(topi.multiply(x, 0.5**0.5))
    return topi.multiply(x, topi.add(0.5, topi.multiply(erf, 0.5)))


def _fast_gelu_tanh(x: te.Tensor) -> te.Tensor:
    inner = topi.multiply(x, topi.add(1.0, topi.multiply(0.044715, topi.multiply(x, x))))
    tanh = topi.fast_tanh(topi.multiply((2.0 / math.pi) ** 0.5, inner))
    return topi.multiply(topi.multiply(0.5, x), topi.add(1.0, tanh))


_FAST = {
    "relax.exp": (topi.fast_exp, "fast_exp"),
    "relax.erf": (topi.fast_erf, "fast_erf"),
    "relax.tanh": (topi.fast_tanh, "fast_tanh"),
    "relax.sigmoid": (_fast_sigmoid, "fast_sigmoid"),
    "relax.nn.silu": (lambda x: topi.multiply(x, _fast_sigmoid(x)), "fast_silu"),
    "relax.nn.gelu": (_fast_gelu, "fast_gelu"),
    "relax.nn.gelu_tanh": (_fast_gelu_tanh, "fast_gelu_tanh"),
    "relax.nn.softmax": (None, "fast_softmax"),
}


def fast_math_legalize_map() -> dict:
    """``LegalizeOps(customize_legalize_map=...)`` entries: fp32 transcendental ops as
    vectorisable polynomials; other dtypes fall back to TVM's own legalisation."""

    def make(op_name: str):
        te_fn, hint = _FAST[op_name]
        default = ir.Op.get(op_name).get_attr("FLegalize")

        def legalize(bb, call):
            if str(getattr(call.args[0].ty, "dtype", "")) != "float32":
                return default(bb, call)
            if op_name == "relax.nn.softmax":
                return bb.call_te(
                    topi.nn.fast_softmax, call.args[0], call.attrs.axis, primfunc_name_hint=hint
                )
            return bb.call_te(te_fn, call.args[0], primfunc_name_hint=hint)

        return legalize

    return {name: make(name) for name in _FAST}
