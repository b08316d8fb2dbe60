"""``evaluate(model, policy, inputs)``: what a sparsity policy does to a model's outputs.

The model is compiled for this CPU with the policy (FuseAttention -> AnalyzeAttentionMask ->
InsertSparsity -> LowerAttentionToTIR, then the same CPU schedules as ``compile_model``) and
compared with the dense eager model on the same inputs.
"""

from __future__ import annotations

import numpy as np
import tvm

__all__ = ["evaluate", "sparse_pipeline"]


def sparse_pipeline(target, policy, block_q: int | None = None,
                    block_kv: int = 64) -> tvm.transform.Pass:
    """The attention passes with ``InsertSparsity(policy)`` between analysis and lowering."""
    from .passes import AnalyzeAttentionMask, FuseAttention, LowerAttentionToTIR
    from .passes.insert_sparsity import InsertSparsity

    return tvm.transform.Sequential([
        FuseAttention(), AnalyzeAttentionMask(), InsertSparsity(policy),
        LowerAttentionToTIR(target, block_q=block_q, block_kv=block_kv)])


def _site_policy_attrs(mod) -> list[dict]:
    from .passes import _attention_ir as ir
    from .passes.insert_sparsity import A_SPARSITY, A_SPARSITY_CHANGED

    return [{"sparsity": ir.attr(mod[c], A_SPARSITY),
             "sparsity_changed": bool(ir.attr(mod[c], A_SPARSITY_CHANGED, False))}
            for _, c, _, _ in ir.iter_sites(mod)]


def compile_sparse(model, policy, inputs, block_kv: int = 64):
    """``(CompiledModel, per-site entries)`` of ``model`` with ``policy`` on this CPU."""
    from .frontends import import_torch_model
    from .passes import AnalyzeAttentionMask, FuseAttention, LowerAttentionToTIR
    from .passes.attention_report import attention_report
    from .passes.insert_sparsity import InsertSparsity
    from .runtime import CompiledModel
    from .schedules.cpu_schedule import cpu_build_pipeline
    from .target import host_target

    model.eval()
    imp = import_torch_model(model, tuple(inputs))
    tgt = host_target()
    mod = tvm.transform.Sequential([FuseAttention(), AnalyzeAttentionMask(),
                                    InsertSparsity(policy)])(imp.mod)
    marks = _site_policy_attrs(mod)
    mod = LowerAttentionToTIR(tgt, block_kv=block_kv)(mod)
    sites = [dict(e, **m) for e, m in zip(attention_report(mod), marks)]
    with tgt:
        mod = cpu_build_pipeline(tgt)(mod)
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=tgt)
    cm = CompiledModel(ex, tgt, imp.input_specs, imp.output_desc, {"attention": sites},
                       output_spec=imp.output_spec)
    return cm, sites


def _metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = np.abs(r - g)
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    return {"max_abs_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
            "cosine_similarity": float(r @ g / denom) if denom > 0 else float(
                np.array_equal(r, g))}


def evaluate(model, policy, inputs, *, block_kv: int = 64) -> dict:
    """Compile ``model`` with ``policy`` and compare with the dense eager model.

    Returns ``{"policy", "outputs": {name: metrics}, "max_abs_error", "mean_abs_error",
    "cosine_similarity"`` (of the first output, e.g. ``logits``), ``"top1_agreement"`` (fraction
    of positions whose argmax over the last axis agrees, when an output is named ``logits``,
    else None) and ``"sites"`` (the attention report entries with ``sparsity`` and
    ``sparsity_changed``)``}``.
    """
    import torch
    from torch.utils import _pytree

    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    cm, sites = compile_sparse(model, policy, inputs, block_kv=block_kv)
    with torch.no_grad():
        eager = model(*inputs)
    ref = [t.detach().cpu().numpy() for t in _pytree.tree_flatten(eager)[0]
           if isinstance(t, torch.Tensor)]
    got = cm.run_flat(*[x.detach().cpu().numpy() for x in inputs])
    desc = cm.output_desc
    names = list(desc["keys"]) if desc.get("kind") == "dict" and len(
        desc.get("keys", [])) == len(ref) else [f"output[{i}]" for i in range(len(ref))]
    outputs = {n: _metrics(r, g) for n, r, g in zip(names, ref, got)}
    top1 = None
    if "logits" in names:
        i = names.index("logits")
        top1 = float((ref[i].argmax(-1) == got[i].argmax(-1)).mean())
    first = outputs[names[0]]
    return {"policy": policy.describe(), "outputs": outputs, **first, "top1_agreement": top1,
            "sites": sites}
