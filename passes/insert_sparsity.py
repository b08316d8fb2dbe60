"""InsertSparsity: impose a user's sparsity policy on every recognised attention site.

What it does
    For each call to an ``attnforge.attention`` function, in program order (site ``i`` is
    layer ``i``), it asks the policy for a mask, ``policy.mask_spec(q_len, kv_len, num_heads,
    layer)`` (a :class:`~attnforge.schedules.block_mask.MaskSpec`, or None: leave the site
    alone), and ANDs it with the site's own analysed mask, so a causal model stays causal
    (causal & window = causal window).  Two structured bands stay structured; anything else
    becomes a ``static`` bool ``[Hm, Nq, Nk]`` layout (re-classified to a structured one when
    that is exact and small).  It then rewrites the attrs ``LowerAttentionToTIR`` reads
    (``attnforge.mask_spec``, ``attnforge.static_mask``, ``attnforge.mask_input``,
    ``attnforge.mask_const``) so the fused kernel skips the blocks the policy empties, and
    records ``attnforge.sparsity`` (the policy's ``describe()``) and
    ``attnforge.sparsity_changed`` (False only when the result is exactly the site's own mask);
    the mask note says so too, so the attention report shows it.  A changed site gives 0 for a
    query row with no allowed key (FlexAttention's convention).

    Sites with a run-time mask (padding): the run-time tensor is kept and applied on every
    visited block; the policy becomes the block structure when the combination is structured
    (the encoding ``AnalyzeAttentionMask`` uses for ``static & dynamic``).  A compile-time
    mask tensor (``attnforge.mask_const``) is combined with a static policy element-wise (no
    block skipping then).  A static policy with a run-time boolean (or ``-inf``) mask keeps
    the static layout for block skipping and marks the site ``attnforge.runtime_and_static``:
    the lowering ANDs the two masks into the kernel's tensor
    (:mod:`.lower_attention_static_runtime`); with a finite additive run-time mask it is
    rejected with a clear error.

    A policy is any object with ``mask_spec(q_len, kv_len, num_heads, layer)`` and
    ``describe()`` (``attnforge.sparsity`` has the built-in ones); this module does not
    import ``attnforge``.  When the policy has ``layer_indices`` (a set of ints), naming a
    layer beyond the model's sites is an error.

Preconditions: ``FuseAttention`` and ``AnalyzeAttentionMask`` have run.  Sites with a symbolic
sequence length and length dispatch (``Dispatch``) are handled by
:mod:`.insert_sparsity_symbolic` (structured policies only; others are refused clearly).
Place in the pipeline: between ``AnalyzeAttentionMask`` and ``LowerAttentionToTIR``.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import tvm

from ..schedules.block_mask import MaskSpec
from . import _attention_ir as ir
from .analyze_attention_mask import (
    _retarget,
    _same,
    classify_bool_mask,
    spec_from_attrs,
    spec_to_attrs,
)
from .insert_sparsity_symbolic import symbolic_site_attrs

__all__ = ["A_SPARSITY", "A_SPARSITY_CHANGED", "InsertSparsity", "SparsityPolicy",
           "intersect_specs", "simplify_static"]

A_SPARSITY = "attnforge.sparsity"  # str: describe() of the policy applied to the site
A_SPARSITY_CHANGED = "attnforge.sparsity_changed"  # bool: the site computes something new
A_RUNTIME_AND_STATIC = "attnforge.runtime_and_static"  # bool: run-time mask & static layout
_CLASSIFY_MAX = 1 << 22  # elements: larger static results are not re-classified


class SparsityPolicy(Protocol):
    """What ``InsertSparsity`` needs from a policy (``attnforge.sparsity`` implements it)."""

    def mask_spec(self, q_len: int, kv_len: int, num_heads: int,
                  layer: int) -> MaskSpec | None: ...

    def describe(self) -> str: ...


def _band_and(a: MaskSpec, b: MaskSpec) -> MaskSpec | None:
    """AND of two structured specs as one structured spec, or None when not expressible."""
    if a.chunk is not None and b.chunk is not None and (
            a.chunk != b.chunk or a.q_offset != b.q_offset):
        return None
    base, other = (a, b) if a.chunk is not None or b.chunk is None else (b, a)
    shift = base.q_offset - other.q_offset  # d_other = d_base - shift
    lows = [x for x in (base.min_diff, None if other.min_diff is None
                        else other.min_diff + shift) if x is not None]
    highs = [x for x in (base.max_diff, None if other.max_diff is None
                         else other.max_diff + shift) if x is not None]
    return MaskSpec("structured", q_offset=base.q_offset, min_diff=max(lows) if lows else None,
                    max_diff=min(highs) if highs else None, chunk=base.chunk)


def simplify_static(mask: np.ndarray) -> MaskSpec:
    """``MaskSpec`` for a bool ``[Hm, Nq, Nk]`` array: structured when exact and small."""
    m = np.ascontiguousarray(mask, dtype=bool)
    if m.ndim == 2:
        m = m[None]
    if m.size <= _CLASSIFY_MAX:
        return classify_bool_mask(m)
    if m.shape[0] > 1 and (m == m[:1]).all():
        m = m[:1]
    return MaskSpec.static(m)


def intersect_specs(a: MaskSpec, b: MaskSpec, q_len: int, kv_len: int) -> MaskSpec:
    """``a & b`` for compile-time specs (``full``/``structured``/``static``)."""
    for s in (a, b):
        if s.kind == "dynamic":
            raise ValueError("intersect_specs: a dynamic mask has no compile-time form")
    if a.kind == "full":
        return b
    if b.kind == "full":
        return a
    if a.kind == "structured" and b.kind == "structured":
        band = _band_and(a, b)
        if band is not None:
            return band
    return simplify_static(a.dense(q_len, kv_len) & b.dense(q_len, kv_len))


def _equal(a: MaskSpec, b: MaskSpec, q_len: int, kv_len: int) -> bool:
    if ir.spec_key(a) == ir.spec_key(b):
        return True
    if a.kind == "dynamic" or b.kind == "dynamic" or q_len * kv_len > _CLASSIFY_MAX:
        return False
    da, db = a.dense(q_len, kv_len), b.dense(q_len, kv_len)
    return bool(np.array_equal(np.broadcast_to(da, np.broadcast_shapes(da.shape, db.shape)),
                               np.broadcast_to(db, np.broadcast_shapes(da.shape, db.shape))))


def _spec_attrs(spec: MaskSpec) -> dict:
    out = {ir.A_MASK_SPEC: spec_to_attrs(spec)}
    if spec.kind == "static":
        out[ir.A_STATIC_MASK] = ir.tensor_attr(spec.static_mask)
    return out


class _SiteRewrite:
    """New attrs of one site under the policy (None: leave it as it is)."""

    def __init__(self, func, call, policy, layer: int):
        self.func, self.policy, self.layer, self.call = func, policy, layer, call
        q, k = ir.static_shape(call.args[0]), ir.static_shape(call.args[1])
        self.shapes_known = q is not None and k is not None
        if self.shapes_known:
            self.nq, self.nk = q[-2], k[-2]
            self.heads = q[1] if ir.attr(func, ir.A_LAYOUT, "BHND") == "BHND" else 1

    def attrs(self) -> dict | None:
        desc = self.policy.describe()
        if not self.shapes_known:  # symbolic length (and length dispatch): separate module
            return symbolic_site_attrs(self.func, self.call, self.policy, self.layer,
                                       self._record)
        threshold = getattr(self.policy, "dispatch_threshold", None)
        if threshold is not None:  # static shapes: the side is known at compile time
            side = "long" if self.nk >= threshold else "short"
            desc += (f" [static shapes: kv_len={self.nk} picks the {side} side at compile "
                     "time; compile with dynamic_shapes= for a run-time choice]")
        site = spec_from_attrs(self.func)
        if site is None:
            raise ValueError("InsertSparsity: run AnalyzeAttentionMask first (attention site "
                             f"{self.layer} has no {ir.A_MASK_SPEC} attr)")
        pol = self.policy.mask_spec(self.nq, self.nk, self.heads, self.layer)
        if pol is None:
            return None
        if not isinstance(pol, MaskSpec) or pol.kind == "dynamic":
            raise ValueError(f"sparsity policy {desc}: mask_spec() must return a compile-time "
                             f"MaskSpec or None, got {pol!r}")
        if pol.kind == "static" and pol.static_mask.shape[0] not in (1, self.heads):
            raise ValueError(f"sparsity policy {desc}: per-head mask has "
                             f"{pol.static_mask.shape[0]} heads, site {self.layer} has "
                             f"{self.heads} heads")
        mask_input = ir.attr(self.func, ir.A_MASK_INPUT, "none")
        const = ir.attr(self.func, ir.A_MASK_CONST)
        if site.kind != "dynamic" and (mask_input == "none" or site.kind == "static"):
            new = intersect_specs(site, pol, self.nq, self.nk)
            if _equal(new, site, self.nq, self.nk):
                return self._record(desc, {}, changed=False)
            out = _spec_attrs(new)
            out[ir.A_MASK_INPUT] = "bool" if new.kind == "static" else "none"
            return self._record(desc, out, changed=True, spec=new)
        # A mask tensor stays: the policy (and the site's structured part) give the blocks.
        new = pol if site.kind == "dynamic" else intersect_specs(site, pol, self.nq, self.nk)
        if new.kind != "static":
            if _equal(new, site, self.nq, self.nk):
                return self._record(desc, {}, changed=False)
            return self._record(desc, _spec_attrs(new), changed=True, spec=new,
                                extra="; the mask tensor is still applied on every block")
        if const is None and mask_input == "bool":  # run-time bool mask & static layout
            out = _spec_attrs(new)
            out[A_RUNTIME_AND_STATIC] = True
            return self._record(desc, out, changed=True, spec=new, extra=(
                "; the run-time mask tensor is ANDed with the layout and applied on every "
                "visited block"))
        if const is None:
            raise ValueError(
                f"sparsity policy {desc} gives a static layout at attention site {self.layer}, "
                f"whose mask is a run-time additive tensor ({mask_input}, e.g. a padding mask "
                "filled with finfo.min); static layouts combine only with boolean / -inf "
                "run-time masks: use a structured policy (SlidingWindow, BlockLocal)")
        keep = new.static_mask[None]  # [1, Hm, Nq, Nk]
        if mask_input == "additive":
            folded = np.where(keep, const, -math.inf).astype(const.dtype)
        else:
            folded = np.logical_and(const.astype(bool), keep)
        out = {ir.A_MASK_CONST: ir.tensor_attr(folded)}
        return self._record(desc, out, changed=True, spec=site,
                            extra="; folded into the constant mask tensor (no block skipping)")

    def _record(self, desc, out, changed, spec=None, extra=""):
        note = ir.attr(self.func, ir.A_MASK_NOTE, "")
        if changed:
            what = f"-> {spec.describe()}" if spec is not None else ""
            note += (f"; sparsity policy {desc} applied {what}{extra}: this changes the "
                     "model's function")
            out[ir.A_EMPTY_ROWS] = "zero"
        else:
            note += f"; sparsity policy {desc} is exactly this site's own mask (unchanged)"
        out.update({A_SPARSITY: desc, A_SPARSITY_CHANGED: changed, ir.A_MASK_NOTE: note})
        return out


def _apply(func, attrs: dict):
    """``func`` with ``attrs`` set; a stale static mask is dropped when the spec is not static."""
    spec = attrs.get(ir.A_MASK_SPEC)
    if spec is not None and spec["kind"] != "static" and func.attrs is not None and (
            ir.A_STATIC_MASK in func.attrs):
        func = func.without_attr(ir.A_STATIC_MASK)
    return func.with_attrs(attrs)


@tvm.transform.module_pass(opt_level=0, name="InsertSparsity")
class InsertSparsity:
    """AND ``policy``'s mask into every attention site (module docstring)."""

    def __init__(self, policy: SparsityPolicy):
        for name in ("mask_spec", "describe"):
            if not callable(getattr(policy, name, None)):
                raise TypeError(f"InsertSparsity(policy): {type(policy).__name__} has no "
                                f"{name}() method (see attnforge.sparsity)")
        self.policy = policy

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sites = list(ir.iter_sites(mod))
        layers = getattr(self.policy, "layer_indices", None)
        if layers is not None:
            missing = sorted(i for i in layers if i >= len(sites))
            if missing:
                raise ValueError(f"sparsity policy {self.policy.describe()} names layers "
                                 f"{missing}, but the model has {len(sites)} attention sites "
                                 f"(layers 0..{len(sites) - 1})")
        results: dict = {}  # callee -> [(caller, var, attrs or None)]
        for layer, (caller, callee, call, var) in enumerate(sites):
            res = _SiteRewrite(mod[callee], call, self.policy, layer).attrs()
            results.setdefault(callee, []).append((caller, var, res))
        mod = mod.clone()  # never modify the caller's module in place
        retarget: dict = {}
        for callee, entries in results.items():
            if all(r is None for _, _, r in entries):
                continue
            base = mod[callee]
            first = entries[0][2]
            if first is not None:
                mod[callee] = _apply(base, first)
            for caller, var, res in entries[1:]:
                if res is None and first is None or (
                        res is not None and first is not None and _same(res, first)):
                    continue
                retarget[(caller, var)] = (base, res or {})
        return _retarget(mod, retarget) if retarget else mod
