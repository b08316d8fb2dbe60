"""The attention pass pipeline: recognise, analyse, lower.

``attention_pipeline(target)`` runs right after import (``frontends``) and before TVM's own
legalisation/build; the module it returns is accepted by ``tvm.compile(mod, target)``.  Read
``attnforge.passes.attention_report(mod)`` on its result for what happened to each site.
"""

from __future__ import annotations

import tvm

from .analyze_attention_mask import AnalyzeAttentionMask
from .fuse_attention import FuseAttention
from .lower_attention import LowerAttentionToTIR

__all__ = ["attention_pipeline"]


def attention_pipeline(target, *, block_q: int = 64, block_kv: int = 64) -> tvm.transform.Pass:
    """Flat ``Sequential``: FuseAttention -> AnalyzeAttentionMask -> LowerAttentionToTIR."""
    return tvm.transform.Sequential(
        [
            # Phase 1: recognise attention subgraphs, outline each into one annotated call.
            FuseAttention(),
            # Phase 2: fold compile-time masks into MaskSpecs (causal, window, chunked, ...).
            AnalyzeAttentionMask(),
            # Phase 3: replace the calls by the fused kernel of `target` (others stay fused).
            LowerAttentionToTIR(target, block_q=block_q, block_kv=block_kv),
        ],
        name="attnforge.attention_pipeline",
    )
