"""INT8 post-training quantisation: calibration and the INT8 pass sequence.

CPU (llvm, VNNI): u8 activations x s8 weights, below. CUDA (sm_75+): s8 weights as below,
symmetric s8 activations (per token, or per tensor ``max(|lo|, |hi|) / 127`` from the same
calibration) and ``LowerInt8MatmulCuda`` (int8 ``R.matmul`` for the tensor cores); the CPU twin
of a CUDA build uses the same lowering (``quantize_int8(numerics_of=...)``).

Activations (``quantize_int8(activations=...)``):

* ``"per_token"`` (default): one uint8 scale / zero point per row, computed at run time
  (:class:`~attnforge.passes.insert_dynamic_quantize.InsertDynamicQuantize`). Chosen as the
  default because per-tensor scales fail on causal attention outputs (``o_proj``'s input):
  early rows average few values and are large, late rows average hundreds and are tiny, so one
  step size wastes most of the 8 bits on the late rows. Random-weight Llama, hidden 512, seq
  512, held-out inputs: logits cosine 0.99655 -> 0.99957, next-token top-1 85.2% -> 94.6%, KL
  7e-4 -> 9e-5, for ~8% more time in a 512x1024x512 linear (min/max pass per row).
* ``"per_tensor"``: static scale / zero point per site from calibration, below.

Optional SmoothQuant (``smooth_alpha``, :class:`~attnforge.passes.smooth_quant.SmoothQuant`)
migrates per-channel activation range into the weights; it needs channel outliers to help
(trained LLMs have them; the random-weight test models do not, and there it changed nothing).

Calibration (per-tensor activations) runs the fp32 module (after the attention passes, weights
folded to constants) on user batches with every matmul *site* input (see
``attnforge.passes._quant_ir``) added to the outputs, and records a per-tensor range per site:

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

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "calibrate",
    "channel_absmax",
    "check_int8_target",
    "constant_bytes",
    "int8_passes",
    "qparams_from_range",
    "quantization_summary",
    "quantize_int8",
    "site_names",
    "smooth_scales",
    "symmetric_scale",
]

METHODS = ("minmax", "percentile")
ACTIVATIONS = ("per_tensor", "per_token", "none")


def qparams_from_range(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 ``(scale, zero_point)`` covering ``[lo, hi]`` and 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"qparams_from_range: non-finite range [{lo}, {hi}]")
    if hi - lo <= 1e-30:
        return 1.0, 0
    scale = (hi - lo) / 255.0
    return scale, int(np.clip(np.round(-lo / scale), 0, 255))


def constant_bytes(mod) -> int:
    """Bytes of the distinct tensor constants (the weights) held by ``mod``'s Relax functions."""
    import tvm
    from tvm import relax

    seen: dict = {}

    def visit(expr):
        if isinstance(expr, tvm.ir.expr.Constant):
            value = getattr(expr, "value", None)
            if isinstance(value, tvm.runtime.Tensor):  # not scalar IntImm / FloatImm constants
                bits = tvm.runtime.DataType(str(value.dtype)).bits
                seen[expr] = int(np.prod(value.shape)) * bits // 8  # keyed by object identity

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sum(seen.values())


def check_int8_target(target, cpuinfo: str | None = None) -> None:
    """Raise ``TargetError`` unless ``target`` can run the INT8 kernels.

    llvm: this CPU must have AVX-512 VNNI (the kernel is ``vpdpbusd``-only; without VNNI it
    would fault at run time). CUDA: ``arch`` must be sm_75 or newer (int8 tensor-core
    ``mma``; built by dlight's ``MatmulInt8Tensorization``).
    """
    import pathlib

    from .errors import TargetError

    kind = str(target.kind.name) if hasattr(target, "kind") else str(target)
    if kind == "cuda":
        arch = str(target.attrs.get("arch", ""))
        num = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
        if num is None or int(num.group(1)) < 75:
            raise TargetError(f"precision='int8' on CUDA needs int8 tensor cores: arch sm_75 "
                              f"or newer, got arch={arch!r}; use target='cuda:sm_80' (or newer) "
                              "or precision='float16'")
        return
    if kind != "llvm":
        raise TargetError(f"precision='int8' is implemented for llvm (CPU) and cuda targets "
                          f"only, not {kind!r}")
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if "avx512_vnni" not in cpuinfo:
        raise TargetError("precision='int8' needs a CPU with AVX-512 VNNI (avx512_vnni in "
                          "/proc/cpuinfo); this machine has none: use precision='float32'")


def _is_cuda(target) -> bool:
    return target is not None and str(getattr(getattr(target, "kind", None), "name", "")) == "cuda"


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


def _check_batches(batches: Sequence, mod) -> list[list[np.ndarray]]:
    if len(batches) == 0:
        raise ValueError("calibrate: calibration_data is empty; pass at least one batch")
    names = [str(p.name) for p in mod["main"].params]
    return [_check_batch(b, batch, names) for b, batch in enumerate(batches)]


def _site_activations(mod, batches: Sequence, target):
    """Yield, per calibration batch, the list of every site's input (numpy, fp32)."""
    import tvm
    from tvm import relax

    from attnforge.schedules.cpu_schedule import cpu_build_pipeline

    checked = _check_batches(batches, mod)
    inst, n_sites = _instrument(mod)
    if n_sites == 0:
        return
    target = target or tvm.target.Target({"kind": "llvm"})
    inst = cpu_build_pipeline(target)(inst)
    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(tvm.compile(inst, target=target), tvm.cpu())
    for arrays in checked:
        outs = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        xs = [outs[len(outs) - n_sites + i].numpy() for i in range(n_sites)]
        for i, x in enumerate(xs):
            if not np.isfinite(x).all():
                raise ValueError(f"calibrate: the input of matmul site {i} has NaN/inf values")
        yield xs


def calibrate(mod, batches: Sequence, target=None, *, method: str = "minmax",
              percentile: float = 99.99) -> dict[int, tuple[float, float]]:
    """Per-site activation ranges ``{site index: (lo, hi)}`` from running ``mod`` on ``batches``.

    ``mod``: a Relax module (fp32, weights as constants, ``FoldConstant`` applied); ``batches``:
    a non-empty sequence of input tuples (torch tensors or numpy arrays) for ``main``.
    """
    if method not in METHODS:
        raise ValueError(f"calibrate: method={method!r}; choose one of {METHODS}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"calibrate: percentile={percentile} must be in (50, 100]")
    ranges: dict[int, tuple[float, float]] = {}
    for xs in _site_activations(mod, batches, target):
        for i, x in enumerate(xs):
            if method == "minmax":
                lo, hi = float(x.min()), float(x.max())
            else:
                lo, hi = (float(v) for v in np.percentile(x, [100.0 - percentile, percentile]))
            old = ranges.get(i, (lo, hi))
            ranges[i] = (min(old[0], lo), max(old[1], hi))
    return ranges


def channel_absmax(mod, batches: Sequence, target=None) -> dict[int, np.ndarray]:
    """Per-site, per-input-channel ``max |x[..., k]|`` over ``batches`` (``{site: [K]}``)."""
    out: dict[int, np.ndarray] = {}
    for xs in _site_activations(mod, batches, target):
        for i, x in enumerate(xs):
            a = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            out[i] = np.maximum(out[i], a) if i in out else a
    return out


def smooth_scales(mod, absmax: dict[int, np.ndarray], alpha: float = 0.5,
                  sites=None) -> dict[int, np.ndarray]:
    """SmoothQuant factors ``s_k = a_k^alpha / w_k^(1 - alpha)`` per site (``[K]`` each).

    ``a_k``: the activation's channel absmax (:func:`channel_absmax`); ``w_k = max_n |W[k, n]|``.
    Sites reading the same input share ``w_k`` (max over their weights), hence the same ``s``
    and one multiply. Channels that are zero in the activation or the weight get ``s_k = 1``.
    ``sites``: the site indices to smooth (default: all with a constant fp32 weight).
    """
    from attnforge.passes._quant_ir import fp32_weight, site_calls

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_scales: alpha={alpha} must be in [0, 1]")
    calls = site_calls(mod["main"])
    groups: dict = {}
    for i, call in enumerate(calls):
        if (sites is None or i in sites) and i in absmax and fp32_weight(call) is not None:
            groups.setdefault(call.args[0], []).append(i)
    out = {}
    for members in groups.values():
        w = np.max([np.abs(fp32_weight(calls[i])).max(axis=1) for i in members], axis=0)
        a = np.max([absmax[i] for i in members], axis=0)
        ok = (a > 0) & (w > 0)
        s = np.ones_like(a, dtype=np.float64)
        s[ok] = a[ok].astype(np.float64) ** alpha / w[ok].astype(np.float64) ** (1.0 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        out.update({i: s for i in members})
    return out


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
                names: dict[int, str] | None = None, lower: bool = True,
                per_token: bool = False):
    """QuantizeWeights -> InsertActivationQuantize -> [InsertDynamicQuantize] ->
    FoldDequantizeQuantize -> [LowerInt8Matmul].

    ``per_token``: quantise the activations of the sites without ``qparams`` per token at run
    time (:class:`InsertDynamicQuantize`) instead of leaving them fp32 (weight-only).
    """
    import tvm

    from attnforge.passes.fold_dequantize_quantize import FoldDequantizeQuantize
    from attnforge.passes.insert_dynamic_quantize import InsertDynamicQuantize
    from attnforge.passes.insert_quantize import InsertActivationQuantize
    from attnforge.passes.lower_int8_matmul import LowerInt8Matmul
    from attnforge.passes.quantize_weights import QuantizeWeights

    none = tvm.transform.Sequential([])
    return tvm.transform.Sequential(
        [
            # Phase 1: int8 weights per output channel (QDQ), excluded sites stay fp32.
            QuantizeWeights(exclude=exclude, names=names),
            # Phase 2: uint8 activations: per tensor from calibration, or per token at run
            # time; redundant pairs folded.
            InsertActivationQuantize(qparams),
            InsertDynamicQuantize() if per_token else none,
            FoldDequantizeQuantize(),
            # Phase 3: fully quantised matmuls -> the VNNI kernel (call_tir).
            LowerInt8Matmul() if lower else none,
        ],
        name="attnforge.int8_passes",
    )


def quantization_summary(mod, ranges: dict, qparams: dict, excluded: set[int],
                         names: dict[int, str] | None, *, method: str, percentile: float,
                         n_batches: int) -> dict:
    """JSON-ready description of the quantisation (``cm.report`` / artifact manifest).

    Per site: its name, the weight shape ``[K, N]``, the per-channel weight-scale summary
    (min / mean / max over the N channels; the scales themselves live in the library) and the
    activation ``(scale, zero_point)`` with the calibrated range, or ``"excluded": True``.
    """
    from attnforge.passes._quant_ir import fp32_weight, site_calls
    from attnforge.passes.quantize_weights import quantize_weight

    names = names or {}
    sites = []
    for i, call in enumerate(site_calls(mod["main"])):
        w = fp32_weight(call)
        entry = {"site": i, "name": names.get(i),
                 "weight_shape": None if w is None else list(w.shape)}
        if i in excluded or w is None:
            entry["excluded"] = True
            sites.append(entry)
            continue
        _, ws = quantize_weight(w)
        entry["weight"] = {"dtype": "int8", "scheme": "symmetric per output channel",
                           "scale_min": float(ws.min()), "scale_mean": float(ws.mean()),
                           "scale_max": float(ws.max())}
        if i in qparams:
            scale, zp = qparams[i]
            entry["activation"] = {"dtype": "uint8", "scheme": "asymmetric per tensor",
                                   "scale": float(scale), "zero_point": int(zp),
                                   "range": [float(v) for v in ranges[i]]}
        sites.append(entry)
    return {
        "scheme": "int8 post-training: s8 weights per output channel, u8 activations per "
                  "tensor, int32 accumulation (VNNI vpdpbusd)",
        "calibration": {"method": method, "batches": n_batches,
                        **({"percentile": percentile} if method == "percentile" else {})},
        "excluded": [{"site": s["site"], "name": s["name"]} for s in sites
                     if s.get("excluded")],
        "sites": sites,
    }


DEFAULT_EXCLUDE = ("lm_head",)


def quantize_int8(mod, batches: Sequence, target=None, *, exclude=None, model=None,
                  method: str = "minmax", percentile: float = 99.99,
                  smooth_alpha: float | None = None, activations: str = "per_token",
                  summary: dict | None = None, numerics_of=None):
    """Calibrate ``mod`` on ``batches`` and run :func:`int8_passes`; returns the new module.

    CUDA (``numerics_of`` or else ``target`` a cuda target): symmetric s8 activations and
    :class:`~attnforge.passes.lower_int8_matmul_cuda.LowerInt8MatmulCuda` (int8 ``R.matmul``
    for tensor cores) instead of the VNNI lowering; with ``target`` llvm and ``numerics_of``
    cuda this is the CPU twin of the CUDA build (same Relax program, TVM's generic lowering).

    ``model`` (the torch module) enables names in ``exclude`` (e.g. ``"lm_head"``);
    ``exclude=None``: the names in :data:`DEFAULT_EXCLUDE` that the model has.
    ``smooth_alpha``: run :class:`SmoothQuant` with this migration strength first (one extra
    calibration pass for the per-channel maxima); None: no smoothing.
    ``activations``: ``"per_tensor"`` (static scale / zero point from calibration) or
    ``"per_token"`` (per-row scale / zero point computed at run time; no range calibration)
    or ``"none"`` (diagnostic: int8-rounded weights, fp32 activations and math; the weights
    fold back to fp32 constants, so no speed or memory gain: the accuracy ceiling of the
    int8 weights alone).
    ``summary``: a dict filled with :func:`quantization_summary` (method, scales, exclusions).
    """
    from tvm import relax

    from attnforge.passes._quant_ir import resolve_exclude, site_calls
    from attnforge.passes.smooth_quant import SmoothQuant

    cuda = _is_cuda(numerics_of if numerics_of is not None else target)
    if _is_cuda(target):  # calibration runs on this CPU
        from .target import host_target

        target = host_target()
    mod = relax.transform.FoldConstant()(mod)
    names = site_names(model, mod) if model is not None else None
    if exclude is None:
        exclude = [n for n in DEFAULT_EXCLUDE if n in (names or {}).values()]
    n_sites = len(site_calls(mod["main"]))
    excluded = resolve_exclude(exclude, n_sites, names) if n_sites else set()
    if smooth_alpha is not None:
        absmax = channel_absmax(mod, batches, target)
        keep = set(range(n_sites)) - excluded
        mod = SmoothQuant(smooth_scales(mod, absmax, smooth_alpha, sites=keep))(mod)
    if activations not in ACTIVATIONS:
        raise ValueError(f"quantize_int8: activations={activations!r}; choose one of "
                         f"{ACTIVATIONS}")
    per_token = activations == "per_token"
    if activations != "per_tensor":
        _check_batches(batches, mod)  # the same input checks as a calibration run
        ranges = {}
    else:
        ranges = calibrate(mod, batches, target, method=method, percentile=percentile)
    qparams = {i: qparams_from_range(lo, hi) for i, (lo, hi) in ranges.items()}
    if summary is not None:
        summary.update(quantization_summary(
            mod, ranges, qparams, excluded, names, method=method, percentile=percentile,
            n_batches=len(batches)))
        summary["smoothing"] = None if smooth_alpha is None else {
            "method": "SmoothQuant (per input channel, multiply fused into the quantize op)",
            "alpha": float(smooth_alpha)}
        if activations != "per_tensor":
            summary["calibration"] = {"method": "none: no activation ranges needed",
                                      "batches": len(batches)}
            act = ({"dtype": "uint8", "scheme": "asymmetric per token (dynamic)"} if per_token
                   else {"dtype": "float32", "scheme": "not quantised (weight-only diagnostic)"})
            for site in summary["sites"]:
                if not site.get("excluded"):
                    site["activation"] = dict(act)
    if cuda:
        return _quantize_cuda(mod, ranges, exclude, names, activations, summary)
    out = int8_passes(qparams, exclude=exclude, names=names, per_token=per_token)(mod)
    if summary is not None:  # what really became the VNNI kernel (e.g. not symbolic shapes)
        from attnforge.passes.lower_int8_matmul import KERNEL_SYMBOL

        text = out["main"].script(show_meta=False)
        summary["vnni_matmuls"] = len(re.findall(rf"R\.call_tir\((cls\.)?{KERNEL_SYMBOL}", text))
    return out


def symmetric_scale(lo: float, hi: float) -> float:
    """Symmetric int8 activation scale ``max(|lo|, |hi|) / 127`` (1 for an all-zero range)."""
    amax = max(abs(float(lo)), abs(float(hi)))
    if not np.isfinite(amax):
        raise ValueError(f"symmetric_scale: non-finite range [{lo}, {hi}]")
    return amax / 127.0 if amax > 1e-30 else 1.0


def _quantize_cuda(mod, ranges: dict, exclude, names, activations: str,
                   summary: dict | None):
    """QuantizeWeights -> LowerInt8MatmulCuda (symmetric s8 activations, int8 ``R.matmul``)."""
    import tvm

    from attnforge.passes.lower_int8_matmul_cuda import LowerInt8MatmulCuda
    from attnforge.passes.quantize_weights import QuantizeWeights

    if activations == "none":
        raise ValueError("quantize_int8: activations='none' is a CPU diagnostic; on CUDA "
                         "use 'per_token' or 'per_tensor'")
    scales = {i: symmetric_scale(lo, hi) for i, (lo, hi) in ranges.items()}
    out = tvm.transform.Sequential([QuantizeWeights(exclude=exclude, names=names),
                                    LowerInt8MatmulCuda(scales)])(mod)
    if summary is not None:
        summary["scheme"] = ("int8 post-training: s8 weights per output channel, symmetric s8 "
                             "activations, int32 accumulation (R.matmul s8 x s8 -> s32; "
                             "int8 tensor cores via dlight on CUDA)")
        for site in summary["sites"]:
            if site.get("excluded"):
                continue
            i = site["site"]
            site["activation"] = (
                {"dtype": "int8", "scheme": "symmetric per tensor", "scale": scales[i],
                 "range": [float(v) for v in ranges[i]]} if i in scales
                else {"dtype": "int8", "scheme": "symmetric per token (dynamic)"})
        text = out["main"].script(show_meta=False)
        summary["vnni_matmuls"] = 0
        summary["int8_matmuls"] = len(re.findall(r'out_dtype="int32"', text))
    return out
