"""The attention pass pipeline: recognise, analyse, lower.

``attention_pipeline(target)`` runs right after import (``frontends``) and before TVM's own
legalisation/build; the module it returns is accepted by ``tvm.compile(mod, target)``.  Read
``attnforge.passes.attention_report(mod)`` on its result for what happened to each site.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .analyze_attention_mask import AnalyzeAttentionMask
from .bfloat16_matmuls import BFloat16Matmuls
from .fuse_attention import FuseAttention
from .insert_sparsity import InsertSparsity
from .lower_attention import LowerAttentionToTIR

__all__ = ["attention_pipeline", "mixed_precision_passes"]


def mixed_precision_passes(precision: str = "float16") -> tvm.transform.Sequential:
    """Low-precision matmuls with fp32 accumulation, then ``FoldConstant`` (weights stored in
    the low precision): TVM's ``ToMixedPrecision`` for float16, ``BFloat16Matmuls`` for
    bfloat16 (see its docstring for why not TVM's pass)."""
    if precision not in ("float16", "bfloat16"):
        raise ValueError(f"mixed precision is float16 or bfloat16, got {precision!r}")
    return tvm.transform.Sequential(
        [BFloat16Matmuls if precision == "bfloat16"
         else relax.transform.ToMixedPrecision(out_dtype="float32"),
         relax.transform.FoldConstant()], name="attnforge.mixed_precision")


def attention_pipeline(target, *, block_q: int | None = None, block_kv: int = 64,
                       compute_dtype: str | None = None, mixed_precision: bool | str | None = None,
                       sparsity=None, attention_qk: str = "float32") -> tvm.transform.Pass:
    """Flat ``Sequential``: FuseAttention -> AnalyzeAttentionMask -> [AMP] -> LowerAttentionToTIR.

    ``block_q`` None picks the target's default (64 on llvm, 128 on cuda); ``compute_dtype``
    runs the kernels in that dtype (e.g. ``"float16"``), casting around them;
    ``mixed_precision`` (``"float16"``/``"bfloat16"``; ``True`` means float16) runs
    :func:`mixed_precision_passes` on the rest of the graph.  AMP must run before lowering: it
    rejects modules holding ``call_tir`` to PrimFuncs ("Expected TensorType, but got R.Callable").  ``sparsity`` is a
    policy (``attnforge.sparsity``) ANDed into every site's mask.  ``attention_qk="int8"``:
    int8 Q K^T in the llvm kernel (``passes/_attention_qk.py``).
    """
    return tvm.transform.Sequential(
        [
            # Phase 1: recognise attention subgraphs, outline each into one annotated call.
            FuseAttention(),
            # Phase 2: fold compile-time masks into MaskSpecs (causal, window, chunked, ...).
            AnalyzeAttentionMask(),
            # Optional: the user's sparsity policy ANDed into each site's mask.
            InsertSparsity(sparsity) if sparsity is not None else tvm.transform.Sequential([]),
            # Optional: TVM's automatic mixed precision on everything but attention.
            mixed_precision_passes("float16" if mixed_precision is True else mixed_precision)
            if mixed_precision else tvm.transform.Sequential([]),
            # Phase 3: replace the calls by the fused kernel of `target` (others stay fused).
            LowerAttentionToTIR(target, block_q=block_q, block_kv=block_kv,
                                compute_dtype=compute_dtype, attention_qk=attention_qk),
        ],
        name="attnforge.attention_pipeline",
    )
