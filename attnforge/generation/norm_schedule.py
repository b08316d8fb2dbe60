"""Schedule rule for the row reductions of generation programs (RMSNorm / LayerNorm: ``mean``
or ``sum`` over the hidden size, then elementwise ops), run before the shared CPU rules.

Why: in the shared CPU rule list dlight's ``cpu.Reduction`` takes these funcs first and parallelises
over the *output elements* with the reduction computed under that loop, so a decode-step RMSNorm
over 512 values redid its 512-term sum 512 times (~0.5 ms per call, 9 calls per step: a third of
the non-LM-head time).  Here the func goes to our ``ElementwiseCPU`` rule instead: the reduction
runs once per row (rows in parallel when there are enough of them), the elementwise tail is
vectorised.  Only funcs whose every reduction block reads a single buffer are taken (sum / mean
/ max: never a matmul, which reads two); anything else returns ``None``.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from ..schedules.elementwise_cpu import ElementwiseCPU

__all__ = ["RowReductionCPU"]


class RowReductionCPU(ScheduleRule):
    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            stmts = [sch.get(b) for b in sch.get_child_blocks(get_root_block(sch))]
        except Exception:  # noqa: BLE001 - no single root block: not ours
            return None
        reductions = [s for s in stmts
                      if any(iv.iter_type == tirx.IterVar.CommReduce for iv in s.iter_vars)]
        if not reductions or any(len({r.source.name for r in s.reads}) != 1 for s in reductions):
            return None
        return ElementwiseCPU().apply(func, target, tunable)
