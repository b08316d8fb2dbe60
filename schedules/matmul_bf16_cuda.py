"""bf16 tensor-core matmuls on CUDA: dlight's WMMA schedule with bfloat16 intrinsics.

dlight's ``gpu.Matmul`` tensorizes only float16 (and int8) inputs: a bf16 x bf16 -> fp32
matmul falls back to its FMA schedule.  TVM ships the generators of the WMMA intrinsics
(``get_wmma_load_intrin`` / ``get_wmma_sync_intrin`` take the dtype) but registers fp16 and
int8 ones only, and its CUDA codegen already maps bfloat16 fragments to ``nv_bfloat16``
(``wmma.mma.sync...m16n16k16.f32.bf16.bf16.f32`` in the PTX, HMMA in the SASS).

``MatmulTensorCoreBF16`` registers the bf16 load/compute intrinsics once and runs dlight's own
``MatmulTensorization`` schedule with the intrinsic names switched from f16 to bf16 for the
duration of that call (the schedule is dtype-agnostic apart from those names), so we keep
dlight's tested tiling instead of writing a second WMMA schedule.  It takes matmuls with
bf16 inputs and fp32 accumulation on sm_80+ whose static M/N/K all exceed 64 (dlight's own
threshold for tensor cores); everything else is left to the next rule.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .wmma_cuda import apply_dlight_wmma, cuda_sm, is_wmma_matmul

__all__ = ["MatmulTensorCoreBF16", "is_bf16_matmul"]

_REGISTERED = False


def _register_intrinsics() -> None:
    """Register the bf16 WMMA load (A, transposed B) and mma intrinsics dlight's schedule uses."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_load_intrin, get_wmma_sync_intrin

    for scope in ("shared", "shared.dyn"):
        tag = scope.replace(".", "_")
        TensorIntrin.register(f"wmma_load_16x16x16_bf16_a_{tag}",
                              *get_wmma_load_intrin(16, 16, 16, "bfloat16", scope, False, False),
                              override=True)
        TensorIntrin.register(f"wmma_load_16x16x16_bf16_b_trans_{tag}",
                              *get_wmma_load_intrin(16, 16, 16, "bfloat16", scope, True, True),
                              override=True)
    TensorIntrin.register("wmma_sync_16x16x16_bf16bf16f32_trans",
                          *get_wmma_sync_intrin(16, 16, 16, "bfloat16", "float32", True),
                          override=True)
    _REGISTERED = True


def _bf16_names(original, load_scope, store_scope, in_dtype, out_dtype, trans_b) -> dict:
    """dlight's fp16 intrinsic group with the input-side names switched to our bf16 ones."""
    group = original(load_scope, store_scope, in_dtype, out_dtype, trans_b)
    if in_dtype != "float16":
        return group
    return {key: name.replace("_f16_a", "_bf16_a").replace("_f16_b", "_bf16_b")
            .replace("f16f16", "bf16bf16") for key, name in group.items()}


def is_bf16_matmul(func: tirx.PrimFunc) -> bool:
    """True for a matmul-like PrimFunc reading bf16 and accumulating in fp32, M/N/K > 64."""
    return is_wmma_matmul(func, "bfloat16", "float32")


class MatmulTensorCoreBF16(dl.ScheduleRule):
    """bf16 x bf16 -> fp32 matmuls on WMMA tensor cores (sm_80+); see the module docstring."""

    def apply(self, func, target: Target, tunable: bool):  # noqa: D102 - dlight hook
        sm = cuda_sm(target)
        if not isinstance(func, tirx.PrimFunc) or sm is None or sm < 80:
            return None
        if not is_bf16_matmul(func):
            return None
        _register_intrinsics()
        return apply_dlight_wmma(func, target, tunable, _bf16_names)
