"""INT8 post-training quantisation: calibration and the INT8 pass sequence.

Calibration runs the fp32 module (after the attention passes, weights folded to constants) on
user batches with every matmul *site* input (see ``attnforge.passes._quant_ir``) added to the
outputs, and records a per-tensor range per site:

* ``method="minmax"`` (default): min / max over all batches. Chosen as the default because it
  never clips, is deterministic, needs no tuning knob and matches torch's default
  ``MinMaxObserver``; with the few calibration batches users have, percentile estimates of
  the tails are noisy.
* ``method="percentile"``: per batch the ``100 - p`` / ``p`` percentiles (``p=99.99``), then the
  extremes across batches; clips rare outliers for a finer step on the bulk.

Ranges become asymmetric uint8 parameters (:func:`qparams_from_range`): the range is widened to
contain 0 (zero is exact), a zero-width range (all-zero activations) gets ``scale=1, zp=0``,
a constant activation ``c`` gets ``[min(c, 0), max(c, 0)]``. NaN / inf in a calibration batch
raise ValueError naming the batch and the input; NaN / inf in an activation name the site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "calibrate",
    "check_int8_target",
    "int8_passes",
    "qparams_from_range",
    "quantize_int8",
    "site_names",
]

METHODS = ("minmax", "percentile")


def qparams_from_range(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 ``(scale, zero_point)`` covering ``[lo, hi]`` and 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"qparams_from_range: non-finite range [{lo}, {hi}]")
    if hi - lo <= 1e-30:
        return 1.0, 0
    scale = (hi - lo) / 255.0
    return scale, int(np.clip(np.round(-lo / scale), 0, 255))


def check_int8_target(target, cpuinfo: str | None = None) -> None:
    """Raise ``TargetError`` unless ``target`` is llvm and this CPU has AVX-512 VNNI.

    The INT8 kernel is ``vpdpbusd``-only; without VNNI it would fault at run time.
    """
    import pathlib

    from .errors import TargetError

    kind = str(target.kind.name) if hasattr(target, "kind") else str(target)
    if kind != "llvm":
        raise TargetError(f"precision='int8' is implemented for llvm (CPU) targets only, "
                          f"not {kind!r}; use precision='float16' on CUDA")
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if "avx512_vnni" not in cpuinfo:
        raise TargetError("precision='int8' needs a CPU with AVX-512 VNNI (avx512_vnni in "
                          "/proc/cpuinfo); this machine has none: use precision='float32'")


def _instrument(mod):
    """``main`` returning ``(original output, x_0, ..., x_{n-1})`` for the n site inputs."""
    from tvm import relax

    from attnforge.passes._quant_ir import site_calls

    mod = relax.transform.ToNonDataflow()(mod)
    func = mod["main"]
    xs = [c.args[0] for c in site_calls(func)]
    body = relax.SeqExpr(func.body.blocks, relax.Tuple([func.body.body, *xs]))
    ret_ty = relax.TupleType([func.body.body.ty, *[x.ty for x in xs]])
    new = relax.Function(func.params, body, ret_ty, is_pure=func.is_pure, attrs=func.attrs)
    mod["main"] = new
    return relax.transform.Normalize()(mod), len(xs)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_batch(b: int, batch, names: list[str]) -> list[np.ndarray]:
    arrays = [_as_numpy(x) for x in (batch if isinstance(batch, (list, tuple)) else (batch,))]
    if len(arrays) != len(names):
        raise ValueError(f"calibration batch {b} has {len(arrays)} inputs, the model takes "
                         f"{len(names)} ({', '.join(names)})")
    for name, a in zip(names, arrays):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"calibration batch {b}, input {name!r}: contains NaN or inf")
    return arrays


def calibrate(mod, batches: Sequence, target=None, *, method: str = "minmax",
              percentile: float = 99.99) -> dict[int, tuple[float, float]]:
    """Per-site activation ranges ``{site index: (lo, hi)}`` from running ``mod`` on ``batches``.

    ``mod``: a Relax module (fp32, weights as constants, ``FoldConstant`` applied); ``batches``:
    a non-empty sequence of input tuples (torch tensors or numpy arrays) for ``main``.
    """
    import tvm
    from tvm import relax

    from attnforge.schedules.cpu_schedule import cpu_build_pipeline

    if method not in METHODS:
        raise ValueError(f"calibrate: method={method!r}; choose one of {METHODS}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"calibrate: percentile={percentile} must be in (50, 100]")
    if len(batches) == 0:
        raise ValueError("calibrate: calibration_data is empty; pass at least one batch")
    names = [str(p.name) for p in mod["main"].params]
    checked = [_check_batch(b, batch, names) for b, batch in enumerate(batches)]
    inst, n_sites = _instrument(mod)
    if n_sites == 0:
        return {}
    target = target or tvm.target.Target({"kind": "llvm"})
    inst = cpu_build_pipeline(target)(inst)
    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(tvm.compile(inst, target=target), tvm.cpu())
    ranges: dict[int, tuple[float, float]] = {}
    for arrays in checked:
        outs = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        for i in range(n_sites):
            x = outs[len(outs) - n_sites + i].numpy()
            if not np.isfinite(x).all():
                raise ValueError(f"calibrate: the input of matmul site {i} has NaN/inf values")
            if method == "minmax":
                lo, hi = float(x.min()), float(x.max())
            else:
                lo, hi = (float(v) for v in np.percentile(x, [100.0 - percentile, percentile]))
            old = ranges.get(i, (lo, hi))
            ranges[i] = (min(old[0], lo), max(old[1], hi))
    return ranges


def site_names(model, mod) -> dict[int, str]:
    """``{site index: torch module name}`` by matching ``nn.Linear`` weights to site constants."""
    import torch

    from attnforge.passes._quant_ir import fp32_weight, site_calls

    linears = [(n, m.weight.detach().cpu().numpy().T) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    out = {}
    for i, call in enumerate(site_calls(mod["main"])):
        w = fp32_weight(call)
        if w is None:
            continue
        for name, wt in linears:
            if wt.shape == w.shape and np.array_equal(wt, w):
                out[i] = name
                break
    return out


def int8_passes(qparams: dict[int, tuple[float, int]], *, exclude=(),
                names: dict[int, str] | None = None, lower: bool = True):
    """QuantizeWeights -> InsertActivationQuantize -> FoldDequantizeQuantize -> [LowerInt8Matmul]."""
    import tvm

    from attnforge.passes.fold_dequantize_quantize import FoldDequantizeQuantize
    from attnforge.passes.insert_quantize import InsertActivationQuantize
    from attnforge.passes.lower_int8_matmul import LowerInt8Matmul
    from attnforge.passes.quantize_weights import QuantizeWeights

    return tvm.transform.Sequential(
        [
            # Phase 1: int8 weights per output channel (QDQ), excluded sites stay fp32.
            QuantizeWeights(exclude=exclude, names=names),
            # Phase 2: uint8 per-tensor activations from calibration, redundant pairs folded.
            InsertActivationQuantize(qparams),
            FoldDequantizeQuantize(),
            # Phase 3: fully quantised matmuls -> the VNNI kernel (call_tir).
            LowerInt8Matmul() if lower else tvm.transform.Sequential([]),
        ],
        name="attnforge.int8_passes",
    )


def quantize_int8(mod, batches: Sequence, target=None, *, exclude=(), model=None,
                  method: str = "minmax", percentile: float = 99.99):
    """Calibrate ``mod`` on ``batches`` and run :func:`int8_passes`; returns the new module.

    ``model`` (the torch module) enables names in ``exclude`` (e.g. ``"lm_head"``).
    """
    from tvm import relax

    mod = relax.transform.FoldConstant()(mod)
    names = site_names(model, mod) if model is not None else None
    ranges = calibrate(mod, batches, target, method=method, percentile=percentile)
    qparams = {i: qparams_from_range(lo, hi) for i, (lo, hi) in ranges.items()}
    return int8_passes(qparams, exclude=exclude, names=names)(mod)
