"""``InsertSparsity`` for attention sites with a symbolic sequence length, and length dispatch.

A policy is asked for its mask at a few sample lengths (self-attention, ``q_len == kv_len``);
only a structured mask that is the same at every sample (``SlidingWindow``, ``BlockLocal``,
...) can be used for a symbolic length: it is ANDed with the site's own structured mask as in
the static case.  Policies whose layout depends on the length (``BigBird``, ``BlockSparse``,
``Longformer``, most ``MaskMod``\\ s) are refused with a clear error.

A dispatch policy (``attnforge.sparsity.Dispatch``: attributes ``dispatch_threshold``,
``short_policy``, ``long_policy``) on a symbolic site sets the attr ``attnforge.dispatch``:
below the threshold the site keeps its own mask (ANDed with the short policy, if any), at or
above it the long policy's mask; ``LowerAttentionToTIR`` makes one kernel that chooses on
``kv_len`` at run time.  On a static-shape site the side is picked at compile time (and the
note says so).
"""

from __future__ import annotations

from ..schedules.block_mask import MaskSpec
from . import _attention_ir as ir
from ._symbolic_shape import shape_dims
from .analyze_attention_mask import spec_from_attrs, spec_to_attrs

__all__ = ["SAMPLE_LENGTHS", "symbolic_policy_spec", "symbolic_site_attrs"]

SAMPLE_LENGTHS = (67, 200, 1031)  # lengths at which a policy must give the same structure
A_DISPATCH = "attnforge.dispatch"  # same key as lower_attention_dynamic.A_DISPATCH


def symbolic_policy_spec(policy, heads: int, layer: int, fixed=None) -> MaskSpec | None:
    """The policy's mask for any length, or None (leaves the site alone); ValueError when it
    is not one structured rule at every sample length.  ``fixed``: static ``(q_len, kv_len)``
    of a site whose only symbolic dim is the batch (asked once, at those lengths)."""
    desc = policy.describe()
    specs = []
    for nq, nk in [fixed] if fixed is not None else [(n, n) for n in SAMPLE_LENGTHS]:
        n = nk
        try:
            specs.append(policy.mask_spec(nq, nk, heads, layer))
        except ValueError as e:
            raise ValueError(f"sparsity policy {desc} cannot be used with a symbolic sequence "
                             f"length: at length {n} it fails ({e}); use a structured policy "
                             "(SlidingWindow, BlockLocal) or static shapes") from e
    if all(s is None for s in specs):
        return None
    keys = {ir.spec_key(s) if s is not None else None for s in specs}
    first = specs[0]
    if len(keys) != 1 or first is None or first.kind not in ("full", "structured"):
        what = ", ".join(f"{n}: {s.describe() if s is not None else 'unchanged'}"
                         for n, s in zip(SAMPLE_LENGTHS, specs))
        raise ValueError(f"sparsity policy {desc} cannot be expressed for a symbolic sequence "
                         f"length: its mask is not one structured rule for every length ({what})"
                         "; static layouts (BigBird, BlockSparse, Longformer, MaskMod) need "
                         "static shapes, or use SlidingWindow / BlockLocal")
    return first


def _and(site: MaskSpec, pol: MaskSpec, desc: str) -> MaskSpec:
    from .insert_sparsity import intersect_specs

    out = intersect_specs(site, pol, SAMPLE_LENGTHS[0], SAMPLE_LENGTHS[0])
    if out.kind not in ("full", "structured"):
        raise ValueError(f"sparsity policy {desc} combined with the site's mask "
                         f"({site.describe()}) is not a structured rule")
    return out


def symbolic_site_attrs(func, call, policy, layer: int, record) -> dict | None:
    """New attrs of a symbolic-length site under ``policy`` (None: unchanged).  ``record`` is
    ``_SiteRewrite._record`` (note, sparsity attrs)."""
    desc = policy.describe()
    q, k = shape_dims(call.args[0]), shape_dims(call.args[1])
    fixed = (q[-2], k[-2]) if isinstance(q[-2], int) and isinstance(k[-2], int) else None
    if fixed is None and q[-2] != k[-2]:
        raise ValueError(f"sparsity policy {desc}: attention site {layer} has symbolic q_len "
                         f"{q[-2]} != kv_len {k[-2]}; only self-attention (equal lengths) is "
                         "supported with symbolic shapes")
    heads = q[1] if ir.attr(func, ir.A_LAYOUT, "BHND") == "BHND" else 1
    if not isinstance(heads, int):
        raise ValueError(f"sparsity policy {desc}: symbolic head count at site {layer}")
    site = spec_from_attrs(func)
    if site is None:
        raise ValueError("InsertSparsity: run AnalyzeAttentionMask first")
    tensor = ir.attr(func, ir.A_MASK_INPUT, "none") != "none"
    if site.kind not in ("full", "structured", "dynamic") or (
            tensor and ir.attr(func, ir.A_MASK_CONST) is not None):
        raise ValueError(f"sparsity policy {desc} at attention site {layer}: its mask "
                         f"({site.describe()}) has no form for a symbolic sequence length")
    if site.kind == "dynamic":  # a run-time tensor without structure: it stays applied on
        site = MaskSpec.full()  # every block; the policy alone gives the blocks
    extra_t = "; the run-time mask tensor is still applied on every block" if tensor else ""
    threshold = getattr(policy, "dispatch_threshold", None)
    if fixed is not None and threshold is not None:  # static lengths: side known now
        threshold = None
        desc += f" [static lengths: kv_len={fixed[1]} picks its side at compile time]"
    if threshold is None:
        pol = symbolic_policy_spec(policy, heads, layer, fixed)
        if pol is None:
            return None
        new = _and(site, pol, desc)
        if ir.spec_key(new) == ir.spec_key(site):
            return record(desc, {}, changed=False)
        return record(desc, {ir.A_MASK_SPEC: spec_to_attrs(new)}, changed=True, spec=new,
                      extra=" (for every sequence length)" + extra_t)
    short_p, long_p = policy.short_policy, policy.long_policy
    short = site
    if short_p is not None:
        sp = symbolic_policy_spec(short_p, heads, layer)
        short = site if sp is None else _and(site, sp, short_p.describe())
    lp = symbolic_policy_spec(long_p, heads, layer)
    long = site if lp is None else _and(site, lp, long_p.describe())
    changed = ir.spec_key(long) != ir.spec_key(site) or ir.spec_key(short) != ir.spec_key(site)
    out = {ir.A_MASK_SPEC: spec_to_attrs(short),
           A_DISPATCH: {"threshold": int(threshold), "long": spec_to_attrs(long),
                        "policy": desc}}
    extra = (f"as a length dispatch (one kernel, chosen at run time on kv_len: < {threshold} -> "
             f"{short.describe()}, >= {threshold} -> {long.describe()})" + extra_t)
    if not changed:
        return record(desc, out, changed=False)
    return record(desc, out, changed=True, spec=None, extra=extra)
