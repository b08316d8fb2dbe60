"""INT8 for CUDA targets: symmetric s8 activations and int8 ``R.matmul`` for tensor cores.

Called by :func:`attnforge.quantization.quantize_int8` for a cuda target (or ``numerics_of``
one: the CPU twin of a CUDA build) after calibration, GPTQ planning and the summary.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["quantize_cuda", "symmetric_scale"]


def symmetric_scale(lo: float, hi: float) -> float:
    """Symmetric int8 activation scale ``max(|lo|, |hi|) / 127`` (1 for an all-zero range)."""
    amax = max(abs(float(lo)), abs(float(hi)))
    if not np.isfinite(amax):
        raise ValueError(f"symmetric_scale: non-finite range [{lo}, {hi}]")
    return amax / 127.0 if amax > 1e-30 else 1.0


def quantize_cuda(mod, ranges: dict, exclude, names, activations: str,
                   summary: dict | None, gptq: tuple, embeddings: int):
    """[QuantizeEmbedding] -> QuantizeWeights -> LowerInt8MatmulCuda (symmetric s8
    activations, int8 ``R.matmul``); ``embeddings``: the embedding group size, 0 for fp32."""
    import tvm

    from attnforge.passes.lower_int8_matmul_cuda import LowerInt8MatmulCuda
    from attnforge.passes.quantize_embedding import QuantizeEmbedding
    from attnforge.passes.quantize_weights import QuantizeWeights

    if activations == "none":
        raise ValueError("quantize_int8: activations='none' is a CPU diagnostic; on CUDA "
                         "use 'per_token' or 'per_tensor'")
    scales = {i: symmetric_scale(lo, hi) for i, (lo, hi) in ranges.items()}
    out = tvm.transform.Sequential([
        QuantizeEmbedding(embeddings) if embeddings else tvm.transform.Sequential([]),
        QuantizeWeights(exclude=exclude, names=names, hessians=gptq[0], damping=gptq[1]),
        LowerInt8MatmulCuda(scales)])(mod)
    if summary is not None:
        summary["scheme"] = ("int8 post-training: s8 weights per output channel, symmetric s8 "
                             "activations, int32 accumulation (R.matmul s8 x s8 -> s32; "
                             "int8 tensor cores via dlight on CUDA)")
        for site in summary["sites"]:
            if site.get("excluded"):
                continue
            i = site["site"]
            site["activation"] = (
                {"dtype": "int8", "scheme": "symmetric per tensor", "scale": scales[i],
                 "range": [float(v) for v in ranges[i]]} if i in scales
                else {"dtype": "int8", "scheme": "symmetric per token (dynamic)"})
        text = out["main"].script(show_meta=False)
        summary["vnni_matmuls"] = 0
        summary["int8_matmuls"] = len(re.findall(r'out_dtype="int32"', text))
    return out
