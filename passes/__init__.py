"""attnforge.passes: Relax -> Relax passes that find, analyse and lower attention.

Pipeline order: :class:`FuseAttention` -> :class:`AnalyzeAttentionMask` ->
[:class:`InsertSparsity`] -> :class:`LowerAttentionToTIR` (:func:`attention_pipeline`); then
:func:`attention_report` / :func:`attention_rejections` say what happened to each site.
INT8 (``precision="int8"``, driven by ``attnforge.quantization``): QuantizeWeights ->
InsertActivationQuantize -> FoldDequantizeQuantize -> LowerInt8Matmul.
"""

from .analyze_attention_mask import AnalyzeAttentionMask
from .attention_report import attention_rejections, attention_report
from .fold_dequantize_quantize import FoldDequantizeQuantize
from .fuse_attention import FuseAttention
from .insert_quantize import InsertActivationQuantize
from .insert_sparsity import InsertSparsity
from .lower_attention import LowerAttentionToTIR
from .lower_int8_matmul import LowerInt8Matmul
from .pipeline import attention_pipeline
from .quantize_weights import QuantizeWeights

__all__ = [
    "AnalyzeAttentionMask",
    "FoldDequantizeQuantize",
    "FuseAttention",
    "InsertActivationQuantize",
    "InsertSparsity",
    "LowerAttentionToTIR",
    "LowerInt8Matmul",
    "QuantizeWeights",
    "attention_pipeline",
    "attention_rejections",
    "attention_report",
]
