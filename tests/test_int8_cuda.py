"""INT8 on CUDA tensor cores, checked without a GPU.

LowerInt8MatmulCuda (Before/Expected), its numerics on this CPU (the same Relax program built
for llvm with TVM's generic int8 loops) against an integer / float64 reference and fp32,
MatmulTensorCoreInt8 (PTX ``wmma...s8``, SASS IMMA, no spills), compile_model for a tiny
Llama / BERT at sm_80 / sm_90 (CPU twin verified), and errors. No GPU kernel is run here.
"""

import re
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from attnforge import cuda_aot
from attnforge.passes.lower_int8_matmul_cuda import LowerInt8MatmulCuda
from attnforge.passes.quantize_weights import QuantizeWeights, quantize_weight
from attnforge.target import cuda_target, host_target

needs_nvcc = pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None,
                                reason="nvcc not installed: CUDA source cannot be compiled")


@I.ir_module
class Before3D:
    @R.function
    def main(x: R.Tensor((2, 3, 8), "float32"), w: R.Tensor((8, 4), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


@I.ir_module
class Expected3DPerToken:
    @R.function
    def main(x: R.Tensor((2, 3, 8), "float32"), wq: R.Tensor((8, 4), "int8"),
             ws: R.Tensor((4,), "float32")):
        with R.dataflow():
            x2 = R.reshape(x, R.shape([6, 8]))
            amax = R.max(R.abs(x2), axis=[1], keepdims=True)
            s = R.multiply(R.maximum(amax, R.const(1e-30, "float32")),
                           R.const(1.0 / 127.0, "float32"))
            xq = R.astype(R.clip(R.round(R.divide(x2, s)), -127, 127), "int8")
            acc = R.matmul(xq, wq, out_dtype="int32")
            y2 = R.multiply(R.multiply(R.astype(acc, "float32"), s), ws)
            y = R.reshape(y2, R.shape([2, 3, 4]))
            R.output(y)
        return y


@I.ir_module
class Before2D:
    @R.function
    def main(x: R.Tensor((5, 8), "float32"), w: R.Tensor((8, 4), "float32"),
             w2: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.matmul(y, w2)
            R.output(z)
        return z


@I.ir_module
class Expected2DPerTensorKeepLast:
    @R.function
    def main(x: R.Tensor((5, 8), "float32"), wq: R.Tensor((8, 4), "int8"),
             ws: R.Tensor((4,), "float32"), w2: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            xq = R.astype(R.clip(R.round(R.divide(x, R.const(0.5, "float32"))), -127, 127),
                          "int8")
            acc = R.matmul(xq, wq, out_dtype="int32")
            y = R.multiply(R.multiply(R.astype(acc, "float32"), R.const(0.5, "float32")), ws)
            z = R.matmul(y, w2)
            R.output(z)
        return z


def _bind(mod, **params):
    return relax.transform.BindParams("main", params)(mod)


def _compare(got, expected):
    tvm.ir.assert_structural_equal(relax.analysis.remove_all_unused(got["main"]),
                                   relax.analysis.remove_all_unused(expected["main"]))


def test_per_token_3d_before_expected():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    wq, ws = quantize_weight(w)
    got = LowerInt8MatmulCuda()(QuantizeWeights()(_bind(Before3D, w=w)))
    _compare(got, _bind(Expected3DPerToken, wq=wq, ws=ws))


def test_per_tensor_2d_excluded_site_left_alone():
    rng = np.random.default_rng(1)
    w, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((8, 4), (4, 4)))
    wq, ws = quantize_weight(w)
    before = QuantizeWeights(exclude=[1])(_bind(Before2D, w=w, w2=w2))
    got = LowerInt8MatmulCuda({0: 0.5})(before)
    _compare(got, _bind(Expected2DPerTensorKeepLast, wq=wq, ws=ws, w2=w2))


def test_fp32_and_symbolic_sites_left_alone():
    w = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)
    fp32 = _bind(Before3D, w=w)
    tvm.ir.assert_structural_equal(LowerInt8MatmulCuda()(fp32), fp32)  # not quantised

    @I.ir_module
    class Symbolic:
        @R.function
        def main(x: R.Tensor(("n", 8), "float32"), w: R.Tensor((8, 4), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    q = QuantizeWeights()(_bind(Symbolic, w=w))
    tvm.ir.assert_structural_equal(LowerInt8MatmulCuda()(q), q)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_activation_scale_is_refused(bad):
    with pytest.raises(ValueError, match="site 3"):
        LowerInt8MatmulCuda({3: bad})


def _cpu_run(mod, *args):
    from attnforge.schedules.cpu_schedule import cpu_build_pipeline

    tgt = host_target()
    with tgt:
        built = cpu_build_pipeline(tgt)(mod)
    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(tvm.compile(built, target=tgt), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _reference(x, wq, ws, a_scale=None):
    """Integer matmul of the symmetric s8 codes (int64), dequantised in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    if a_scale is None:
        amax = np.maximum(np.abs(x2).max(axis=1, keepdims=True), np.float32(1e-30))
        s = (amax * np.float32(1.0 / 127.0)).astype(np.float32)
    else:
        s = np.float32(a_scale)
    xq = np.clip(np.round(x2 / s), -127, 127).astype(np.int64)
    acc = xq @ wq.astype(np.int64)
    y = acc.astype(np.float64) * np.asarray(s, np.float64) * ws.astype(np.float64)
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_token", "per_tensor"])
def test_numerics_on_cpu_match_integer_reference(per_tensor):
    """The CUDA lowering built for llvm (generic int8 R.matmul): exact integer math, and the
    quantisation error against fp32 of the expected size."""
    rng = np.random.default_rng(3)
    b, t, k, n = 3, 37, 72, 91  # sizes not multiples of 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((b, t, k)).astype(np.float32)
    x[1, 5] = 0.0  # an all-zero token
    x[2, 7] *= 40.0  # an outlier token
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((b, t, k), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(xv, relax.const(w)))
        bb.emit_func_output(out)
    a_scale = float(np.abs(x).max()) / 127.0 if per_tensor else None
    mod = LowerInt8MatmulCuda({0: a_scale} if per_tensor else None)(QuantizeWeights()(bb.get()))
    assert 'out_dtype="int32"' in mod["main"].script()
    got = _cpu_run(mod, x)
    wq, ws = quantize_weight(w)
    np.testing.assert_allclose(got, _reference(x, wq, ws, a_scale), rtol=1e-5, atol=1e-5)
    assert not got[1, 5].any()
    exact = x.astype(np.float64) @ w.astype(np.float64)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    # per token: ~0.5% relative error; one per-tensor scale for an outlier row loses more
    assert rel < (0.1 if per_tensor else 0.01), rel


# ----- MatmulTensorCoreInt8: PTX / SASS / ptxas without a GPU -----

def _int8_gemm_module(m, k, n):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "int8"))
    w = relax.Var("w", relax.TensorType((k, n), "int8"))
    s = relax.Var("s", relax.TensorType((m, 1), "float32"))
    with bb.function("main", [x, w, s]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, w, out_dtype="int32"))
            out = bb.emit_output(relax.op.multiply(relax.op.astype(acc, "float32"), s))
        bb.emit_func_output(out)
    return bb.get()


def _entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"\.visible \.entry ", ptx)[1:]
    return {p.split("(")[0]: p for p in parts}


def _gpu_code(executable, arch):
    (src,) = cuda_aot.cuda_sources(executable)
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        ptx = cuda_aot.compile_source(src, arch, "ptx").decode()
        cubin, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    return _entries(ptx), cuda_aot.ptxas_report(log), cuda_aot.sass(cubin)


WMMA_S8 = r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.s32\.s8\.s8\.s32"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_int8_gemm_uses_tensor_cores(arch):
    from attnforge import compiler

    tgt = cuda_target(arch)
    mod, stats, _ = compiler._schedule(_int8_gemm_module(200, 256, 344), tgt, False)
    assert stats.get("MatmulTensorCoreInt8") == 1, stats
    kernels, ptxas, sass = _gpu_code(compiler._build(mod, tgt), arch)
    (name,) = [k for k in kernels if "matmul" in k]
    assert re.search(WMMA_S8, kernels[name])
    assert ptxas[name]["spill_stores"] == 0 and ptxas[name]["spill_loads"] == 0
    if sass is not None:  # cuobjdump present
        assert "IMMA" in sass


@needs_nvcc
def test_small_int8_gemm_declined_and_still_builds():
    """M <= 64: not tensorized (dlight's threshold); dlight's FMA schedule builds it."""
    from attnforge import compiler

    tgt = cuda_target("sm_80")
    mod, stats, _ = compiler._schedule(_int8_gemm_module(48, 256, 344), tgt, False)
    assert "MatmulTensorCoreInt8" not in stats and stats.get("Matmul") == 1, stats
    kernels, _, _ = _gpu_code(compiler._build(mod, tgt), "sm_80")
    assert not any(re.search(WMMA_S8, p) for p in kernels.values())


# ----- compile_model -----

def test_pre_sm75_arch_is_refused():
    import torch

    from attnforge import compile_model
    from attnforge.errors import TargetError

    model = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    for arch in ("sm_70", "sm_61"):
        with pytest.raises(TargetError, match="sm_75 or newer"):
            compile_model(model, (x,), target=f"cuda:{arch}", precision="int8",
                          calibration_data=[(x,)])


def test_weight_only_diagnostic_is_refused_on_cuda():
    import torch

    from attnforge.quantization import quantize_int8

    mod = _bind(Before3D, w=np.ones((8, 4), np.float32))
    with pytest.raises(ValueError, match="activations='none'"):
        quantize_int8(mod, [(torch.randn(2, 3, 8),)], cuda_target("sm_80"), activations="none")


def _check_model_build(cm, arch, n_int8):
    q = cm.report["quantization"]
    assert q["int8_matmuls"] == n_int8 and q["vnni_matmuls"] == 0
    assert [e["name"] for e in q["excluded"]] in ([], ["lm_head"])
    assert cm.report["schedules"].get("MatmulTensorCoreInt8", 0) >= 1
    kernels, ptxas, sass = _gpu_code(cm.executable, arch)
    # the int8 GEMMs: matmul + int32 -> fp32 cast + scales, fused by FuseOps
    gemms = [k for k in kernels if re.match(r"fused_matmul\d*_cast", k)]
    # one kernel per GEMM our rule scheduled, each on tensor cores
    assert len(gemms) == cm.report["schedules"]["MatmulTensorCoreInt8"], gemms
    for k in gemms:
        assert re.search(WMMA_S8, kernels[k]), k
        assert ptxas[k]["spill_stores"] == 0 and ptxas[k]["spill_loads"] == 0, ptxas[k]
    if sass is not None:
        assert "IMMA" in sass
    v = cm.report["verification"]
    assert v["passed"] and not v["gpu_kernels_run"] and "NOT run" in v["note"], v
    # the twin really is quantised (an fp32 twin matches eager to ~1e-6)
    assert v["max_abs_err"] > 1e-4, v
    assert cm.report["accuracy"]["min_cosine"] > 0.999, cm.report["accuracy"]


def _linears(model):
    import torch

    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def _model(name):
    from attnforge.models import build_hf_model

    # every projection > 64 wide (dlight's tensor-core threshold); M = 2 * 45 = 90 tokens
    model, inputs = build_hf_model(name, batch=2, seq_len=45, hidden=128, heads=4,
                                   kv_heads=4 if name == "llama" else None, vocab=256)
    calib = [build_hf_model(name, batch=2, seq_len=45, hidden=128, heads=4,
                            kv_heads=4 if name == "llama" else None, vocab=256, seed=s)[1]
             for s in (1, 2)]
    return model, inputs, calib


MODEL_CASES = [
    pytest.param("llama", "sm_90", "per_token", id="llama-sm_90-per_token"),
    pytest.param("llama", "sm_80", "per_tensor", id="llama-sm_80-per_tensor",
                 marks=pytest.mark.slow),
    pytest.param("bert", "sm_80", "per_token", id="bert-sm_80-per_token",
                 marks=pytest.mark.slow),
    pytest.param("bert", "sm_90", "per_token", id="bert-sm_90-per_token",
                 marks=pytest.mark.slow),
]


@needs_nvcc
@pytest.mark.parametrize("name,arch,activations", MODEL_CASES)
def test_model_builds_with_int8_tensor_cores(name, arch, activations):
    """Every non-excluded nn.Linear is an s8 GEMM on tensor cores; the CPU twin (same Relax
    program for llvm) passes verification against eager fp32."""
    from attnforge import compile_model

    model, inputs, calib = _model(name)
    cm = compile_model(model, inputs, target=f"cuda:{arch}", precision="int8",
                       calibration_data=calib, int8_options={"activations": activations})
    excluded = len(cm.report["quantization"]["excluded"])
    _check_model_build(cm, arch, _linears(model) - excluded)
    sites = [s for s in cm.report["quantization"]["sites"] if not s.get("excluded")]
    scheme = "symmetric per token (dynamic)" if activations == "per_token" else \
        "symmetric per tensor"
    assert all(s["activation"]["scheme"] == scheme for s in sites)
