"""Accuracy of a compiled model against fp32 eager PyTorch on held-out inputs.

Reported in ``cm.report["accuracy"]`` for every precision: max / mean absolute error and cosine
similarity per output, and for language-model logits (float ``[..., vocab]`` outputs named
``logits``) the top-1 agreement of next-token predictions and the mean KL divergence
KL(eager || compiled) of the next-token distributions over all positions.
"""

from __future__ import annotations

import numpy as np


def held_out_inputs(example_inputs, seed: int = 1234):
    """Fresh inputs shaped like the examples: integers drawn from the examples' own value range
    (token ids stay inside the vocabulary), floats from N(0, 1) matched to the examples' scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for x in example_inputs:
        if x.dtype.is_floating_point:
            std = float(x.float().std()) if x.numel() > 1 else 1.0
            out.append((torch.randn(x.shape, generator=g) * (std or 1.0)).to(x.dtype))
        elif x.dtype == torch.bool:
            out.append(x.clone())
        else:
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype))
    return tuple(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def accuracy_metrics(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> dict:
    """Per-output error metrics (see module docstring)."""
    outputs = []
    for name, r, g in zip(names, ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        diff = np.abs(r - g)
        denom = np.linalg.norm(r) * np.linalg.norm(g)
        entry = {"name": name, "max_abs_err": float(diff.max(initial=0.0)),
                 "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
                 "cosine": float((r * g).sum() / denom) if denom > 0 else float(r.size == 0)}
        if name == "logits" and r.ndim >= 2:
            entry["top1_agreement"] = float((r.argmax(-1) == g.argmax(-1)).mean())
            lp, lq = _log_softmax(r), _log_softmax(g)
            entry["kl_divergence"] = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
        outputs.append(entry)
    return {"outputs": outputs,
            "min_cosine": min((o["cosine"] for o in outputs), default=1.0)}
