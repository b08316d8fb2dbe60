"""Entry point: PyTorch module + example inputs -> Relax IRModule (:func:`import_torch_model`).

Steps: ``torch.export`` (non-strict, eval mode, ``no_grad``) -> our decomposition
(:mod:`.decompose`) -> TVM's importer with our converters and guards (:mod:`.translate`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import tvm
from torch import fx

from .decompose import decompose
from .dim_names import dim_names, rename_shape_vars
from .errors import FrontendError, module_path
from .flex_attention import prepare_flex_attention
from .output_desc import describe_treespec
from .translate import ConvertFn, translate

_ATTENTION_OPS = ("softmax", "scaled_dot_product", "flex_attention")


@dataclass
class ImportedModel:
    """Result of :func:`import_torch_model`.

    Attributes:
        mod: IRModule; ``main`` takes only the user inputs (weights are bound constants) and
            returns a flat tuple of tensors.
        input_specs: one ``{"name", "shape", "dtype"}`` dict per ``main`` input; symbolic dims
            are the names (str) of the TIR vars in ``main``'s signature: the user's
            ``Dim`` names where they can be aligned, else torch's (``s27``).
        output_spec: ``TreeSpec`` of the eager output; ``tree_unflatten(outputs, output_spec)``
            rebuilds it (HF ``ModelOutput``, tuple, tensor).
        output_desc: torch-free JSON description of the same (:mod:`.output_desc`), plus
            ``"treespec"`` (``treespec_dumps``) when torch can serialise it.
        attention_sources: module path of each softmax / SDPA node, in graph order.
        exported_program: the decomposed ExportedProgram that was translated.
    """

    mod: tvm.IRModule
    input_specs: list[dict]
    output_spec: Any
    output_desc: dict
    attention_sources: list[str] = field(default_factory=list)
    exported_program: torch.export.ExportedProgram | None = None


def _check_tensors(args: Any, kwargs: dict | None) -> tuple[tuple, dict]:
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise FrontendError(f"example_inputs must be a tensor or a tuple of tensors, got "
                            f"{type(args).__name__}")
    kwargs = dict(kwargs or {})
    named = [(f"example_inputs[{i}]", a) for i, a in enumerate(args)]
    named += [(f"example_kwargs[{k!r}]", v) for k, v in kwargs.items()]
    for where, val in named:
        if not isinstance(val, torch.Tensor):
            raise FrontendError(f"{where} has type {type(val).__name__}, but only tensors can be "
                                "model inputs; fix non-tensor arguments with functools.partial "
                                "or a wrapper module")
    return tuple(args), kwargs


def _export(model, args, kwargs, dynamic_shapes) -> torch.export.ExportedProgram:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs=kwargs or None,
                                       dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise FrontendError(f"torch.export failed on {type(model).__name__}: "
                            f"{type(e).__name__}: {str(e)[:1500]}") from e
    finally:
        model.train(was_training)


def _input_specs(mod: tvm.IRModule) -> list[dict]:
    specs = []
    for p in mod["main"].params:
        ty = p.ty
        shape = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else str(d)
                      for d in ty.shape.values)
        specs.append({"name": p.name, "shape": shape, "dtype": str(ty.dtype)})
    return specs


def attention_sources(graph: fx.Graph) -> list[str]:
    """Module path of every softmax / SDPA / flex-attention node, in graph order."""
    out = []
    for node in graph.nodes:
        name = str(getattr(node.target, "__name__", ""))
        is_attention = any(k in name for k in _ATTENTION_OPS) and "backward" not in name
        if node.op == "call_function" and is_attention:
            out.append(module_path(node))
    return out


def _output_desc(spec) -> dict:
    desc = describe_treespec(spec)
    with contextlib.suppress(Exception):
        from torch.utils import _pytree

        desc["treespec"] = _pytree.treespec_dumps(spec)
    return desc


def import_torch_model(
    model: torch.nn.Module,
    example_inputs: Any,
    dynamic_shapes: Any = None,
    *,
    example_kwargs: dict | None = None,
    custom_convert_map: dict[str, ConvertFn] | None = None,
    strict_dtypes: bool = True,
) -> ImportedModel:
    """Import a PyTorch model into Relax.

    Args:
        model: a ``torch.nn.Module``; exported in eval mode (its mode is restored after).
        example_inputs: a tensor or a tuple of tensors (positional arguments).
        dynamic_shapes: ``torch.export``'s ``dynamic_shapes`` (e.g.
            ``({1: torch.export.Dim("seq", min=2, max=128)},)``); symbolic dims become TIR
            vars of ``main`` (named after the ``Dim``) and appear by name in ``input_specs``.
        example_kwargs: optional keyword tensor inputs (they follow the positional ones).
        custom_convert_map: extra converters in TVM's format ``{"op.overload": fn(node,
            importer) -> relax.Var}``; they override attnforge's and TVM's.
        strict_dtypes: raise when a converter's result dtype differs from torch's (default);
            ``False`` casts the result and warns.

    Raises:
        FrontendError: non-tensor inputs, export failures, importer failures (naming the op and
            module it failed on).
        UnsupportedOpError: ops without a converter, each with its module path.
    """
    if not isinstance(model, torch.nn.Module):
        raise FrontendError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _check_tensors(example_inputs, example_kwargs)
    ep = _export(model, args, kwargs, dynamic_shapes)
    out_spec = ep.call_spec.out_spec
    try:
        ep = decompose(ep)
    except Exception as e:
        raise FrontendError(f"decomposing the exported program to Core ATen failed: "
                            f"{type(e).__name__}: {str(e)[:1500]}") from e
    custom_convert_map = {**prepare_flex_attention(ep), **(custom_convert_map or {})}
    mod = translate(ep, custom_convert_map, strict_dtypes)
    with contextlib.suppress(Exception):  # cosmetic: Dim("seq") -> "seq", not torch's "s27"
        mod = rename_shape_vars(mod, dim_names(ep, model, args, kwargs, dynamic_shapes))
    return ImportedModel(
        mod=mod,
        input_specs=_input_specs(mod),
        output_spec=out_spec,
        output_desc=_output_desc(out_spec),
        attention_sources=attention_sources(ep.graph),
        exported_program=ep,
    )
