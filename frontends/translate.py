"""Translate a decomposed ExportedProgram to Relax with TVM's importer, guarded.

Around TVM's ``ExportedProgramImporter`` we add:

* attnforge's converters (:mod:`.converters`) and the user's ``custom_convert_map``;
* a check, before translation, that every op has a converter (:class:`UnsupportedOpError`
  naming each missing op and where it is in the model, instead of TVM's bare assert);
* a guard on every converter: an exception inside it becomes a :class:`FrontendError` naming
  the op and its module path, and the Relax result is checked against the fake tensor torch
  recorded for the node (dtype, rank and static dims), so a converter that types a result
  differently from eager PyTorch is caught where it happens, not at build time or as a silent
  wrong answer.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import tvm
import tvm_ffi
from torch import fx
from tvm import relax
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from .converters import CONVERTERS, meta_dtype
from .errors import FrontendError, UnsupportedOpError, node_location, op_name

ConvertFn = Callable[[fx.Node, Any], relax.Var]


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _graph_modules(gm: fx.GraphModule):
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def find_unsupported(ep: torch.export.ExportedProgram, keys) -> dict[str, str]:
    """``{qualified op name: location}`` of call_function nodes with no converter in ``keys``."""
    missing: dict[str, str] = {}
    for gm in _graph_modules(ep.graph_module):
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            key = getattr(node.target, "__name__", str(node.target))
            if key not in keys and op_name(node) not in missing:
                missing[op_name(node)] = node_location(node)
    return missing


def _torch_shape(val: torch.Tensor, importer: Any, symbols: dict) -> list | None:
    """The node's shape as ints / TIR exprs over ``main``'s shape vars; None if not expressible."""
    dims = []
    for d in val.shape:
        if isinstance(d, int):
            dims.append(d)
            continue
        try:
            name, derived = importer._process_derived_symbol(d.node.expr, dict(symbols))
        except Exception:  # noqa: BLE001 - an expression TVM's helper cannot map: no check
            return None
        if derived is None and name not in symbols:
            return None  # a symbol that is not a dim of any input (e.g. data-dependent)
        dims.append(derived if derived is not None else symbols[name])
    return dims


def _same_dim(got: Any, want: Any) -> bool:
    if isinstance(want, int):
        return isinstance(got, tvm.tirx.IntImm) and int(got) == want
    return got.same_as(want) or tvm_ffi.structural_equal(got, want)


def _check_result(node: fx.Node, out: Any, importer: Any, strict_dtypes: bool,
                  symbols: dict) -> Any:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(out, relax.Expr):
        return out
    ty = getattr(out, "ty", None)
    if not isinstance(ty, relax.TensorType):
        return out
    op, where = op_name(node), node_location(node)
    if ty.ndim >= 0 and ty.ndim != val.dim():
        raise FrontendError(f"TVM's converter for {op} at {where} gave a rank-{ty.ndim} result, "
                            f"torch computes rank {val.dim()} {tuple(val.shape)}; register a "
                            "converter via custom_convert_map or report it",
                            op=op, source=where)
    if isinstance(ty.shape, relax.ShapeExpr):
        got = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
        want = [d if isinstance(d, int) else None for d in val.shape]
        if any(g is not None and w is not None and g != w for g, w in zip(got, want, strict=True)):
            raise FrontendError(f"TVM's converter for {op} at {where} gave shape {got}, torch "
                                f"computes {want}", op=op, source=where)
    want_dtype = meta_dtype(node)
    if ty.dtype and want_dtype and ty.dtype != want_dtype:
        msg = (f"TVM's converter for {op} at {where} typed its result {ty.dtype}, torch computes "
               f"{want_dtype}")
        if strict_dtypes:
            raise FrontendError(msg + "; register a converter via custom_convert_map, or pass "
                                "strict_dtypes=False to cast the result", op=op, source=where)
        warnings.warn(msg + "; casting the result", stacklevel=2)
        out = importer.block_builder.emit(relax.op.astype(out, want_dtype))
    # Symbolic shapes: TVM may lose what torch knows (e.g. a slice of a length-128 buffer to
    # ``s`` gives ``min(s, 128)``, or an add of such operands has unknown shape), which later
    # blocks legalization.  torch guarantees the shape, so we state it with a reshape (a
    # no-copy view at run time; an R.match_cast here sent TVM 0.27's KillAfterLastUse into
    # unbounded recursion, a segfault, on BERT).
    if symbols and ty.ndim == val.dim():
        want = _torch_shape(val, importer, symbols)
        shape = ty.shape.values if isinstance(ty.shape, relax.ShapeExpr) else None
        if want is not None and (shape is None or not all(map(_same_dim, shape, want))):
            out = importer.block_builder.emit(relax.op.reshape(out, want))
    return out


def _guard(fn: Callable[[fx.Node], Any], importer: Any, strict_dtypes: bool, symbols: dict):
    @functools.wraps(fn)
    def convert(node: fx.Node):
        try:
            out = fn(node)
        except FrontendError:
            raise
        except Exception as e:
            op, where = op_name(node), node_location(node)
            raise FrontendError(f"converting {op} at {where} failed in TVM's importer: "
                                f"{_short(e)}", op=op, source=where) from e
        return _check_result(node, out, importer, strict_dtypes, symbols)

    return convert


def translate(
    ep: torch.export.ExportedProgram,
    custom_convert_map: dict[str, ConvertFn] | None = None,
    strict_dtypes: bool = True,
) -> tvm.IRModule:
    """Translate a Core-ATen ``ep`` to an IRModule whose ``main`` takes only the user inputs.

    Parameters are bound as constants and ``main`` returns a flat tuple of the user outputs.
    ``custom_convert_map`` uses TVM's format (``{"op.overload": fn(node, importer)}``) and
    overrides attnforge's converters, which override TVM's.
    """
    importer = ExportedProgramImporter()
    table = {**CONVERTERS, **(custom_convert_map or {})}
    for key, fn in table.items():
        importer.convert_map[key] = functools.partial(_call_custom, fn, importer)
    missing = find_unsupported(ep, importer.convert_map.keys())
    if missing:
        raise UnsupportedOpError(missing)
    symbols: dict[str, tvm.tirx.Var] = {}
    importer.create_input_vars = _recording_input_vars(importer.create_input_vars, symbols)
    importer.convert_map = {
        k: _guard(f, importer, strict_dtypes, symbols) if callable(f) else f
        for k, f in importer.convert_map.items()
    }
    try:
        return importer.from_exported_program(ep, False, False, False, None)
    except FrontendError:
        raise
    except Exception as e:
        raise FrontendError(f"TVM's importer failed: {_short(e)}") from e


def _recording_input_vars(create_input_vars: Callable, symbols: dict) -> Callable:
    """Wrap the importer's ``create_input_vars`` to record the TIR vars of the input shapes."""

    def create(ep):
        params, user_inputs, ranges = create_input_vars(ep)
        for var in user_inputs.values():
            shape = getattr(var.ty, "shape", None)
            for d in shape.values if isinstance(shape, relax.ShapeExpr) else ():
                if isinstance(d, tvm.tirx.Var):
                    symbols[d.name] = d
        return params, user_inputs, ranges

    return create


def _call_custom(fn: ConvertFn, importer: Any, node: fx.Node):
    return fn(node, importer)
