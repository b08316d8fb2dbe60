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

Weights: s8 per output channel; GPTQ rounding by default (``weight_rounding="gptq"``,
:mod:`attnforge.quantization_gptq` decides per site on held-back calibration batches; the
Hessians come from the same calibration run). Embedding tables: s8 with one scale per
:data:`EMBEDDING_GROUP` values (``embeddings="int8"``, :class:`QuantizeEmbedding`). Measured
on the random-weight Llama (``benchmarks/precision_cpu.py``, ``docs/architecture.md``): both
together keep the accuracy of the previous default (round-to-nearest, fp32 table) while the
module's constants shrink 9.42 -> 7.94 MB.

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
    "calibration_stats",
    "channel_absmax",
    "check_int8_target",
    "constant_bytes",
    "int8_passes",
    "qparams_from_range",
    "quantization_summary",
    "quantize_int8",
    "site_names",
    "smooth_scales",
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
    return calibration_stats(mod, batches, target, method=method, percentile=percentile)[0]


def calibration_stats(mod, batches: Sequence, target=None, *, method: str | None = "minmax",
                      percentile: float = 99.99, hessians: bool = False):
    """One calibration run: ``(ranges, grams, tokens)``.

    ``ranges``: as :func:`calibrate` (empty when ``method`` is None); ``grams``: per site
    ``(X^T X over the even batches, over the odd batches)`` (float64 ``[K, K]``; sites whose
    input is the same tensor share the arrays), for GPTQ and its validation (empty unless
    ``hessians``); ``tokens``: per site, the input rows seen in the even / odd batches.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"calibrate: method={method!r}; choose one of {METHODS}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"calibrate: percentile={percentile} must be in (50, 100]")
    ranges: dict[int, tuple[float, float]] = {}
    group: dict[int, int] = {}  # site -> first site reading the same tensor (q/k/v share one)
    sums: dict[int, list] = {}  # group -> [X^T X of even batches, of odd batches]
    tokens: dict[int, list] = {}
    for b, xs in enumerate(_site_activations(mod, batches, target)):
        for i, x in enumerate(xs):
            rows = x.reshape(-1, x.shape[-1])
            tokens.setdefault(i, [0, 0])[b % 2] += rows.shape[0]
            if hessians:
                if b == 0:
                    group[i] = next((j for j in range(i) if group[j] == j and
                                     xs[j].shape == x.shape and np.array_equal(xs[j], x)), i)
                if group[i] == i:
                    pair = sums.setdefault(i, [0.0, 0.0])
                    # fp32 GEMM per batch, summed over batches in fp64: GPTQ damps H by
                    # >= 10% of its mean diagonal, far above fp32 rounding
                    rows32 = rows.astype(np.float32)
                    pair[b % 2] = pair[b % 2] + (rows32.T @ rows32).astype(np.float64)
            if method is None:
                continue
            if method == "minmax":
                lo, hi = float(x.min()), float(x.max())
            else:
                lo, hi = (float(v) for v in np.percentile(x, [100.0 - percentile, percentile]))
            old = ranges.get(i, (lo, hi))
            ranges[i] = (min(old[0], lo), max(old[1], hi))
    grams = {i: sums[g] for i, g in group.items()}
    return ranges, grams, tokens


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
                per_token: bool = False, hessians: dict | None = None,
                damping: dict | None = None, embeddings: bool = False,
                embedding_group: int | None = None):
    """[QuantizeEmbedding] -> QuantizeWeights -> InsertActivationQuantize ->
    [InsertDynamicQuantize] -> FoldDequantizeQuantize -> [LowerInt8Matmul].

    ``per_token``: quantise the activations of the sites without ``qparams`` per token at run
    time (:class:`InsertDynamicQuantize`) instead of leaving them fp32 (weight-only).
    ``hessians``: ``{site: X^T X}``, GPTQ rounding for those sites' weights (``damping``
    per site).
    ``embeddings``: store constant gather tables in int8 per row (:class:`QuantizeEmbedding`).
    """
    import tvm

    from attnforge.passes.fold_dequantize_quantize import FoldDequantizeQuantize
    from attnforge.passes.insert_dynamic_quantize import InsertDynamicQuantize
    from attnforge.passes.insert_quantize import InsertActivationQuantize
    from attnforge.passes.lower_int8_matmul import LowerInt8Matmul
    from attnforge.passes.quantize_embedding import QuantizeEmbedding
    from attnforge.passes.quantize_weights import QuantizeWeights

    none = tvm.transform.Sequential([])
    return tvm.transform.Sequential(
        [
            # Phase 1: int8 weights per output channel (QDQ; GPTQ rounding where a Hessian
            # is given), excluded sites stay fp32; int8 embedding tables.
            QuantizeEmbedding(embedding_group) if embeddings else none,
            QuantizeWeights(exclude=exclude, names=names, hessians=hessians, damping=damping),
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


WEIGHT_ROUNDINGS = ("gptq", "nearest")
# int8 embedding rows: one scale per 32 values (vs one per row: 1.9x lower output error from the
# table on the random Llama and BERT, for 12.5% more bytes on the table)
EMBEDDING_GROUP = 32
EMBEDDINGS = ("int8", "float32")


def _gptq(grams: dict, tokens: dict, mod, excluded: set[int]):
    from attnforge.passes._quant_ir import fp32_weight, site_calls

    from .quantization_gptq import gptq_plan

    weights = {i: fp32_weight(c) for i, c in enumerate(site_calls(mod["main"]))
               if i not in excluded and fp32_weight(c) is not None}
    return gptq_plan(grams, tokens, weights)


def quantize_int8(mod, batches: Sequence, target=None, *, exclude=None, model=None,
                  method: str = "minmax", percentile: float = 99.99,
                  smooth_alpha: float | None = None, activations: str = "per_token",
                  weight_rounding: str = "gptq", embeddings: str = "int8",
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
    ``weight_rounding``: ``"gptq"`` (default: GPTQ rounding from the calibration inputs'
    ``X^T X``, same scales and kernels, per site only where it lowered the output error on
    held-back calibration batches, :mod:`attnforge.quantization_gptq`) or ``"nearest"``.
    ``embeddings``: ``"int8"`` (default: constant gather tables int8, one scale per
    :data:`EMBEDDING_GROUP` values of a row,
    :class:`~attnforge.passes.quantize_embedding.QuantizeEmbedding`) or ``"float32"``.
    ``summary``: a dict filled with :func:`quantization_summary` (method, scales, exclusions).
    """
    from tvm import relax

    from attnforge.passes._quant_ir import resolve_exclude, site_calls
    from attnforge.passes.quantize_embedding import embedding_tables
    from attnforge.passes.smooth_quant import SmoothQuant

    for arg, value, allowed in (("activations", activations, ACTIVATIONS),
                                ("weight_rounding", weight_rounding, WEIGHT_ROUNDINGS),
                                ("embeddings", embeddings, EMBEDDINGS)):
        if value not in allowed:
            raise ValueError(f"quantize_int8: {arg}={value!r}; choose one of {allowed}")
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
    per_token = activations == "per_token"
    gptq = weight_rounding == "gptq" and len(batches) >= 2  # one batch fits, one validates
    if activations != "per_tensor" and not gptq:
        _check_batches(batches, mod)  # the same input checks as a calibration run
        ranges, grams, tokens = {}, {}, {}
    else:
        ranges, grams, tokens = calibration_stats(
            mod, batches, target, method=method if activations == "per_tensor" else None,
            percentile=percentile, hessians=gptq)
    hessians, damping, rounding = _gptq(grams, tokens, mod, excluded)
    if weight_rounding == "gptq" and not gptq:
        rounding = {i: {"rounding": "nearest", "reason": "GPTQ needs >= 2 calibration batches "
                        "(one to fit, one to validate)"} for i in range(n_sites)}
    qparams = {i: qparams_from_range(lo, hi) for i, (lo, hi) in ranges.items()}
    tables = embedding_tables(mod) if embeddings == "int8" else []
    if summary is not None:
        summary.update(quantization_summary(
            mod, ranges, qparams, excluded, names, method=method, percentile=percentile,
            n_batches=len(batches)))
        summary["smoothing"] = None if smooth_alpha is None else {
            "method": "SmoothQuant (per input channel, multiply fused into the quantize op)",
            "alpha": float(smooth_alpha)}
        summary["weight_rounding"] = {
            "method": weight_rounding if gptq or weight_rounding == "nearest" else
            "nearest (GPTQ needs >= 2 calibration batches)",
            **({"algorithm": "GPTQ (Frantar et al. 2023) on the calibration inputs' X^T X, "
                             "blocks of 128, no act-order, scales unchanged; per site "
                             "round-to-nearest or GPTQ with damping 0.1 / 1.0 of the "
                             "mean diagonal, whichever gave the smallest output error on the "
                             "odd calibration batches when fitted on the even ones"}
               if gptq else {})}
        summary["embeddings"] = {
            "dtype": "int8" if tables else "float32",
            "scheme": (f"symmetric, one fp32 scale per {EMBEDDING_GROUP} values of a row "
                       "(per row when the row length is not a multiple), dequantised on the "
                       "gather") if tables else None,
            "tables": [list(t) for t in tables]}
        for site in summary["sites"]:
            if "weight" in site:
                site["weight"]["rounding"] = rounding.get(site["site"], {"rounding": "nearest"})
        if activations != "per_tensor":
            summary["calibration"] = {"method": "none: no activation ranges needed",
                                      "batches": len(batches)}
            act = ({"dtype": "uint8", "scheme": "asymmetric per token (dynamic)"} if per_token
                   else {"dtype": "float32", "scheme": "not quantised (weight-only diagnostic)"})
            for site in summary["sites"]:
                if not site.get("excluded"):
                    site["activation"] = dict(act)
    if cuda:
        from .quantization_cuda import quantize_cuda

        return quantize_cuda(mod, ranges, exclude, names, activations, summary,
                              (hessians, damping), EMBEDDING_GROUP if tables else 0)
    out = int8_passes(qparams, exclude=exclude, names=names, per_token=per_token,
                      hessians=hessians, damping=damping, embeddings=bool(tables),
                      embedding_group=EMBEDDING_GROUP)(mod)
    if summary is not None:  # what really became the VNNI kernel (e.g. not symbolic shapes)
        from attnforge.passes.lower_int8_matmul import KERNEL_SYMBOL

        text = out["main"].script(show_meta=False)
        summary["vnni_matmuls"] = len(re.findall(rf"R\.call_tir\((cls\.)?{KERNEL_SYMBOL}", text))
    return out
