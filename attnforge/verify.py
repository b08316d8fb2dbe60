"""Numerical comparison of compiled outputs against eager PyTorch.

Error measure per output: ``max|got - ref| / max|ref|`` (relative to the output's scale, so
near-zero elements do not dominate) and the plain max abs error.  NaNs must sit at the same
places in both (PyTorch gives NaN for fully masked rows of a hand-written softmax).
"""

from __future__ import annotations

import numpy as np

from .errors import VerificationError

# Relative tolerance by precision (max-abs error over max-abs reference).
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2, "int8": 1e-1}


def compare(ref: list[np.ndarray], got: list[np.ndarray], names: list[str], rtol: float) -> dict:
    """Compare flat output lists; returns the verification dict (``passed`` etc.)."""
    outputs = []
    first_bad = None
    if len(ref) != len(got):
        return {"passed": False, "rtol": rtol, "outputs": [], "first_mismatch": None,
                "error": f"eager model gave {len(ref)} outputs, compiled model {len(got)}"}
    for name, r, g in zip(names, ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        entry = {"name": name, "shape": list(r.shape)}
        if r.shape != g.shape:
            entry.update(passed=False, error=f"shape {list(g.shape)} != eager {list(r.shape)}")
        else:
            nan_r, nan_g = np.isnan(r), np.isnan(g)
            nan_ok = bool((nan_r == nan_g).all())
            diff = np.abs(np.where(nan_r | nan_g, 0.0, r - g))
            scale = float(np.max(np.abs(np.where(nan_r, 0.0, r)), initial=0.0))
            max_abs = float(diff.max(initial=0.0))
            rel = max_abs / scale if scale > 0 else max_abs
            entry.update(max_abs_err=max_abs, max_rel_err=rel, nan_match=nan_ok,
                         passed=bool(nan_ok and rel <= rtol))
        outputs.append(entry)
        if not entry["passed"] and first_bad is None:
            first_bad = name
    return {
        "passed": first_bad is None,
        "rtol": rtol,
        "max_abs_err": max((o.get("max_abs_err", float("inf")) for o in outputs), default=0.0),
        "max_rel_err": max((o.get("max_rel_err", float("inf")) for o in outputs), default=0.0),
        "first_mismatch": first_bad,
        "outputs": outputs,
    }


def raise_if_failed(verification: dict) -> None:
    if verification.get("passed"):
        return
    bad = verification.get("first_mismatch")
    detail = next((o for o in verification.get("outputs", []) if o["name"] == bad), {})
    msg = verification.get("error") or (
        f"compiled output {bad!r} differs from eager PyTorch: max rel. error "
        f"{detail.get('max_rel_err', float('nan')):.3g} (tolerance {verification['rtol']:g}), "
        f"max abs. error {detail.get('max_abs_err', float('nan')):.3g}"
        + ("" if detail.get("nan_match", True) else ", NaNs at different places")
        + (f"; {detail['error']}" if "error" in detail else ""))
    raise VerificationError(msg + ". Report it with the model; compile with verify=False to "
                            "inspect the result anyway.", verification)
