"""Symbolic-length CUDA kernel: its algorithm emulated on the CPU vs SDPA, and the real CUDA
build through nvcc/ptxas (no GPU here: it has never run on one)."""

import numpy as np
import pytest
import torch
import tvm

from attnforge import cuda_aot
from attnforge.schedules.attention_cuda import cuda_target
from attnforge.schedules.attention_cuda_dynamic import fused_attention_cuda_dynamic
from attnforge.schedules.block_mask import MaskSpec
from attnforge.schedules.block_mask_runtime import DispatchMask

DISPATCH = DispatchMask(150, MaskSpec.causal(), MaskSpec.sliding_window(63, 0))


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


@pytest.mark.parametrize("spec", [pytest.param(MaskSpec.causal(), marks=pytest.mark.slow),
                                  DISPATCH], ids=lambda s: getattr(s, "describe", str)())
def test_emulated_dynamic_cuda_kernel(spec):
    kernel, layout = fused_attention_cuda_dynamic(None, 4, 2, None, None, 32, mask=spec,
                                                  emu=True)
    llvm = tvm.target.Target({"kind": "llvm"})
    fk = tvm.compile(tvm.IRModule({"k": kernel.with_attr("global_symbol", "k")}), target=llvm)
    fl = tvm.compile(tvm.IRModule({"l": layout.with_attr("global_symbol", "l")}), target=llvm)
    rng = np.random.default_rng(0)
    for b, n in [(2, 5), (1, 200)]:  # one compiled kernel, both dispatch sides, ragged
        q = rng.standard_normal((b, 4, n, 32)).astype("float16")
        k, v = (rng.standard_normal((b, 2, n, 32)).astype("float16") for _ in range(2))
        nqb, nkb = -(-n // 128), -(-n // 64)
        arrs = [_t(np.zeros(s, "int32")) for s in ((1, nqb), (1, nqb, nkb), (1, nqb, nkb))]
        fl["l"](_t(q), _t(k), *arrs)
        o = _t(np.zeros((b, 4, n, 32), "float16"))
        fk["k"](_t(q), _t(k), _t(v), *arrs, o)
        side = spec if not isinstance(spec, DispatchMask) else (
            spec.long if n >= spec.threshold else spec.short)
        want = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(a).double() for a in (q, k, v)),
            attn_mask=torch.from_numpy(side.dense(n, n)[0]), enable_gqa=True).numpy()
        np.testing.assert_allclose(o.numpy().astype("float64"), want, atol=3e-3)


@pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None, reason="needs nvcc")
def test_dynamic_cuda_build_ptxas():
    kernel, layout = fused_attention_cuda_dynamic(None, 16, 16, None, None, 128,
                                                  mask=DISPATCH)
    lib = tvm.compile(tvm.IRModule({"k": kernel, "l": layout}), target=cuda_target("sm_90"))
    (src,) = cuda_aot.cuda_sources(lib)
    ptx = cuda_aot.compile_source(src, "sm_90", "ptx").decode()
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 2 * 8 * 8
    _, log = cuda_aot.compile_source(src, "sm_90", "cubin", verbose=True)
    rep = cuda_aot.ptxas_report(log)
    k = rep["fused_attention_cuda_dynamic_kernel"]
    assert k["registers"] <= 255 and k["spill_stores"] == 0 and k["stack"] == 0, rep
    assert "attnforge_block_mask_kernel" in rep
