"""Default CUDA schedules for every PrimFunc that is not one of our own kernels.

``cuda_build_pipeline(target)`` is TVM's CUDA legalization (``LegalizeOps`` ... ``FuseTIR``)
followed by dlight's ``ApplyDefaultSchedule`` with, in priority order:

1. ``MatmulTensorCoreBF16`` / ``MatmulTensorCoreInt8`` -- bf16 and int8 matmuls on WMMA tensor
   cores (``matmul_bf16_cuda``, ``matmul_int8_cuda``; dlight has no bf16 rule and its int8
   rule fails to build in TVM 0.27);
2. dlight ``gpu.Matmul`` (fp16 / int8 on tensor cores, otherwise tiled FMA), ``gpu.GEMV``,
   ``gpu.Reduction``, ``gpu.GeneralReduction`` and ``gpu.Fallback``: TVM's own defaults.

Rules are wrapped as on the CPU (``cpu_schedule._Guarded``): our fused kernels and scheduled
funcs are skipped, a rule that raises declines, and ``stats`` counts the funcs each rule took.
``tvm.compile(mod, target)`` afterwards does the rest; it skips already scheduled funcs, so
any func no rule took is reported by its name when the build refuses it.
"""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .cpu_schedule import guarded_schedule_pass
from .matmul_bf16_cuda import MatmulTensorCoreBF16
from .matmul_int8_cuda import MatmulTensorCoreInt8

__all__ = ["cuda_build_pipeline", "cuda_legalize_passes", "cuda_rules", "cuda_schedule_pass"]


def cuda_rules() -> list[dl.ScheduleRule]:
    """The CUDA schedule rules in priority order (unguarded)."""
    return [MatmulTensorCoreBF16(), MatmulTensorCoreInt8(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def cuda_schedule_pass(target: Target, stats: Counter | None = None) -> tvm.transform.Pass:
    """``ApplyDefaultSchedule`` with :func:`cuda_rules`, run under ``target``; ``stats`` as in
    ``cpu_schedule_pass`` (counts per rule, ``"skipped"``, ``"left alone"``)."""
    return guarded_schedule_pass(cuda_rules(), target, stats, "attnforge.CUDASchedule")


def cuda_build_pipeline(target: Target, stats: Counter | None = None) -> tvm.transform.Sequential:
    """Relax -> scheduled TIR for CUDA; follow with ``tvm.compile(mod, target)``."""
    return tvm.transform.Sequential(
        [*cuda_legalize_passes(), cuda_schedule_pass(target, stats)],
        name="attnforge.cuda_build_pipeline",
    )


def cuda_legalize_passes() -> list:
    """TVM's CUDA legalization: Relax ops -> fused TIR PrimFuncs (before scheduling)."""
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
