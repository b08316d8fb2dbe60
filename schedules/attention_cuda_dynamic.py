"""The CUDA fused attention kernel for a symbolic batch / sequence length.

Same body as :mod:`.attention_cuda` (its ``_build`` is reused, tensor cores, fp16/bf16): the
lengths are int32 tir Vars bound from the tensor shapes, every kv block checks its tail at run
time, and the block layout comes from :func:`.block_mask_runtime.runtime_block_mask_func`
(``gpu=True``: one thread per query block), called before the kernel.  Masks: ``full``,
``structured`` or a :class:`~.block_mask_runtime.DispatchMask`; no mask tensor yet.  Indexing
is 32-bit, as in the static kernel: keep every tensor under 2**31 elements.
**Built and checked on the CPU only** (the ``emu=True`` emulation runs on llvm; the CUDA build
compiles): it has not run on a GPU.
"""

from __future__ import annotations

import math

from tvm import tirx

from .attention_args import check, check_dims, symbolic_dim
from .attention_cuda import _ARCHS, _DTYPES, _EMPTY_ROWS, _build, check_cuda_tiles
from .block_mask import MaskSpec
from .block_mask_runtime import runtime_block_mask_func, symbolic_ok

__all__ = ["fused_attention_cuda_dynamic"]


def fused_attention_cuda_dynamic(
    batch: int | None,
    q_heads: int,
    kv_heads: int,
    q_len: int | None,
    kv_len: int | None,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype: str = "float16",
    scale: float | None = None,
    mask=None,
    block_q: int = 128,
    block_kv: int = 64,
    empty_rows: str = "zero",
    arch: str = "sm_90",
    num_stages: int = 2,
    warp_rows: int = 16,
    global_symbol: str = "fused_attention_cuda_dynamic",
    emu: bool = False,
):
    """``(kernel, layout_func)`` like :func:`.attention_cpu_dynamic.fused_attention_cpu_dynamic`
    for CUDA (``emu=True``: both buildable for llvm, to test the algorithm on a CPU)."""
    if dtype not in _DTYPES:
        raise NotImplementedError(f"fused_attention_cuda_dynamic: dtype={dtype!r} is not "
                                  f"supported; use one of {_DTYPES}")
    if arch not in _ARCHS:
        raise NotImplementedError(f"fused_attention_cuda_dynamic: arch={arch!r} is not "
                                  f"supported; use one of {_ARCHS}")
    mask = MaskSpec.full() if mask is None else mask
    check(symbolic_ok(mask), "symbolic sequence length on CUDA: the mask must be full, "
          f"structured or a DispatchMask, got {getattr(mask, 'kind', mask)!r}")
    B, Nq, Nk = (symbolic_dim(v, n) for v, n in ((batch, "batch"), (q_len, "q_len"),
                                                  (kv_len, "kv_len")))
    Hq, Hkv, D = (int(v) for v in (q_heads, kv_heads, head_dim))
    Dv = D if v_head_dim is None else int(v_head_dim)
    check_dims(1, Hq, Hkv, 1, 1, D, Dv)  # batch / lengths checked by symbolic_dim
    check_cuda_tiles(D, Dv, block_q, block_kv, num_stages, warp_rows)
    check(empty_rows in _EMPTY_ROWS, f"empty_rows must be one of {_EMPTY_ROWS}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    check(math.isfinite(scale), f"scale must be finite, got {scale}")
    W = tirx.Var("max_blocks", "int32")
    kernel = _build(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dt=dtype, scale=scale,
                    spec=mask, BQ=block_q, BK=block_kv, mask_input=None, mshape=None,
                    empty_rows=empty_rows, ST=num_stages, Hm=1, W=W, emu=emu, WR=warp_rows)
    attrs = {"global_symbol": global_symbol, "tir.noalias": True, "op_pattern": 8}
    if not emu:
        attrs["tirx.is_scheduled"] = True
    layout = runtime_block_mask_func(mask, (B, Hq, Nq, D), (B, Hkv, Nk, D), dtype, dtype,
                                     block_q, block_kv, gpu=not emu)
    return kernel.with_attr(attrs), layout
