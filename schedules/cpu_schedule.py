"""Default CPU (llvm) schedules for every PrimFunc that is not one of our own kernels.

``cpu_build_pipeline(target)`` legalises and fuses a Relax module and then runs
``cpu_schedule_pass(target)``: dlight's ``ApplyDefaultSchedule`` with, in priority order,

1. ``MatmulCPU`` -- matmul / batch-matmul with fused prologue and epilogue (``matmul_cpu``);
2. dlight ``cpu.GEMV`` -- matrix-vector products with an inner reduction;
3. dlight ``cpu.Reduction`` -- softmax / layer norm / RMS norm style reductions;
4. ``ElementwiseCPU`` -- everything else: parallel outer, vectorised inner loops.

Each rule is wrapped so that it never sees a PrimFunc it must not touch -- one with an attr
whose key starts with ``attnforge`` (our fused kernels), one already scheduled
(``tirx.is_scheduled``, or a loop that is already parallel / vectorised / thread-bound) --
and so that a rule that raises counts as "not applicable" instead of failing the build.
``tvm.compile(mod, target)`` afterwards does the remaining lowering.
"""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .elementwise_cpu import ElementwiseCPU, fast_math_legalize_map
from .matmul_cpu import MatmulCPU

__all__ = ["cpu_build_pipeline", "cpu_rules", "cpu_schedule_pass", "guarded_schedule_pass",
           "is_schedulable"]


_SCHEDULED_LOOP_MARKS = ("T.parallel(", "T.vectorized(", "T.thread_binding(")


def _has_scheduled_loop(func: tirx.PrimFunc) -> bool:
    # No TIR stmt visitor is exposed to Python in this TVM; the printed script is exact enough.
    text = func.script()
    return any(mark in text for mark in _SCHEDULED_LOOP_MARKS)


def is_schedulable(func) -> bool:
    """True for a PrimFunc our rules may schedule (not ours, not already scheduled)."""
    if not isinstance(func, tirx.PrimFunc):
        return False
    attrs = func.attrs or {}
    if any(str(key).startswith("attnforge") for key in attrs.keys()):  # noqa: SIM118
        return False
    if int(attrs.get("tirx.is_scheduled", 0)) == 1:
        return False
    return not _has_scheduled_loop(func)


class _Guarded(dl.ScheduleRule):
    """Run ``rule`` only on schedulable funcs; exceptions mean "not applicable"; count hits."""

    def __init__(self, rule: dl.ScheduleRule, stats: Counter | None):
        self.rule, self.stats = rule, stats
        self.name = type(rule).__name__

    def apply(self, func, target, tunable):
        if not is_schedulable(func):
            return None
        try:
            result = self.rule.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - a rule that cannot handle the func declines it
            result = None
        if result is not None and self.stats is not None:
            self.stats[self.name] += 1
        return result


def cpu_rules() -> list[dl.ScheduleRule]:
    """The CPU schedule rules in priority order (unguarded)."""
    return [MatmulCPU(), dl.cpu.GEMV(), dl.cpu.Reduction(), ElementwiseCPU()]


def cpu_schedule_pass(target: Target, stats: Counter | None = None) -> tvm.transform.Pass:
    """``ApplyDefaultSchedule`` with our CPU rules, run under ``target``.

    If ``stats`` (a ``Counter``) is given, it receives one count per PrimFunc scheduled, keyed
    by rule class name, and under ``"left alone"`` the funcs that no rule took (skipped funcs
    -- ours, already scheduled -- are counted as ``"skipped"``).
    """
    return guarded_schedule_pass(cpu_rules(), target, stats, "attnforge.CPUSchedule")


def guarded_schedule_pass(rules: list, target: Target, stats: Counter | None,
                          name: str) -> tvm.transform.Pass:
    """dlight's ``ApplyDefaultSchedule`` over ``rules`` (each wrapped in ``_Guarded``) under
    ``target``, counting per rule, ``"skipped"`` and ``"left alone"`` funcs into ``stats``."""
    target = Target(target) if not isinstance(target, Target) else target
    guarded = [_Guarded(rule, stats) for rule in rules]

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        before = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        with target:
            out = dl.ApplyDefaultSchedule(*guarded)(mod)
        if stats is not None:
            for gv, func in before.items():
                if not is_schedulable(func):
                    stats["skipped"] += 1
                elif out[gv].same_as(func):
                    stats["left alone"] += 1
        return out

    return _pass


def cpu_legalize_passes(fast_math: bool = True) -> list:
    """Phases 1-2 of :func:`cpu_build_pipeline` (shared with tuning, so workload hashes match).

    ``fast_math`` legalises fp32 exp / erf / tanh / sigmoid / silu / gelu / softmax to TVM's
    polynomial forms (rel. error < 1e-6, vectorised) instead of scalar libm calls.
    """
    legalize_map = fast_math_legalize_map() if fast_math else None
    return [
        # Phase 1: lower Relax ops to TIR PrimFuncs (fast fp32 transcendental ops).
        relax.transform.LegalizeOps(customize_legalize_map=legalize_map),
        relax.transform.AnnotateTIROpPattern(),
        # Phase 2: fold constant weight transposes, fuse prologues / epilogues.
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def cpu_build_pipeline(
    target: Target, stats: Counter | None = None, fast_math: bool = True
) -> tvm.transform.Sequential:
    """Relax -> scheduled TIR for llvm; follow with ``tvm.compile(mod, target)``."""
    return tvm.transform.Sequential(
        [
            *cpu_legalize_passes(fast_math),
            # Phase 3: schedule every PrimFunc that is not ours.
            cpu_schedule_pass(target, stats),
        ],
        name="attnforge.cpu_build_pipeline",
    )
