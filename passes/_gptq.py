"""GPTQ rounding of a ``[K, N]`` weight to int8 with fixed per-output-channel scales.

GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") rounds the input rows of ``W`` one at a time and spreads each row's
rounding error over the rows not yet rounded, weighted by the inverse of the layer's input
Hessian ``H = X^T X`` (``X``: calibration inputs ``[tokens, K]``), so that the *output* error
``||X W - X W_q||`` shrinks, not the weight error. Only the integer values change: the scales
stay ``max_k |W[k, n]| / 127`` and the result stays in ``[-127, 127]``, so the int8 kernels are
unchanged. This is the reference algorithm (lazy batched updates in blocks of 128 rows,
Cholesky form of ``H^-1``, damping ``1%`` of the mean diagonal) without ``act_order``, with
two deviations: the Hessian comes from the fp32 model's inputs (every layer from one
calibration run, not layer by layer through the already-quantised layers), and an input
channel that is zero in all calibration data is rounded to nearest instead of being set to 0
(held-out inputs may use it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["gptq_inverse", "gptq_round", "output_error"]


def gptq_inverse(hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of the damped ``H^-1`` (row i: how input row i's rounding error is
    spread over the later rows); ``damp`` is a fraction of the mean diagonal."""
    if not np.isfinite(hessian).all():
        raise ValueError("gptq_round: the Hessian has NaN/inf values")
    h = np.array(hessian, dtype=np.float64)
    k = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_round(w: np.ndarray, scale: np.ndarray, hessian: np.ndarray, *,
               damp: float = 0.01, block: int = 128,
               hinv: np.ndarray | None = None) -> np.ndarray:
    """int8 ``[K, N]`` for fp32 ``w [K, N]``, per-column ``scale [N]`` and ``hessian [K, K]``
    (``hinv``: a precomputed :func:`gptq_inverse` of it, for several weights on one input)."""
    k, n = w.shape
    if scale.shape != (n,) or hessian.shape != (k, k):
        raise ValueError(f"gptq_round: weight {w.shape} needs scale ({n},) and hessian "
                         f"({k}, {k}), got {scale.shape} and {hessian.shape}")
    if not np.isfinite(w).all():
        raise ValueError("gptq_round: the weight has NaN/inf values")
    if hinv is None:
        hinv = gptq_inverse(hessian, damp)
    work = np.array(w, dtype=np.float64)
    s = scale.astype(np.float64)
    q = np.zeros((k, n), np.int8)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        errs = np.zeros((i1 - i0, n))
        for j in range(i0, i1):
            qj = np.clip(np.round(work[j] / s), -127, 127)
            q[j] = qj
            err = (work[j] - qj * s) / hinv[j, j]
            work[j + 1:i1] -= hinv[j, j + 1:i1, None] * err[None, :]
            errs[j - i0] = err
        work[i1:] -= hinv[i0:i1, i1:].T @ errs
    return q


def output_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, hessian: np.ndarray) -> float:
    """``trace(D^T H D)`` with ``D = q * scale - w``: the summed squared output error
    ``||X (W_q - W)||^2`` on the calibration inputs that built ``H``."""
    d = q.astype(np.float64) * scale.astype(np.float64) - w.astype(np.float64)
    return float(np.sum(d * (np.asarray(hessian, dtype=np.float64) @ d)))
