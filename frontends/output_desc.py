"""Torch-free description of a model's output structure, for deployment without torch.

:func:`describe_treespec` turns the ``TreeSpec`` of an ExportedProgram's outputs into JSON;
:func:`unflatten_outputs` rebuilds nested tuples / lists / dicts from the flat outputs of the
compiled ``main``.  HF ``ModelOutput`` objects become ``{"kind": "dict", "type": ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def describe_treespec(spec: Any) -> dict:
    """JSON description of a ``torch.utils._pytree.TreeSpec`` (duck-typed, no torch import).

    ``{"kind": "tensor"}`` for a leaf, ``{"kind": "none"}``, ``{"kind": "tuple" | "list", "n": k,
    "items": [...]}`` and ``{"kind": "dict", "keys": [...], "type": "ClassName", "items": [...]}``.
    Every node also carries ``"n_leaves"``, its number of flat outputs.
    """
    if spec.is_leaf():
        return {"kind": "tensor", "n_leaves": 1}
    typ = spec.type
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    items = [describe_treespec(c) for c in children]
    n_leaves = sum(i["n_leaves"] for i in items)
    if typ is type(None):
        return {"kind": "none", "n_leaves": 0}
    keys = spec.context
    if isinstance(keys, (list, tuple)) and typ not in (tuple, list) and (
            issubclass(typ, dict) or all(isinstance(k, str) for k in keys)) and len(keys) == len(
            items) and not hasattr(typ, "_fields"):
        return {"kind": "dict", "keys": [str(k) for k in keys], "type": typ.__name__,
                "items": items, "n_leaves": n_leaves}
    kind = "list" if issubclass(typ, list) else "tuple"
    desc = {"kind": kind, "n": len(items), "items": items, "n_leaves": n_leaves}
    if typ not in (tuple, list):
        desc["type"] = typ.__name__
        if hasattr(typ, "_fields"):
            desc["fields"] = list(typ._fields)
    return desc


def unflatten_outputs(desc: dict, flat: Sequence[Any]) -> Any:
    """Rebuild the output structure from ``main``'s flat outputs (plain tuple/list/dict)."""
    it = iter(flat)

    def build(d: dict) -> Any:
        kind = d["kind"]
        if kind == "tensor":
            return next(it)
        if kind == "none":
            return None
        if kind == "dict":
            return {k: build(c) for k, c in zip(d["keys"], d["items"], strict=True)}
        vals = [build(c) for c in d["items"]]
        return vals if kind == "list" else tuple(vals)

    out = build(desc)
    if next(it, None) is not None:
        raise ValueError(f"got more outputs than the description's {desc['n_leaves']}")
    return out
