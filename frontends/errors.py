"""Frontend exceptions and helpers that say where in the user's model an FX node came from.

Torch-free: the deployment runtime may import this module on a machine without torch.
"""

from __future__ import annotations

import re
from typing import Any

_HINT = ("register a converter via import_torch_model(..., custom_convert_map={name: fn}) "
         "(TVM's format: fn(node, importer) -> relax.Var) or report it")


class FrontendError(Exception):
    """Importing a PyTorch model into Relax failed.

    Attributes:
        op: the ATen op being converted when it failed (e.g. ``"aten.cumsum.default"``), if known.
        source: where that op came from in the model (module path and source line), if known.
    """

    def __init__(self, message: str, *, op: str | None = None, source: str | None = None):
        super().__init__(message)
        self.op = op
        self.source = source


class UnsupportedOpError(FrontendError):
    """The model uses ATen ops for which neither TVM nor attnforge has a converter.

    Attributes:
        ops: ``{op name: source}`` for every unsupported op (first occurrence each).
    """

    def __init__(self, ops: dict[str, str]):
        lines = [f"  {op}  (in {src})" for op, src in ops.items()]
        first = next(iter(ops))
        key = first.split(".", 1)[1] if first.startswith("aten.") else first
        msg = ("TVM's Relax importer has no converter for " + ", ".join(ops) + ":\n"
               + "\n".join(lines) + f"\nHint: {_HINT.replace('name', repr(key))}.")
        super().__init__(msg, op=first, source=ops[first])
        self.ops = dict(ops)


def op_name(node: Any) -> str:
    """Qualified name of an FX node's target, e.g. ``aten.softmax.int`` or ``cond``."""
    target = node.target
    name = str(target)
    if name.startswith("<"):  # plain Python callables (operator.getitem, ...)
        name = getattr(target, "__name__", name)
    return name


def module_path(node: Any) -> str:
    """The innermost ``nn_module_stack`` path of a node (``""`` for the root module).

    Normalises dynamo-style paths (``L['self'].h[0].attn``) to ``h.0.attn``.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".")


def source_line(node: Any) -> str:
    """``file:line`` of the user code that produced the node, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not found:
        return ""
    path, line = found[-1]
    return f"{path}:{line}"


def node_location(node: Any) -> str:
    """Human-readable location: module path (class) and source line."""
    stack = node.meta.get("nn_module_stack") or {}
    path = module_path(node)
    parts = []
    if stack:
        typ = list(stack.values())[-1][1]
        cls = typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1]
        parts.append(f"module {path or '<root>'} ({cls})")
    src = source_line(node)
    if src:
        parts.append(src)
    return ", ".join(parts) or f"node {node.name}"
