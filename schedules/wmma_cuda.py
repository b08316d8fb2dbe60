"""Shared machinery of our WMMA matmul rules (``matmul_bf16_cuda``, ``matmul_int8_cuda``).

dlight's tensor-core schedule (``gpu.matmul.MatmulTensorization``) is dtype-agnostic apart from
the intrinsic names it asks ``tvm.s_tir.tensor_intrin.cuda.get_wmma_intrin_group`` for, and it
asks for fp16 ones.  ``apply_dlight_wmma`` runs that schedule with the group function switched
to ours for the duration of the call (under a lock, restored afterwards), so the bf16 and int8
rules reuse dlight's tested tiling instead of a second WMMA schedule.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks
from tvm.target import Target

__all__ = ["apply_dlight_wmma", "cuda_sm", "is_wmma_matmul"]

MIN_TENSORIZE_EXTENT = 64  # dlight's minimal_tensorize_threshold
_LOCK = threading.Lock()


def cuda_sm(target: Target) -> int | None:
    """``80`` for a CUDA target with ``arch="sm_80"`` (``sm_90a`` -> 90); None otherwise."""
    if target.kind.name != "cuda":
        return None
    arch = str(target.attrs.get("arch", ""))
    digits = arch[3:].rstrip("af")
    return int(digits) if arch.startswith("sm_") and digits.isdigit() else None


def is_wmma_matmul(func: tirx.PrimFunc, in_dtype: str, acc_dtype: str) -> bool:
    """True for a single-reduction matmul PrimFunc reading ``in_dtype`` and accumulating in
    ``acc_dtype`` whose static M, N and K (after dlight's normalisation) all exceed 64."""
    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if not blocks or len(blocks) != 1:
        return False
    main = blocks[0]
    stmt = sch.get(main)
    if ({str(r.source.dtype) for r in stmt.reads} != {in_dtype}
            or str(stmt.writes[0].source.dtype) != acc_dtype or get_index_map(stmt) is None):
        return False
    # Normalise to C[S, I, J] += A[S, I, K] * B[S, J, K] as dlight does, then check I, J, K.
    for operand in (("read", 0), ("read", 1), ("write", 0)):
        sch.reindex(main, operand)
    sch.transform_block_layout(main, get_index_map(sch.get(main))[0])
    return all(not (isinstance(iv.dom.extent, tirx.IntImm)
                    and iv.dom.extent.value <= MIN_TENSORIZE_EXTENT)
               for iv in sch.get(main).iter_vars[1:])


@contextlib.contextmanager
def _intrin_group(rename: Callable[[dict, str], dict]):
    from tvm.s_tir.tensor_intrin import cuda as intrin_mod

    original = intrin_mod.get_wmma_intrin_group

    def group(load_scope, store_scope, in_dtype, out_dtype, trans_b):
        return rename(original, load_scope, store_scope, in_dtype, out_dtype, trans_b)

    with _LOCK:
        intrin_mod.get_wmma_intrin_group = group
        try:
            yield
        finally:
            intrin_mod.get_wmma_intrin_group = original


def apply_dlight_wmma(func: tirx.PrimFunc, target: Target, tunable: bool, rename):
    """dlight's ``MatmulTensorization`` on ``func`` with ``rename(original_group_fn, *args)``
    answering its intrinsic-group requests; the schedule, or None when it declines."""
    from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization

    with _intrin_group(rename):
        return MatmulTensorization().apply(func, target, tunable)
