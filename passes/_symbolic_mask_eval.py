"""Evaluate compile-time mask subgraphs whose shapes are symbolic, at sample lengths.

A mask built from iotas with a symbolic extent (HF's causal mask under ``torch.export``
dynamic shapes: ``arange(0, seq)`` ... ``less_equal``) does not depend on run-time data but
has no single array.  ``evaluate_at_samples`` builds the subgraph once (the function's own
parameters define the symbolic vars; placeholder inputs) and runs it at a few lengths; the
caller classifies each array and keeps a structure only when every sample agrees.  This is a check at the
sampled lengths, not a proof: a mask whose *rule* changes with the length (not seen in the
models we import) would be misclassified between samples, so the samples include the
declared upper bound (capped) where there is one.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm.sym
from tvm import relax

from . import _attention_ir as ir

__all__ = ["evaluate_at_samples", "sample_lengths", "sample_values", "substitute_dim"]

_SAMPLES = (67, 200)  # one non-multiple of 64 above a block, one above three blocks
_MAX_SAMPLE = 1024  # cap of the sampled upper bound (the evaluated mask is L x L)


def sample_lengths(func) -> list[int]:
    """Lengths at which to evaluate: the lower bound, two fixed ones, the upper bound (capped)."""
    lo, hi = 1, None
    if func.attrs is not None:
        lows = ir.to_py(func.attrs.get("tir_var_lower_bound", {})) or {}
        highs = ir.to_py(func.attrs.get("tir_var_upper_bound", {})) or {}
        lo = max([1] + [int(v) for v in lows.values()])
        hi = min([int(v) for v in highs.values()], default=None)
    lo = max(lo, 3)  # lengths 1-2 are degenerate (a causal 1x1 mask is also full)
    out = [lo] + [s for s in _SAMPLES if s > lo]
    if hi is not None:
        out = [s for s in out if s <= hi] + [min(hi, _MAX_SAMPLE)]
    else:
        out.append(_MAX_SAMPLE)
    return sorted(set(out))


def substitute_dim(expr, values: dict) -> int:
    """A symbolic dim with its vars set to ``values`` ({tir var: int}), as an int."""
    if isinstance(expr, int):
        return expr
    ana = tvm.sym.Analyzer()
    for var, val in values.items():
        ana.bind(var, val)
    e = ana.simplify(expr)
    if not isinstance(e, tvm.tirx.IntImm):
        raise ValueError(f"symbolic dim {expr} does not reduce to a constant at {values}")
    return int(e.value)


def evaluate_at_samples(func, exprs: list, lengths: list[int]) -> tuple[list, list]:
    """Run the constant subgraphs computing ``exprs`` with every symbolic var set to each of
    ``lengths``; returns ``(per-length lists of arrays, per-length {var: value})``."""
    bindings = ir.bindings_computing(func, exprs)
    # The bindings are reused as they are (their types keep the shape facts the importer
    # proved, e.g. from the lower bound); re-emitting them loses those and breaks cumsum.
    out = relax.Var("masks", relax.TupleType([e.ty for e in exprs]))
    block = relax.DataflowBlock(list(bindings) + [relax.VarBinding(out, relax.Tuple(exprs))])
    main = relax.Function(list(func.params), relax.SeqExpr([block], out), out.ty)
    if func.attrs is not None:
        main = main.with_attrs({k: func.attrs[k] for k in func.attrs.keys()
                                if k.startswith("tir_var_")})
    ex = tvm.compile(tvm.IRModule({"main": main}), target=tvm.target.Target({"kind": "llvm"}))
    fn = relax.VirtualMachine(ex, tvm.cpu())["main"]
    values = sample_values(func, lengths)
    arrays = []
    for vals in values:
        args = []
        for p in func.params:  # placeholder inputs: the masks do not read them
            if not isinstance(p.ty, relax.TensorType) or p.ty.shape is None:
                raise ValueError(f"parameter {p.name} is not a tensor of known rank")
            shape = [substitute_dim(d, vals) for d in p.ty.shape.values]
            args.append(tvm.runtime.tensor(np.zeros(shape, dtype=str(p.ty.dtype))))
        res = fn(*args)
        arrays.append([res[i].numpy() for i in range(len(exprs))])
    return arrays, values


def sample_values(func, lengths: list[int]) -> list[dict]:
    """``{tir var: value}`` per sample length: every symbolic var of ``func`` set to it."""
    sym = list(relax.analysis.defined_symbolic_vars(func))
    return [{v: tvm.tirx.const(n, v.ty.dtype) for v in sym} for n in lengths]
