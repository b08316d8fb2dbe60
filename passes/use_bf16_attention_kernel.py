"""UseBF16AttentionKernel: bf16 fused CPU attention kernels -> their ``vdpbf16ps`` version.

What it does
    ``LowerAttentionToTIR`` (llvm, ``compute_dtype="bfloat16"``) emits
    :func:`attnforge.schedules.attention_cpu.fused_attention_cpu` kernels that widen bf16 Q/K/V
    to fp32 inside. Each such PrimFunc that records its generator arguments
    (``attnforge.kernel_args``: static shapes, structured / full / tensor masks, no
    ``score_mod``) is regenerated with
    :func:`attnforge.schedules.attention_cpu_bf16.fused_attention_cpu_bf16` from the same
    arguments and put under the same GlobalVar: same signature, block sizes and block-layout
    constants, so the Relax call is untouched; ``Q Kᵀ`` and ``P V`` then run on ``vdpbf16ps``.
    Kernels the bf16 generator refuses (e.g. ``block_q`` not a multiple of 16) stay as they are.

Preconditions: after ``LowerAttentionToTIR``; an ``llvm`` target with AVX-512 BF16 (the caller
checks). Place: ``precision="bfloat16"`` on llvm, before scheduling / tuning (the replaced
kernel is no longer a MetaSchedule design space: its ``attnforge.kernel_args`` is dropped).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from ..schedules.attention_cpu_bf16 import PV_QK_ATTR, fused_attention_cpu_bf16
from ..schedules.attention_cpu_space import ARGS_KEY, decode_args

__all__ = ["UseBF16AttentionKernel", "count_bf16_attention"]


def count_bf16_attention(mod: tvm.IRModule) -> int:
    """How many PrimFuncs of ``mod`` are ``vdpbf16ps`` attention kernels (for reports)."""
    return sum(1 for _, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and PV_QK_ATTR in (f.attrs or {}))


@tvm.transform.module_pass(opt_level=0, name="attnforge.UseBF16AttentionKernel")
def UseBF16AttentionKernel(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 - TVM naming
    """Swap bf16 fused attention kernels for the ``vdpbf16ps`` ones (module docstring)."""
    out = mod
    for gv, func in mod.functions_items():
        args = func.attrs.get(ARGS_KEY) if isinstance(func, tirx.PrimFunc) and func.attrs else None
        if args is None:
            continue
        kw = decode_args(str(args))
        if kw.get("dtype") != "bfloat16":
            continue
        try:
            new, _ = fused_attention_cpu_bf16(**kw, global_symbol=gv.name_hint)
        except (ValueError, NotImplementedError):
            continue
        attrs = {k: v for k, v in func.attrs.items() if k != ARGS_KEY}
        new = new.with_attr({**attrs, PV_QK_ATTR: new.attrs[PV_QK_ATTR]})
        if out is mod:
            out = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(mod.functions)
        out[gv] = new
    return out
