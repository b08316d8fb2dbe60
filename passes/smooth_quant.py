"""SmoothQuant: move activation range per input channel into the constant weight.

What it does
    For every site (``R.matmul(x, W)`` with a constant fp32 ``[K, N]`` weight, see
    :mod:`._quant_ir`) that has smoothing factors ``scales[index] = s`` (``[K]``, positive), the
    site becomes ``R.matmul(R.multiply(x, 1 / s), W')`` with the constant ``W' = s[:, None] * W``.
    In exact arithmetic nothing changes (``(x / s) @ (s W) = x @ W``); with
    ``s_k = max|x_k|^alpha / max|W_k|^(1 - alpha)`` (SmoothQuant, Xiao et al. 2023; computed by
    ``attnforge.quantization.smooth_scales`` from calibration) the activation's channels get
    flatter, so its per-tensor int8 step shrinks, and the weight's per-output-channel scales
    absorb the difference. Sites with the same input and the same ``s`` share one multiply.

    SmoothQuant folds ``1 / s`` into the preceding LayerNorm / RMSNorm weight. We insert the
    multiply instead: it fuses into the elementwise kernel that quantises ``x`` (FuseOps), so it
    costs no extra pass over memory, and it also works for sites with no norm in front
    (``o_proj``, ``down_proj``).

Preconditions: weights bound as constants (``FoldConstant``), fp32 sites not yet quantised.
Place: first INT8 pass, before :class:`QuantizeWeights`; calibrate the per-tensor activation
ranges on the smoothed module. Raises ValueError for a scale vector of the wrong shape or with a
non-positive / non-finite entry, naming the site.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._quant_ir import fp32_weight, rewrite_functions, site_calls

__all__ = ["SmoothQuant"]


def _check(index: int, s, k: int) -> np.ndarray:
    s = np.asarray(s, dtype=np.float32)
    if s.shape != (k,):
        raise ValueError(f"SmoothQuant: site {index} needs scales of shape ({k},) (one per "
                         f"input channel of its [K, N] weight), got {s.shape}")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"SmoothQuant: site {index} has non-positive or non-finite scales; "
                         "every smoothing factor must be finite and > 0")
    return s


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, todo: dict):
        super().__init__(mod)
        self.todo = todo  # site call -> (index, s)
        self.cache = {}

    def visit_call_(self, call):
        new = super().visit_call_(call)
        plan = self.todo.get(call)
        if plan is None:
            return new
        _, s = plan
        x = new.args[0]
        key = (x, s.tobytes())
        if key not in self.cache:
            inv = relax.const((1.0 / s).astype(np.float32))
            self.cache[key] = self.builder_.emit(relax.op.multiply(x, inv))
        w = (fp32_weight(call) * s[:, None]).astype(np.float32)
        return relax.op.matmul(self.cache[key], relax.const(w), out_dtype=new.attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="attnforge.SmoothQuant")
class SmoothQuant:
    """Per-input-channel smoothing of constant-weight matmul sites.

    Parameters
    ----------
    scales : ``{site index: s [K]}``; sites not listed are left alone.
    """

    def __init__(self, scales: dict[int, np.ndarray]):
        self.scales = {int(i): s for i, s in scales.items()}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make_rewriter(out, func):
            todo = {}
            for i, call in enumerate(site_calls(func)):
                w = fp32_weight(call)
                if i in self.scales and w is not None:
                    todo[call] = (i, _check(i, self.scales[i], w.shape[0]))
            return _Rewriter(out, todo) if todo else None

        return rewrite_functions(mod, make_rewriter)
