"""attnforge.passes: Relax -> Relax passes that find, analyse and lower attention.

Pipeline order: :class:`FuseAttention` -> :class:`AnalyzeAttentionMask` ->
[:class:`InsertSparsity`] -> :class:`LowerAttentionToTIR` (:func:`attention_pipeline`); then
:func:`attention_report` / :func:`attention_rejections` say what happened to each site.
"""

from .analyze_attention_mask import AnalyzeAttentionMask
from .attention_report import attention_rejections, attention_report
from .fuse_attention import FuseAttention
from .insert_sparsity import InsertSparsity
from .lower_attention import LowerAttentionToTIR
from .pipeline import attention_pipeline

__all__ = [
    "AnalyzeAttentionMask",
    "FuseAttention",
    "InsertSparsity",
    "LowerAttentionToTIR",
    "attention_pipeline",
    "attention_rejections",
    "attention_report",
]
