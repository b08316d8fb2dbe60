"""Name ``main``'s symbolic shape vars after the user's ``torch.export.Dim`` objects.

torch.export names symbols ``s0``, ``s27``...; the user wrote ``Dim("seq")``.  We align the
``dynamic_shapes`` spec with the example inputs, read each dynamic dim's symbol from the
exported placeholders, and rebind the TIR vars (and the bound attributes) of ``main``.
Best effort and cosmetic: anything we cannot align keeps torch's symbol name.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import tvm
from tvm import relax


def _per_tensor_specs(model, args: tuple, kwargs: dict, dynamic_shapes: Any) -> list:
    """One dim spec (dict / list / None) per tensor input, in the exported input order."""
    if isinstance(dynamic_shapes, dict):
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        return [dynamic_shapes.get(name) for name in bound]
    specs = list(dynamic_shapes)
    return specs + [None] * (len(args) + len(kwargs) - len(specs))


def dim_names(ep: torch.export.ExportedProgram, model, args: tuple, kwargs: dict,
              dynamic_shapes: Any) -> dict[str, str]:
    """``{torch symbol name: Dim name}`` for the dynamic dims of the user inputs."""
    if dynamic_shapes is None:
        return {}
    specs = _per_tensor_specs(model, args, kwargs, dynamic_shapes)
    user = [n for n in ep.graph.nodes if n.op == "placeholder"
            and n.name in set(ep.graph_signature.user_inputs)]
    names: dict[str, str] = {}
    for node, spec in zip(user, specs, strict=False):
        if isinstance(spec, (list, tuple)):
            spec = dict(enumerate(spec))
        val = node.meta.get("val")
        if not isinstance(spec, dict) or not isinstance(val, torch.Tensor):
            continue
        for i, dim in spec.items():
            name = getattr(dim, "__name__", None)
            size = val.shape[i]
            if name and isinstance(size, torch.SymInt):
                names.setdefault(str(size.node.expr), name)
    return names


def rename_shape_vars(mod: tvm.IRModule, names: dict[str, str]) -> tvm.IRModule:
    """Rebind ``main``'s TIR vars ``{old: new}`` and its ``tir_var_*_bound`` attributes."""
    func = mod["main"]
    names = {o: n for o, n in names.items() if o != n}
    if not names or len(set(names.values())) != len(names):
        return mod
    func = func.bind_symbolic_vars({o: tvm.tirx.Var(n, "int64") for o, n in names.items()})
    for key in ("tir_var_lower_bound", "tir_var_upper_bound"):
        bounds = func.attrs.get(key) if func.attrs is not None else None
        if bounds is not None:
            func = func.with_attr(key, {names.get(str(k), str(k)): int(v)
                                        for k, v in bounds.items()})
    mod["main"] = func
    return relax.transform.Normalize()(mod)
