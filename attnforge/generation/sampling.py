"""Next-token choice from one row of logits: greedy, or sampling with temperature / top-k /
top-p applied in Hugging Face's order (temperature, then top-k, then top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.top_k is not None and self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """``logits`` ``[V]`` -> token id."""
    if not params.do_sample:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    if params.top_k is not None and params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = np.searchsorted(cum, params.top_p) + 1  # smallest prefix with mass >= top_p
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
