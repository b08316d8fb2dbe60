"""Argument checks shared by the fused attention kernel generators (llvm and CUDA)."""

from __future__ import annotations

from collections.abc import Sequence


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``."""
    if not cond:
        raise ValueError(msg)


def check_mask_shape(shape: Sequence[int] | None, full: tuple) -> tuple:
    """Validate ``mask_input_shape`` against ``full = (B, Hq, Nq, Nk)``; returns it as ints."""
    check(shape is not None, "mask_input is set: pass mask_input_shape (broadcastable to "
          f"[B, Hq, Nq, Nk] = {list(full)})")
    shape = tuple(int(s) for s in shape)
    check(2 <= len(shape) <= 4, f"mask_input_shape={shape}: expected 2 to 4 dims "
          f"broadcastable to [B, Hq, Nq, Nk] = {list(full)}")
    padded = (1,) * (4 - len(shape)) + shape
    for name, s, f in zip(("batch", "heads", "q_len", "kv_len"), padded, full, strict=True):
        check(s in (1, f), f"mask_input_shape={shape}: the {name} dim must be 1 or {f}, got {s}")
    return shape


def check_dims(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, Dv: int) -> None:
    """Positive sizes and a whole number of query heads per kv head (GQA/MQA)."""
    for name, v in (("batch", B), ("q_heads", Hq), ("kv_heads", Hkv), ("q_len", Nq),
                    ("kv_len", Nk), ("head_dim", D), ("v_head_dim", Dv)):
        check(v > 0, f"{name} must be positive, got {v}")
    check(Hq % Hkv == 0, f"q_heads ({Hq}) must be a multiple of kv_heads ({Hkv}) for GQA/MQA")


def symbolic_dim(value, name: str):
    """A size that is an int stays an int; None (symbolic) becomes a fresh int32 tir Var."""
    from tvm import tirx

    if value is None:
        return tirx.Var(name, "int32")
    check(isinstance(value, int) and value > 0, f"{name} must be a positive int or None "
          f"(symbolic), got {value!r}")
    return int(value)


def attention_prim_func(macro, dtype: str, shapes: tuple, Hm: int, nqb: int, W: int,
                        mask_shape: tuple | None = None, mask_dtype: str | None = None,
                        check_well_formed: bool = True):
    """The kernels' shared signature around their body ``macro``: ``(Q, K, V, kv_num_blocks,
    kv_indices, kv_is_full[, mask], O)``; ``shapes`` = (Q, K, V, O) shapes.
    ``check_well_formed=False`` when the body reads buffers that become parameters only later
    (a score mod's captured tensors, ``attention_score_mod.with_captured_buffers``)."""
    from tvm.script import tirx as T

    qs, ks, vs, os_ = shapes
    if mask_shape is not None:
        @T.prim_func(private=True, check_well_formed=check_well_formed)
        def func(Q: T.Buffer(qs, dtype), K: T.Buffer(ks, dtype), V: T.Buffer(vs, dtype),
                 kv_num_blocks: T.Buffer((Hm, nqb), "int32"),
                 kv_indices: T.Buffer((Hm, nqb, W), "int32"),
                 kv_is_full: T.Buffer((Hm, nqb, W), "int32"),
                 mask: T.Buffer(mask_shape, mask_dtype), O: T.Buffer(os_, dtype)):
            _ = T.meta_var(check_well_formed)  # the parser re-evaluates the decorator
            macro(Q, K, V, kv_num_blocks, kv_indices, kv_is_full, mask, O)
    else:
        @T.prim_func(private=True, check_well_formed=check_well_formed)
        def func(Q: T.Buffer(qs, dtype), K: T.Buffer(ks, dtype), V: T.Buffer(vs, dtype),
                 kv_num_blocks: T.Buffer((Hm, nqb), "int32"),
                 kv_indices: T.Buffer((Hm, nqb, W), "int32"),
                 kv_is_full: T.Buffer((Hm, nqb, W), "int32"), O: T.Buffer(os_, dtype)):
            _ = T.meta_var(check_well_formed)  # the parser re-evaluates the decorator
            macro(Q, K, V, kv_num_blocks, kv_indices, kv_is_full, None, O)

    return func


def element_allowed(spec, structured: bool, q, k, Nk: int, k_tail: bool):
    """TIR form of ``MaskSpec.allowed`` for structured masks, plus the ragged kv tail
    (``k < Nk`` when the last kv block is partial): the element rule of both kernels."""
    from tvm import tirx

    from .block_mask_runtime import structured_rule

    if hasattr(spec, "element_rule"):  # block_mask_runtime.DispatchMask: chosen on Nk
        return spec.element_rule(q, k, Nk, k_tail)
    cond = structured_rule(spec, q, k) if structured else tirx.const(True, "bool")
    if k_tail:
        cond = tirx.all(cond, k < Nk)
    return cond
