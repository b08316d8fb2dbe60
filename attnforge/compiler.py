"""``compile_model``: PyTorch module -> verified ``CompiledModel``.

Pipeline (one direction): frontends (torch.export -> Relax) -> passes (recognise attention,
analyse its mask, lower it to our kernels) -> schedules for the rest (tuning records if given;
our CPU rules on llvm, dlight on CUDA) -> ``tvm.compile`` -> Relax VM, checked against eager
PyTorch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tvm

from . import __version__
from .errors import TargetError
from .runtime import CompiledModel
from .target import can_run_here, host_target, is_cuda, parse_target, target_tag
from .verify import TOLERANCES, compare, raise_if_failed


PRECISIONS = ("float32", "float16", "bfloat16", "int8")


def _attention_dtype(target: tvm.target.Target, precision: str) -> str | None:
    """Dtype the fused attention kernels compute in (None: the model's own, fp32)."""
    if precision == "float32":
        return None
    if is_cuda(target):
        return precision
    # The CPU kernel widens bf16 to fp32 internally; this CPU has no fp16 arithmetic.
    return "bfloat16" if precision == "bfloat16" else None


def _lower(mod: tvm.IRModule, target: tvm.target.Target, fuse_attention: bool,
           block_q: int | None, block_kv: int, precision: str = "float32", sparsity=None,
           numerics_of: tvm.target.Target | None = None, attention_qk: str = "float32"):
    """Run attnforge's Relax passes; returns (module, attention sites).

    The sites list ends with the candidates the recognition pass left alone
    (``"fused": False`` with the reason).  ``numerics_of``: build for ``target`` with the
    low-precision passes of that target (the CPU twin of a CUDA build)."""
    from tvm import relax

    from attnforge.passes.attention_report import attention_rejections, attention_report
    from attnforge.passes.pipeline import attention_pipeline, mixed_precision_passes

    # Low-precision matmuls, fp32 accumulation, weights folded: TVM's AMP for fp16; for bf16
    # on CUDA passes.BFloat16Matmuls (tensor cores via schedules.matmul_bf16_cuda); bf16 on
    # the CPU stores weights only (StoreWeightsBF16 in compile_model), activations stay fp32.
    amp = precision == "float16" or (precision == "bfloat16" and is_cuda(numerics_of or target))
    if not fuse_attention:
        if sparsity is not None:
            raise ValueError("sparsity= needs fuse_attention=True (the policy is inserted into "
                             "the fused attention sites)")
        if amp:
            mod = mixed_precision_passes(precision)(mod)
        return mod, []
    mod = attention_pipeline(target, block_q=block_q, block_kv=block_kv,
                             compute_dtype=_attention_dtype(target, precision),
                             mixed_precision=precision if amp else None,
                             sparsity=sparsity, attention_qk=attention_qk)(mod)
    return mod, attention_report(mod) + attention_rejections(mod)


def _cpu_bfloat16(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """``precision="bfloat16"`` on llvm, after the attention passes: bf16 weights; where
    ``target`` (default: this host) has AVX-512 BF16, matmuls with >= 16 rows (or a symbolic
    row count) round their activations to bf16 and run bf16 x bf16 -> fp32 ``vdpbf16ps``
    (``LowerBF16Matmul``), and the fused attention kernels run Q Kᵀ / P V on ``vdpbf16ps``
    (``UseBF16AttentionKernel``); the others compute in fp32 on the bf16 weights / inputs.
    Shared by ``compile_model`` and ``compile_generator`` (its prefill / decode programs): change
    the CPU bf16 lowering here and both follow."""
    from tvm import relax

    from attnforge.passes.lower_bf16_matmul import LowerBF16Matmul
    from attnforge.passes.store_weights_bf16 import StoreWeightsBF16
    from attnforge.passes.use_bf16_attention_kernel import UseBF16AttentionKernel

    mod = StoreWeightsBF16()(relax.transform.FoldConstant()(mod))
    target = host_target() if target is None else target
    if tvm.target.codegen.target_has_features("avx512bf16", target):
        mod = UseBF16AttentionKernel(LowerBF16Matmul()(mod))
    return mod


def _schedule(mod: tvm.IRModule, target: tvm.target.Target, tuning_logs=None):
    """Apply tuning records (if given), then schedule the rest: our CPU rules on llvm (TVM's
    default CPU pipeline leaves TIR unscheduled: ~1 GFLOP/s matmuls), bf16 tensor cores and
    dlight on CUDA (bf16 / int8: our WMMA rules first). Returns ``(module, per-rule
    counts, tuning report)``."""
    from collections import Counter

    from attnforge.schedules.cpu_schedule import cpu_build_pipeline, cpu_schedule_pass
    from attnforge.schedules.cuda_schedule import cuda_build_pipeline, cuda_schedule_pass

    stats: Counter = Counter()
    tuning = {"applied": False, "reason": "tuning_logs=False: default schedules"}
    if tuning_logs is None:  # default: logs shipped in tuning_logs/<target-tag>/ that match
        from .tuning_auto import apply_shipped_logs

        shipped, tuning = apply_shipped_logs(mod, target)
        if shipped is not None:
            mod, tuning_logs = shipped, "shipped"
    elif tuning_logs is not False:
        from .tuning_apply import apply_tuning_logs

        mod, tuning = apply_tuning_logs(mod, target, tuning_logs)  # legalized + fused
    legalized = tuning_logs is not None and tuning_logs is not False
    with target:
        if is_cuda(target):
            mod = (cuda_schedule_pass if legalized else cuda_build_pipeline)(target, stats)(mod)
        else:
            mod = (cpu_schedule_pass if legalized else cpu_build_pipeline)(target, stats)(mod)
    return mod, dict(stats), tuning


def _build(mod: tvm.IRModule, target: tvm.target.Target):
    """``tvm.compile`` with TVM's default pipeline for the target, errors made readable."""
    try:
        with tvm.transform.PassContext(opt_level=3):
            return tvm.compile(mod, target=target)
    except Exception as e:  # TVM internal checks: name what failed and the target
        msg = str(e).strip().splitlines()
        head = next((ln for ln in reversed(msg) if ln.strip()), repr(e))
        raise TargetError(f"building for {target_tag(target)} failed: {head}. If it names an "
                          "unscheduled PrimFunc, that op has no GPU schedule yet") from e


def _flatten_eager(model, inputs) -> list[np.ndarray]:
    import torch
    from torch.utils import _pytree

    with torch.no_grad():
        out = model(*inputs)
    leaves = _pytree.tree_flatten(out)[0]
    return [_numpy(t) for t in leaves if isinstance(t, torch.Tensor)]


def _numpy(t) -> np.ndarray:
    """A torch tensor as numpy; bf16 (which numpy lacks) widened exactly to fp32."""
    import torch

    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _output_names(desc: dict, n: int) -> list[str]:
    if desc.get("kind") == "dict" and len(desc.get("keys", [])) == n:
        return list(desc["keys"])
    return [f"output[{i}]" for i in range(n)]


def _merge_sources(sites: list[dict], sources: list[str]) -> list[dict]:
    """Attach the model module path of each fused site, matched in program order; only when
    every softmax of the model became a site (otherwise the order cannot be trusted)."""
    fused = [s for s in sites if s.get("fused", True)]
    match = len(fused) == len(sources)
    out, i = [], 0
    for site in sites:
        entry = dict(site)
        if entry.get("fused", True):
            entry.setdefault("source", sources[i] if match else None)
            i += 1
        out.append(entry)
    return out


def compile_model(
    model,
    example_inputs: tuple,
    *,
    target: Any = "llvm",
    verify: bool = True,
    dynamic_shapes=None,
    fuse_attention: bool = True,
    precision: str = "float32",
    block_q: int | None = None,
    block_kv: int = 64,
    tuning_logs: str | bool | None = None,
    sparsity=None,
    rtol: float | None = None,
    calibration_data=None,
    int8_exclude=None,
    int8_options: dict | None = None,
) -> CompiledModel:
    """Compile a PyTorch model with TVM, attention fused into attnforge's kernels.

    Args:
        model: a ``torch.nn.Module`` (put in eval mode here).
        example_inputs: tuple of tensors used for export and verification.
        target: ``"llvm"``/``"cpu"``, ``"cuda"``, ``"cuda:sm_80"``, ``"cuda:sm_90"``, a JSON
            dict, or a ``tvm.target.Target``.
        verify: compare against eager PyTorch on ``example_inputs``; raises
            ``VerificationError`` beyond the tolerance. For a CUDA target on a machine with no
            GPU the same pipeline is built for this CPU and verified there (stated in the
            report: the GPU kernels themselves did not run).
        dynamic_shapes: torch.export's ``dynamic_shapes`` argument.
        fuse_attention: run attnforge's attention passes (False: stock TVM lowering).
        precision: ``"float32"``; ``"float16"`` (attention kernels in fp16 on CUDA, other
            matmuls through TVM's ``ToMixedPrecision`` with fp32 accumulation, weights stored
            in fp16); ``"bfloat16"`` (attention kernels in bf16; on llvm every constant matmul
            weight is stored in bf16 (``StoreWeightsBF16``) and, on CPUs with AVX-512 BF16,
            matmuls with >= 16 rows round their input to bf16 and run bf16 x bf16 -> fp32
            ``vdpbf16ps`` (``LowerBF16Matmul``), the rest fp32 math; on CUDA every
            other matmul takes bf16 operands with fp32 accumulation on tensor cores
            (``BFloat16Matmuls`` + ``MatmulTensorCoreBF16``), norms/softmax stay fp32).
        block_q, block_kv: attention kernel block sizes (block_q default: 64 CPU, 128 CUDA).
        tuning_logs: MetaSchedule log directory (``attnforge tune`` writes one) whose matching
            records replace the default schedules.  Default (None): the logs shipped in
            ``tuning_logs/<target-tag>/`` when one of their workloads is a kernel of this model
            (``attnforge.tuning_auto``); ``False``: no logs.  Either way a record is applied
            only when it beat the default schedule measured by the same runner;
            ``cm.report["tuning"]`` says which tasks were tuned and why others were not.
        sparsity: an ``attnforge.sparsity`` policy ANDed into every attention site's mask. When
            it changes the model's function, the comparison with dense eager is reported but
            not enforced; measure the change with ``attnforge.sparsity.evaluate``.
        rtol: verification tolerance (default by precision: fp32 1e-4, fp16 2e-2, bf16 5e-2).
        calibration_data: for ``precision="int8"`` (llvm with VNNI, or cuda sm_75+): a non-empty
            list of input tuples like ``example_inputs``. Every ``nn.Linear`` becomes a u8 x s8
            VNNI matmul (CUDA: symmetric s8 x s8 -> s32 on int8 tensor cores; built without a
            GPU, not run on one) with per-output-channel weight scales; activations per
            token at run time by default, or per tensor with ranges calibrated on this data
            (``int8_options``); the batches are always checked (NaN/inf are refused).
        int8_exclude: ``nn.Linear`` module names or matmul indices kept in fp32 (default:
            the LM head, ``"lm_head"``, when the model has one).
        int8_options: keyword arguments of ``attnforge.quantization.quantize_int8``:
            ``activations`` (``"per_token"`` default, ``"per_tensor"``), ``method``
            (``"minmax"`` default, ``"percentile"``) and ``percentile`` for per-tensor
            calibration, ``smooth_alpha`` (SmoothQuant strength; default None: off),
            ``weight_rounding`` (``"gptq"`` default, validated per layer on held-back
            calibration batches; ``"nearest"``), ``embeddings`` (``"int8"`` default: tables
            stored s8 per row; ``"float32"``); and
            ``attention_qk`` (``"float32"`` default; ``"int8"``: Q Kᵀ of the fused attention
            in int8 on VNNI, llvm and precision="int8" only, ``schedules/attention_cpu_int8qk.py``).

    Returns:
        A :class:`CompiledModel`; ``cm.report`` holds the attention sites and verification.
    """
    from attnforge.frontends import import_torch_model

    tgt = parse_target(target)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {PRECISIONS}")
    from attnforge.passes._attention_qk import split_attention_qk

    int8_options, attention_qk = split_attention_qk(precision, tgt, int8_options)
    if precision == "int8":
        from .quantization import check_int8_target

        check_int8_target(tgt)
        if not calibration_data:
            raise ValueError("precision='int8' needs calibration_data: a non-empty list of "
                             "input tuples like example_inputs")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    model.eval()
    timings = {}
    t0 = time.perf_counter()
    imp = import_torch_model(model, example_inputs, dynamic_shapes=dynamic_shapes)
    timings["import"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mod, sites = _lower(imp.mod, tgt, fuse_attention, block_q, block_kv, precision, sparsity,
                        attention_qk=attention_qk)
    timings["passes"] = time.perf_counter() - t0
    bf16_matmuls = None
    if precision == "bfloat16" and not is_cuda(tgt):  # CPU: bf16 weights (+ vdpbf16ps matmuls)
        from attnforge.passes.lower_bf16_matmul import count_bf16_matmuls
        from attnforge.passes.use_bf16_attention_kernel import count_bf16_attention

        mod = _cpu_bfloat16(mod, tgt)
        bf16_matmuls = (count_bf16_matmuls(mod), count_bf16_attention(mod))
    if precision == "int8":
        from .quantization import quantize_int8

        t0 = time.perf_counter()
        quantization: dict = {}
        mod = quantize_int8(mod, list(calibration_data), tgt, exclude=int8_exclude, model=model,
                            summary=quantization, **(int8_options or {}))
        timings["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mod, schedules, tuning = _schedule(mod, tgt, tuning_logs)
    from .quantization import constant_bytes

    weight_bytes = constant_bytes(mod)  # the weights as stored in the built module
    executable = _build(mod, tgt)
    timings["build"] = time.perf_counter() - t0

    report = {
        "attnforge_version": __version__,
        "tvm_version": tvm.__version__,
        "target": str(tgt),
        "target_tag": target_tag(tgt),
        "precision": precision,
        "attention": _merge_sources(sites, imp.attention_sources),
        "schedules": schedules,
        "tuning": tuning,
        "sparsity": None if sparsity is None else {
            "policy": sparsity.describe(),
            "changed_sites": [e["site"] for e in sites if e.get("sparsity_changed")],
            # length dispatch: the choice happens at run time, in the compiled module
            "dispatch": [{"site": e["site"], **e["dispatch"]} for e in sites
                         if e.get("dispatch")] or None},
        "verification": {"skipped": True, "reason": "verify=False"},
        "timings_s": timings,
        "weight_bytes": weight_bytes,
    }
    if bf16_matmuls is not None:  # sites / attention kernels on vdpbf16ps (others: fp32 math)
        report["bf16_matmuls"], report["bf16_attention_kernels"] = bf16_matmuls
    if precision == "int8":
        from attnforge.passes._attention_qk import attention_qk_summary

        report["quantization"] = quantization
        quantization["attention_qk"] = attention_qk_summary(sites, attention_qk)
    cm = CompiledModel(executable, tgt, imp.input_specs, imp.output_desc, report,
                       output_spec=imp.output_spec)
    if verify:
        t0 = time.perf_counter()
        report["verification"], report["accuracy"] = _verify(
            cm, model, example_inputs, imp.mod, tgt, fuse_attention, block_q, block_kv,
            precision, rtol, sparsity,
            int8=None if precision != "int8" else dict(
                batches=list(calibration_data), exclude=int8_exclude, model=model,
                **(int8_options or {})))
        timings["verify"] = time.perf_counter() - t0
        if report["sparsity"] and report["sparsity"]["changed_sites"]:
            v = report["verification"]
            v["enforced"] = False
            v["note"] = "; ".join(filter(None, [v.get("note"), (
                "the sparsity policy changes the model's function: compared with dense eager "
                "but not enforced; see attnforge.sparsity.evaluate and cm.report['accuracy']")]))
        else:
            raise_if_failed(report["verification"])
    return cm


def _verify(cm, model, inputs, imported_mod, tgt, fuse_attention, block_q, block_kv,
            precision, rtol, sparsity=None, int8=None):
    """Verification on the example inputs and accuracy on held-out ones; returns both.

    ``int8``: ``quantize_int8`` keyword arguments; the CPU twin of a CUDA int8 build is
    quantised with the CUDA lowering (``numerics_of``), built with TVM's generic int8 loops."""
    from .accuracy import accuracy_metrics, held_out_inputs

    runner, note = cm, None
    if not can_run_here(tgt):
        if not is_cuda(tgt):
            raise TargetError(f"cannot verify for {target_tag(tgt)} on this machine")
        cpu = host_target()
        mod, _ = _lower(imported_mod, cpu, fuse_attention, None, block_kv, precision, sparsity,
                        numerics_of=tgt)
        if int8 is not None:
            from .quantization import quantize_int8

            mod = quantize_int8(mod, target=cpu, numerics_of=tgt, **int8)
        mod, _, _ = _schedule(mod, cpu)
        runner = CompiledModel(_build(mod, cpu), cpu, cm.input_specs, cm.output_desc, {})
        note = (f"no GPU here: the same pipeline was built for this CPU ({target_tag(cpu)}) "
                "and verified there; the GPU kernels themselves were NOT run")

    def run_both(xs):
        ref = _flatten_eager(model, xs)
        import torch

        dev = runner.device_type_torch()  # bf16 has no numpy dtype: pass torch tensors
        outs = runner.run_flat(*[x.detach().to(dev) for x in xs])
        return ref, [_numpy(t) if isinstance(t, torch.Tensor) else t for t in outs]

    ref, got = run_both(inputs)
    names = _output_names(cm.output_desc, len(ref))
    tol = rtol if rtol is not None else TOLERANCES[precision]
    result = compare(ref, got, names, tol)
    result["ran_on"] = target_tag(runner.target)
    result["gpu_kernels_run"] = bool(is_cuda(tgt) and runner is cm)
    if note:
        result["note"] = note
    accuracy = accuracy_metrics(*run_both(held_out_inputs(inputs)), names)
    accuracy.update(precision=precision, ran_on=result["ran_on"],
                    inputs="held-out random inputs (seed 1234) shaped like the examples")
    return result, accuracy
