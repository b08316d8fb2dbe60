"""HF models built for CUDA without a GPU: every attention site lowered to the tensor-core
kernel, tensor-core instructions in the PTX of attention and of every large GEMM, HMMA in the
SASS, and ptxas resource use within the arch's limits.

Nothing here runs a GPU kernel; `benchmarks/gpu_check.py` does that on a GPU machine."""

import re

import pytest
import tvm

import attnforge
from attnforge import cuda_aot
from attnforge.models import build_hf_model

pytestmark = pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None,
                                reason="nvcc not installed: CUDA source cannot be compiled")
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
FAST = {("llama", "float16", "sm_90"), ("gpt2", "bfloat16", "sm_80")}


def _cases():
    for name in ("gpt2", "llama", "mistral", "bert", "vit"):
        for precision in ("float16", "bfloat16"):
            for arch in ("sm_80", "sm_90"):
                slow = (name, precision, arch) not in FAST
                yield pytest.param(name, precision, arch, id=f"{name}-{precision}-{arch}",
                                   marks=(pytest.mark.slow,) if slow else ())


def _entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"\.visible \.entry ", ptx)[1:]
    return {p.split("(")[0]: p for p in parts}


@pytest.mark.parametrize("name,precision,arch", list(_cases()))
def test_hf_model_builds_with_tensor_cores(name, precision, arch):
    seq = 128
    model, inputs = build_hf_model(name, batch=2, seq_len=seq, hidden=256, heads=4)
    cm = attnforge.compile_model(model, inputs, target=f"cuda:{arch}", precision=precision,
                                 verify=False)
    sites = cm.report["attention"]
    assert len(sites) == 2
    for site in sites:
        assert site["lowered_to"] == "attnforge.fused_attention_cuda", site
        assert site["compute_dtype"] == precision
    (src,) = cuda_aot.cuda_sources(cm.executable)
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        ptx = cuda_aot.compile_source(src, arch, "ptx").decode()
        cubin, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    kernels = _entries(ptx)
    mma_dtype = "f16" if precision == "float16" else "bf16"
    attn = [k for k in kernels if k.startswith("fused_attention_cuda")]
    assert attn
    for k in attn:
        assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{mma_dtype}", kernels[k])
        assert "cp.async" in kernels[k] and "ldmatrix" in kernels[k]
    gemms = [k for k in kernels if "matmul" in k]
    assert gemms
    if precision == "bfloat16":
        assert cm.report["schedules"].get("MatmulTensorCoreBF16", 0) >= len(gemms) > 0
    for k in gemms:  # fp16: dlight's Matmul; bf16: schedules.matmul_bf16_cuda
        assert "wmma.mma.sync.aligned" in kernels[k], k  # fp16 PTX names no input type
        assert re.search(rf"wmma\.load\.a\.sync\S*\.{mma_dtype}\b", kernels[k]), k
    report = cuda_aot.ptxas_report(log)
    assert set(report) >= set(attn)
    for k, r in report.items():
        assert r["registers"] <= 255 and r["spill_stores"] == 0, (k, r)
        assert r["smem_static"] <= SMEM_LIMIT[arch], (k, r)
    sass = cuda_aot.sass(cubin)
    if sass is None:
        pytest.skip("cuobjdump/nvdisasm not installed: PTX checked, SASS not")
    assert "HMMA" in sass
