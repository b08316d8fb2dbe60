"""The fused CPU attention kernel for a symbolic batch / sequence length.

Same algorithm and body as :mod:`.attention_cpu` (its ``_build`` is reused): the lengths are
tir Vars bound from the tensor shapes at run time, every kv block is checked for a ragged tail
at run time, and the block layout (``kv_num_blocks``/``kv_indices``/``kv_is_full``) comes from
:func:`.block_mask_runtime.runtime_block_mask_func`, called before the kernel.  Masks must be
evaluable from indices for any length: ``full``, ``structured`` or a
:class:`~.block_mask_runtime.DispatchMask` (one kernel, the rule chosen on ``kv_len``).
A mask tensor (e.g. a padding mask ``[B, 1, 1, Nk]`` or ``[B, 1, Nq, Nk]``) may come with it;
static layouts need compile-time lengths.
"""

from __future__ import annotations

import math

from tvm import tirx

from .attention_args import check, check_dims, symbolic_dim
from .attention_cpu import _DTYPES, _EMPTY_ROWS, _build, check_cpu_tiles
from .block_mask import MaskSpec
from .block_mask_runtime import runtime_block_mask_func, symbolic_ok

__all__ = ["fused_attention_cpu_dynamic"]


def fused_attention_cpu_dynamic(
    batch: int | None,
    q_heads: int,
    kv_heads: int,
    q_len: int | None,
    kv_len: int | None,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype: str = "float32",
    scale: float | None = None,
    mask=None,
    block_q: int = 64,
    block_kv: int = 64,
    empty_rows: str = "zero",
    rows: int = 4,
    global_symbol: str = "fused_attention_cpu_dynamic",
    mask_input: str | None = None,
    mask_input_shape: tuple | None = None,
):
    """``(kernel, layout_func)``: the kernel ``(Q, K, V, kv_num_blocks, kv_indices, kv_is_full,
    O)`` with ``None`` dims symbolic, and the PrimFunc ``(Q, K, kv_num_blocks, kv_indices,
    kv_is_full)`` computing its block layout at run time (see module docstring).
    ``mask_input`` (``"bool"``/``"additive"``): a mask tensor after the layout arrays, shape
    ``mask_input_shape`` broadcastable to ``[B, Hq, Nq, Nk]`` whose entries are ints or the
    names ``"batch"``/``"q_len"``/``"kv_len"`` of the symbolic dims (e.g. a key padding mask
    ``("batch", 1, 1, "kv_len")``); it is applied on every visited block.

    Raises ``ValueError`` for invalid arguments or a mask that needs compile-time lengths
    (``static``/``dynamic`` MaskSpec), ``NotImplementedError`` for unsupported dtypes.
    """
    if dtype not in _DTYPES:
        raise NotImplementedError(f"fused_attention_cpu_dynamic: dtype={dtype!r} is not "
                                  f"supported on llvm; use one of {_DTYPES}")
    mask = MaskSpec.full() if mask is None else mask
    what = getattr(mask, "kind", mask)
    check(mask_input in (None, "bool", "additive"), f"mask_input must be None, 'bool' or "
          f"'additive', got {mask_input!r}")
    check(symbolic_ok(mask, with_tensor=mask_input is not None),
          "symbolic sequence length: the mask must be full, structured "
          f"(causal, sliding window, chunked) or a DispatchMask, got {what!r} (static layouts "
          "and mask tensors need compile-time lengths)")
    B, Nq, Nk = (symbolic_dim(v, n) for v, n in ((batch, "batch"), (q_len, "q_len"),
                                                  (kv_len, "kv_len")))
    Hq, Hkv, D = (int(v) for v in (q_heads, kv_heads, head_dim))
    Dv = D if v_head_dim is None else int(v_head_dim)
    check_dims(1, Hq, Hkv, 1, 1, D, Dv)  # batch / lengths checked by symbolic_dim
    check_cpu_tiles(block_q, block_kv, rows)
    check(empty_rows in _EMPTY_ROWS, f"empty_rows must be one of {_EMPTY_ROWS}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    check(math.isfinite(scale), f"scale must be finite, got {scale}")
    W = tirx.Var("max_blocks", "int32")  # bound from kv_indices' shape at run time
    mshape = None
    if mask_input is not None:
        names = {"batch": B, "q_len": Nq, "kv_len": Nk}
        check(mask_input_shape is not None and 2 <= len(mask_input_shape) <= 4,
              f"mask_input_shape must have 2 to 4 dims, got {mask_input_shape!r}")
        full = (B, Hq, Nq, Nk)[4 - len(mask_input_shape):]
        mshape = []
        for s, f in zip(mask_input_shape, full):
            d = names.get(s, s) if isinstance(s, str) else int(s)
            check(d is f or d == 1 or (isinstance(d, int) and isinstance(f, int) and d == f),
                  f"mask_input_shape={tuple(mask_input_shape)} is not broadcastable to "
                  f"[batch, {Hq}, q_len, kv_len]")
            mshape.append(d)
        mshape = tuple(mshape)
    kernel = _build(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype, scale=scale,
                    spec=mask, BQ=block_q, BK=block_kv, mask_input=mask_input, mshape=mshape,
                    empty_rows=empty_rows, R=rows, Hm=1, W=W, visited=1.0)
    kernel = kernel.with_attr({"global_symbol": global_symbol, "tir.noalias": True,
                               "op_pattern": 8})
    layout = runtime_block_mask_func(mask, (B, Hq, Nq, D), (B, Hkv, Nk, D), dtype, dtype,
                                     block_q, block_kv)
    return kernel, layout
