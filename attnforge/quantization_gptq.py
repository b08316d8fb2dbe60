"""Which int8 weights get GPTQ rounding, and with what damping: chosen on held-back calibration.

GPTQ (``passes/_gptq.py``) minimises a layer's output error on the inputs its Hessian was built
from. With the few calibration batches users have (here 8 x 512 tokens for K up to 1024),
``X^T X`` is a noisy estimate, and on the random-weight Llama plain GPTQ (damping 1%) *raised*
the held-out output error of some layers (second MLP's ``down_proj`` by 30%, the LM head by 6%)
while lowering others'. So the calibration batches are split (even batches fit, odd batches
validate), every site tries round-to-nearest and GPTQ at each damping in :data:`DAMPINGS` fitted
on the even half, keeps the one with the smallest output error on the odd half, and the chosen
GPTQ setting is refitted on all batches. Needs >= 2 batches and >= K fit rows; otherwise the
site keeps round-to-nearest (the reason is in the report).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DAMPINGS", "gptq_plan"]

DAMPINGS = (0.1, 1.0)


def gptq_plan(grams: dict, tokens: dict, weights: dict[int, np.ndarray]):
    """``(hessians, damping, notes)`` for ``QuantizeWeights``.

    ``grams``: ``{site: (H_fit, H_val)}`` (``X^T X`` of the even / odd calibration batches; sites
    reading one input may share the arrays); ``tokens``: ``{site: (rows_fit, rows_val)}``;
    ``weights``: ``{site: fp32 [K, N]}`` of the sites to quantise. ``notes[site]`` says what
    was chosen and the validation output error relative to round-to-nearest.
    """
    from attnforge.passes._gptq import gptq_inverse, gptq_round, output_error
    from attnforge.passes.quantize_weights import quantize_weight

    hessians, damping, notes = {}, {}, {}
    inverses: dict = {}  # (id(H_fit), damp) -> gptq_inverse: q/k/v share their input
    totals: dict = {}
    for i, w in weights.items():
        k = w.shape[0]
        if i not in grams:
            continue
        (h_fit, h_val), (n_fit, n_val) = grams[i], tokens[i]
        if n_val == 0 or n_fit < k:
            notes[i] = {"rounding": "nearest", "reason": (
                f"GPTQ needs >= 2 calibration batches and >= K = {k} rows in the fitting half "
                f"(got {n_fit} + {n_val} rows)")}
            continue
        q, scale = quantize_weight(w)
        base = output_error(w, q, scale, h_val)
        best, best_err = None, base
        for d in DAMPINGS:
            key = (id(h_fit), d)
            if key not in inverses:
                inverses[key] = gptq_inverse(h_fit, d)
            err = output_error(w, gptq_round(w, scale, h_fit, hinv=inverses[key]), scale, h_val)
            if err < best_err:
                best, best_err = d, err
        ratio = round(best_err / base, 4) if base > 0 else 1.0
        if best is None:
            notes[i] = {"rounding": "nearest", "reason": "no GPTQ damping lowered the "
                        "validation output error", "validation_error_vs_nearest": 1.0}
            continue
        hessians[i] = totals.setdefault(id(h_fit), h_fit + h_val)
        damping[i] = best
        notes[i] = {"rounding": "gptq", "damping": best, "validation_error_vs_nearest": ratio}
    return hessians, damping, notes
