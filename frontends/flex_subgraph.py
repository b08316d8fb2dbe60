"""FlexAttention ``score_mod`` / ``mask_mod`` FX subgraphs -> TIR expressions / compile-time masks.

torch.export keeps ``flex_attention`` as a higher-order op whose ``score_mod(score, b, h, q_idx,
kv_idx, *captured)`` and ``mask_mod(b, h, q_idx, kv_idx, *captured)`` are FX subgraphs of plain
ATen ops on 0-dim tensors.  Both are checked against one list of element-wise ops
(:data:`SUPPORTED_OPS`); captured tensors must be compile-time values (parameters, buffers,
constants), since a kernel cannot take a data-dependent element rule from a run-time input.

* :func:`score_mod_to_tir` translates the score mod op by op into one TIR expression (types
  follow the fake tensors torch recorded on each node, so promotion matches eager), captured
  tensors become buffers of a scalar PrimFunc (the form of
  :mod:`attnforge.schedules.attention_score_mod`), read with indices clamped into range;
* :func:`evaluate_mask_mod` runs the mask mod once with broadcast index tensors (what
  ``create_mask`` does) and returns the bool keep-mask ``[Bm, Hm, Nq, Nk]``.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from torch import fx
from tvm import tirx

from .errors import UnsupportedOpError, node_location

__all__ = ["FlexSubgraphError", "SUPPORTED_OPS", "evaluate_mask_mod", "score_mod_to_tir"]

_BIN = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "minimum": tirx.min, "maximum": tirx.max}
_CMP = {"eq": tirx.EQ, "ne": tirx.NE, "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}
_LOGIC = {"bitwise_and": tirx.all, "logical_and": tirx.all,
          "bitwise_or": tirx.any, "logical_or": tirx.any}
_UNARY_FLOAT = {"tanh": tirx.tanh, "exp": tirx.exp, "log": tirx.log, "sqrt": tirx.sqrt,
                "rsqrt": tirx.rsqrt, "sigmoid": tirx.sigmoid, "sin": tirx.sin, "cos": tirx.cos,
                "exp2": tirx.exp2, "log2": tirx.log2, "erf": tirx.erf}
#: ATen op packets (``aten.<name>``) a score_mod / mask_mod may use.
SUPPORTED_OPS = frozenset(
    [*_BIN, *_CMP, *_LOGIC, *_UNARY_FLOAT, "div", "floor_divide", "remainder", "neg", "abs",
     "where", "clamp", "pow", "reciprocal", "sign", "bitwise_not", "logical_not", "_to_copy",
     "scalar_tensor", "index", "clone", "alias", "lift_fresh_copy", "detach",
     "bitwise_xor", "logical_xor", "floor", "ceil", "round", "full"])


class FlexSubgraphError(UnsupportedOpError):
    """A score_mod / mask_mod uses an op or value the compiler cannot translate."""

    def __init__(self, what: str, op: str, where: str, hint: str):
        Exception.__init__(self, f"flex_attention {what}: {op} (at {where}) is not supported: "
                           f"{hint}")
        self.op, self.source, self.ops = op, where, {op: where}


def _packet(node: fx.Node) -> str:
    return str(node.target).split(".")[1] if str(node.target).startswith("aten.") else ""


def check_ops(gm: fx.GraphModule, what: str, site: str) -> None:
    """Raise :class:`FlexSubgraphError` for the first op outside :data:`SUPPORTED_OPS`."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and _packet(node) not in SUPPORTED_OPS:
            raise FlexSubgraphError(
                what, str(node.target), site,
                "write it with element-wise tensor ops (arithmetic, comparisons, &, |, ~, "
                "torch.where, tanh/exp/..., indexing a captured constant tensor); supported: "
                + ", ".join(sorted(SUPPORTED_OPS)))


def _tir_dtype(dt: torch.dtype) -> str:
    s = str(dt).removeprefix("torch.")
    return {"bool": "bool"}.get(s, s)


def _meta_dtype(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    return _tir_dtype(val.dtype) if isinstance(val, torch.Tensor) else None


def _promote(*dts: str) -> str:
    floats = [d for d in dts if d.startswith(("float", "bfloat"))]
    if floats:
        return "float64" if "float64" in floats else "float32"
    ints = [d for d in dts if d.startswith(("int", "uint"))]
    if ints:
        return "int64" if "int64" in ints else "int32"
    return "bool"


def _dt(x) -> str:
    """dtype of a TIR expression (this TVM keeps it on the expression's type)."""
    return str(x.ty.dtype)


def _cast(x, dt: str):
    return x if _dt(x) == dt else tirx.Cast(dt, x)


class _ScoreTranslator:
    def __init__(self, gm: fx.GraphModule, captured: list[np.ndarray], site: str):
        self.gm, self.site = gm, site
        self.score = tirx.Var("score", "float32")
        self.idx = [tirx.Var(n, "int32") for n in ("b", "h", "q_idx", "kv_idx")]
        self.buffers = [tirx.decl_buffer(a.shape, str(a.dtype), f"captured{i}")
                        for i, a in enumerate(captured)]
        self.env: dict = {}
        self.captured: set = set()  # placeholder nodes of captured tensors

    def fail(self, node, hint):
        raise FlexSubgraphError("score_mod", str(node.target), self.site, hint)

    def val(self, a):
        if isinstance(a, fx.Node):
            v = self.env[a]
            if a in self.captured:
                raise FlexSubgraphError("score_mod", f"captured tensor {a.name}", self.site,
                                        "captured tensors can only be indexed")
            return v
        if isinstance(a, bool):
            return tirx.const(a, "bool")
        if isinstance(a, int):
            return tirx.const(a, "int32" if abs(a) < 2**31 else "int64")
        if isinstance(a, float):
            return tirx.const(a, "float32")
        raise FlexSubgraphError("score_mod", f"argument {a!r}", self.site,
                                "only tensors and Python numbers are supported")

    def run(self) -> tirx.PrimFunc:
        places = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node, v in zip(places, [self.score, *self.idx, *self.buffers], strict=True):
            self.env[node] = v
        self.captured = set(places[5:])
        out = None
        for node in self.gm.graph.nodes:
            if node.op == "call_function":
                self.env[node] = self.op(node)
            elif node.op == "output":
                out = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else \
                    self.val(node.args[0])
            elif node.op != "placeholder":
                self.fail(node, f"FX node kind {node.op!r} inside score_mod")
        body = tirx.Return(_cast(out, "float32"))
        params = [self.score, *self.idx, *self.buffers]
        return tirx.PrimFunc(params, body, tvm.ir.PrimType("float32"))

    def op(self, node: fx.Node):  # noqa: C901 - one dispatch table, kept flat
        name, out_dt = _packet(node), _meta_dtype(node)
        args = node.args
        if name in ("clone", "alias", "lift_fresh_copy", "detach"):
            return self.val(args[0])
        if name == "scalar_tensor":
            dt = _tir_dtype(node.kwargs.get("dtype") or torch.float32)
            return tirx.const(args[0], dt)
        if name == "full":  # 0-dim constants, e.g. flex's noop mask_mod
            if list(args[0]):
                self.fail(node, "only 0-dim torch.full constants are supported")
            return tirx.const(args[1], out_dt or "float32")
        if name == "_to_copy":
            return _cast(self.val(args[0]), out_dt or _dt(self.val(args[0])))
        if name == "index":
            return self.index(node)
        if name in _UNARY_FLOAT:
            return _UNARY_FLOAT[name](_cast(self.val(args[0]), "float32"))
        if name in ("neg", "abs", "floor", "ceil", "round", "sign", "reciprocal",
                    "bitwise_not", "logical_not"):
            x = self.val(args[0])
            if name == "neg":
                return -x
            if name == "abs":
                return tirx.abs(x)
            if name in ("floor", "ceil", "round"):
                return getattr(tirx, name)(x) if _dt(x).startswith("float") else x
            if name == "sign":
                zero = tirx.const(0, _dt(x))
                return tirx.Select(x > zero, tirx.const(1, _dt(x)),
                                   tirx.Select(x < zero, tirx.const(-1, _dt(x)), zero))
            if name == "reciprocal":
                return tirx.const(1.0, "float32") / _cast(x, "float32")
            return tirx.Not(x) if _dt(x) == "bool" else ~x
        if name == "where":
            c, a, b = self.val(args[0]), self.val(args[1]), self.val(args[2])
            dt = out_dt or _promote(_dt(a), _dt(b))
            return tirx.Select(_cast(c, "bool"), _cast(a, dt), _cast(b, dt))
        if name == "clamp":
            x = self.val(args[0])
            dt = out_dt or _dt(x)
            x = _cast(x, dt)
            lo = args[1] if len(args) > 1 else node.kwargs.get("min")
            hi = args[2] if len(args) > 2 else node.kwargs.get("max")
            if lo is not None:
                x = tirx.max(x, _cast(self.val(lo), dt))
            if hi is not None:
                x = tirx.min(x, _cast(self.val(hi), dt))
            return x
        a, b = self.val(args[0]), self.val(args[1])
        if name in _CMP:
            dt = _promote(_dt(a), _dt(b))
            return _CMP[name](_cast(a, dt), _cast(b, dt))
        if name in _LOGIC or name in ("bitwise_xor", "logical_xor"):
            if _dt(a) == "bool" and _dt(b) == "bool" or name.startswith("logical"):
                a, b = _cast(a, "bool"), _cast(b, "bool")
                if name.endswith("xor"):  # bool != bool miscompiles on llvm (fcmp on i1)
                    return tirx.any(tirx.all(a, tirx.Not(b)), tirx.all(tirx.Not(a), b))
                return _LOGIC[name](a, b)
            dt = _promote(_dt(a), _dt(b))
            a, b = _cast(a, dt), _cast(b, dt)
            return {"bitwise_and": a & b, "bitwise_or": a | b, "bitwise_xor": a ^ b}[name]
        dt = out_dt or _promote(_dt(a), _dt(b))
        if name in _BIN:
            alpha = node.kwargs.get("alpha")
            if alpha is not None and name in ("add", "sub"):
                b = b * self.val(alpha)
            return _BIN[name](_cast(a, dt), _cast(b, dt))
        if name == "div":
            mode = node.kwargs.get("rounding_mode")
            if mode is None:
                return _cast(a, dt) / _cast(b, dt)
            if dt.startswith("float"):
                q = _cast(a, dt) / _cast(b, dt)
                return tirx.floor(q) if mode == "floor" else tirx.trunc(q)
            fn = tirx.floordiv if mode == "floor" else tirx.truncdiv
            return fn(_cast(a, dt), _cast(b, dt))
        if name == "floor_divide":
            if dt.startswith("float"):
                return tirx.floor(_cast(a, dt) / _cast(b, dt))
            return tirx.floordiv(_cast(a, dt), _cast(b, dt))
        if name == "remainder":
            return tirx.floormod(_cast(a, dt), _cast(b, dt))
        if name == "pow":
            return tirx.power(_cast(a, "float32"), _cast(b, "float32"))
        self.fail(node, "no TIR translation for this op")
        return None

    def index(self, node: fx.Node):
        base = self.env.get(node.args[0]) if node.args[0] in self.captured else None
        if base is None:
            self.fail(node, "only captured constant tensors can be indexed")
        idx = list(node.args[1])
        if len(idx) != len(base.shape) or any(i is None for i in idx):
            self.fail(node, f"index a captured tensor of rank {len(base.shape)} with exactly "
                            f"{len(base.shape)} scalar indices")
        clamped = []
        for i, dim in zip(idx, base.shape, strict=True):
            v = _cast(self.val(i), "int32")
            v = tirx.Select(v < 0, v + dim, v)  # Python-style negative indices
            clamped.append(tirx.max(tirx.min(v, dim - 1), 0))  # ragged tails read in range
        return tirx.BufferLoad(base, clamped)


def score_mod_to_tir(gm: fx.GraphModule, captured: list[np.ndarray], site: str):
    """Translate a score_mod subgraph (see module docstring) into a scalar TIR PrimFunc."""
    check_ops(gm, "score_mod", site)
    return _ScoreTranslator(gm, captured, site).run()


def evaluate_mask_mod(gm: fx.GraphModule, captured: list[np.ndarray], shape: tuple,
                      site: str) -> np.ndarray:
    """Bool keep-mask ``[Bm, Hm, Nq, Nk]`` (Bm in {1, B}, Hm in {1, H}) of a mask_mod."""
    check_ops(gm, "mask_mod", site)
    B, H, Nq, Nk = shape
    idx = [torch.arange(n, dtype=torch.int32).view(*[n if d == i else 1 for d in range(4)])
           for i, n in enumerate((B, H, Nq, Nk))]
    bufs = [torch.from_numpy(np.ascontiguousarray(a)) for a in captured]
    try:
        with torch.no_grad():
            out = gm(*idx, *bufs)
    except Exception as e:  # noqa: BLE001 - reported with the site
        raise FlexSubgraphError("mask_mod", "evaluation", site,
                                f"{type(e).__name__}: {str(e)[:300]}") from e
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise FlexSubgraphError("mask_mod", "result", site, "a mask_mod must return a bool")
    out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
    full = (out.shape[0], out.shape[1], Nq, Nk)
    return torch.broadcast_to(out, full).numpy().copy()


def node_site(node: fx.Node) -> str:
    """Where a flex_attention node is in the user's model."""
    return node_location(node)
