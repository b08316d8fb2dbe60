"""int8 tensor-core matmuls on CUDA: dlight's WMMA schedule with s8 x s8 -> s32 intrinsics.

dlight's ``gpu.Matmul`` sends int8 x int8 -> int32 matmuls to its ``MatmulInt8Tensorization``,
whose schedule does not build in TVM 0.27 (``InjectSoftwarePipeline``: "Check failed:
(it != fragment_info_.end())" for every shape we tried). dlight's fp16 schedule
(``MatmulTensorization``) is dtype-agnostic apart from the intrinsic names, and TVM registers
the int8 WMMA intrinsics (``wmma_load_16x16x16_s8_*``, ``wmma_sync_16x16x16_s8s8s32_trans``);
``MatmulTensorCoreInt8`` runs that schedule with the int8 intrinsic group (as
``matmul_bf16_cuda`` does for bf16). PTX: ``wmma.mma.sync.aligned.row.col.m16n16k16.s32.s8.s8.s32``;
SASS (sm_80 / sm_90): ``IMMA.16816.S8.S8``. It takes matmuls with int8 inputs and int32
accumulation on sm_75+ whose static M/N/K all exceed 64 (dlight's threshold); others decline.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .wmma_cuda import apply_dlight_wmma, cuda_sm, is_wmma_matmul

__all__ = ["MatmulTensorCoreInt8", "is_int8_matmul"]


def _int8_names(original, load_scope, store_scope, in_dtype, out_dtype, trans_b) -> dict:
    """TVM's registered s8 x s8 -> s32 WMMA intrinsic group, whatever dlight asks for."""
    return original(load_scope, store_scope, "int8", "int32", trans_b)


def is_int8_matmul(func: tirx.PrimFunc) -> bool:
    """True for a matmul-like PrimFunc reading int8, accumulating in int32, M/N/K > 64."""
    return is_wmma_matmul(func, "int8", "int32")


class MatmulTensorCoreInt8(dl.ScheduleRule):
    """s8 x s8 -> s32 matmuls on WMMA tensor cores (sm_75+); see the module docstring."""

    def apply(self, func, target: Target, tunable: bool):  # noqa: D102 - dlight hook
        sm = cuda_sm(target)
        if not isinstance(func, tirx.PrimFunc) or sm is None or sm < 75:
            return None
        if not is_int8_matmul(func):
            return None
        return apply_dlight_wmma(func, target, tunable, _int8_names)
