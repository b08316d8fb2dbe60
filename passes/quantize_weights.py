"""QuantizeWeights: constant matmul weights -> int8 per output channel (symmetric) + scales.

What it does
    Every site (``R.matmul(x, W)`` with a constant fp32 ``[K, N]`` weight, see
    :mod:`._quant_ir`) not excluded becomes ``R.matmul(x, R.dequantize(Wq, s, 0, axis=1))`` with
    ``s[n] = max_k |W[k, n]| / 127`` (an all-zero column gets ``s = 1``) and
    ``Wq = clip(round(W / s), -127, 127)`` as int8 constants. The graph still computes in fp32
    (QDQ form); :class:`LowerInt8Matmul` later turns quantised sites into the VNNI kernel.
    ``exclude`` keeps sites in fp32: indices (negative count from the end, ``-1`` is the last
    matmul, normally the LM head) or names resolved through ``names`` ``{index: name}``
    (``attnforge.quantization.site_names`` derives them from the torch model).
    ``hessians`` ``{index: H [K, K]}`` (``X^T X`` of the site's calibration inputs; damping per
    site in ``damping``): those sites get GPTQ rounding (:mod:`._gptq`: same scales, same
    ``[-127, 127]`` range, smaller output error) instead of round-to-nearest.

Preconditions: weights bound as constants and folded to ``[K, N]`` (``FoldConstant`` after
import). Place: after the attention passes, before :class:`InsertActivationQuantize`.
Raises ValueError for a weight with NaN / inf or a Hessian of the wrong shape, naming the site.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._gptq import gptq_inverse, gptq_round
from ._quant_ir import fp32_weight, resolve_exclude, rewrite_functions, site_calls

__all__ = ["QuantizeWeights", "quantize_weight"]


def quantize_weight(w: np.ndarray, hessian: np.ndarray | None = None, damp: float = 0.01,
                    hinv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """fp32 ``[K, N]`` -> ``(int8 [K, N], fp32 scale [N])``, symmetric per column; rounded to
    nearest, or by GPTQ given the input Hessian ``[K, K]`` (damping ``damp``; ``hinv``: its
    precomputed ``gptq_inverse``)."""
    amax = np.abs(w).max(axis=0).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    if hessian is not None:
        return gptq_round(w, scale, hessian, damp=damp, hinv=hinv), scale
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, todo: dict, hessians: dict, damping: dict):
        super().__init__(mod)
        self.todo = todo  # site call -> index
        self.hessians, self.damping = hessians, damping
        self.inverses = {}  # (id(H), damping) -> gptq_inverse: sites on one input share H

    def visit_call_(self, call):
        new = super().visit_call_(call)
        index = self.todo.get(call)
        if index is None:
            return new
        w = fp32_weight(call)
        if not np.isfinite(w).all():
            raise ValueError(f"QuantizeWeights: matmul site {index} has a NaN/inf weight")
        try:
            h, damp, hinv = self.hessians.get(index), self.damping.get(index, 0.01), None
            if h is not None and h.shape == (w.shape[0],) * 2:
                key = (id(h), damp)
                hinv = self.inverses.get(key)
                if hinv is None:
                    hinv = self.inverses[key] = gptq_inverse(h, damp)
            q, scale = quantize_weight(w, h, damp, hinv)
        except ValueError as err:
            raise ValueError(f"QuantizeWeights: matmul site {index}: {err}") from None
        dq = self.builder_.emit(relax.op.dequantize(
            relax.const(q), relax.const(scale), relax.const(0, "int8"), axis=1,
            out_dtype="float32"))
        return relax.op.matmul(new.args[0], dq, out_dtype=new.attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="attnforge.QuantizeWeights")
class QuantizeWeights:
    """Per-output-channel symmetric int8 weights (QDQ form) for constant-weight matmuls.

    Parameters
    ----------
    exclude : site indices or names to keep in fp32.
    names : ``{site index: name}`` for name-based exclusion (and nicer errors).
    hessians : ``{site index: H [K, K]}``: GPTQ rounding for those sites.
    damping : ``{site index: fraction of H's mean diagonal}`` for GPTQ (default 0.01).
    """

    def __init__(self, exclude=(), names: dict[int, str] | None = None,
                 hessians: dict | None = None, damping: dict | None = None):
        self.exclude, self.names = tuple(exclude), names
        self.hessians = {int(i): np.asarray(h) for i, h in (hessians or {}).items()}
        self.damping = {int(i): float(d) for i, d in (damping or {}).items()}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            sites = site_calls(func)
            skip = resolve_exclude(self.exclude, len(sites), self.names) if sites else set()
            todo = {c: i for i, c in enumerate(sites)
                    if i not in skip and fp32_weight(c) is not None}
            return _Rewriter(out, todo, self.hessians, self.damping) if todo else None

        return rewrite_functions(mod, make_rewriter)
