"""What happened to every attention site: the lead's view of the attention passes.

``attention_report(mod)`` works on a module at any stage:

* after ``LowerAttentionToTIR`` it returns the entries that pass stored in the module attr
  ``attnforge.attention_sites`` (lowered or not, with the reason);
* before it (after ``FuseAttention`` / ``AnalyzeAttentionMask``) it derives the same entries
  from the attention functions, with ``lowered_to=None`` and ``reason="not lowered yet"``.

``attention_rejections(mod)`` lists the softmax/matmul subgraphs ``FuseAttention`` saw but did
not fuse, each ``{"fused": False, "function", "var", "reason"}``.
"""

from __future__ import annotations

from . import _attention_ir as ir

__all__ = ["attention_rejections", "attention_report"]


def attention_report(mod, block_q: int = 64, block_kv: int = 64) -> list[dict]:
    """One dict per fused attention site, in program order (see module docstring).

    Keys: ``site``, ``fused``, ``function``, ``var``, ``lowered_to``
    (``"attnforge.fused_attention_cpu"`` or None), ``reason``, ``mask`` (``MaskSpec.describe()``),
    ``mask_kind``, ``mask_input``, ``empty_rows``, ``mask_note``, ``scale``, ``gqa_groups``,
    ``layout``, ``shape`` (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim,
    dtype), ``block`` ([bq, bk]), ``sparsity`` (the inserted policy or None),
    ``sparsity_changed`` (True when it changed the model's function) and ``visited_fraction``
    (None until lowered).  Sites imported from ``flex_attention`` also have ``source_op``
    (``"flex_attention"``), ``mask_mod`` and ``score_mod`` (the ATen ops each one uses).
    """
    if mod.attrs is not None and ir.M_SITES in mod.attrs:
        return [dict(e) for e in ir.to_py(mod.attrs[ir.M_SITES])]
    from .lower_attention import make_plan

    out = []
    for i, (caller, callee, call, var) in enumerate(ir.iter_sites(mod)):
        plan = make_plan(mod[callee], call, block_q, block_kv)
        plan.reason = "not lowered yet"
        out.append(plan.entry(i, caller.name_hint, var.name))
    return out


def attention_rejections(mod) -> list[dict]:
    """Candidates ``FuseAttention`` left alone, with the reason."""
    if mod.attrs is None or ir.M_REJECTIONS not in mod.attrs:
        return []
    return [{"fused": False, **dict(e)} for e in ir.to_py(mod.attrs[ir.M_REJECTIONS])]
