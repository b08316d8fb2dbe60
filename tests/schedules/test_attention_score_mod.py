"""Score modifications (FlexAttention ``score_mod``) inside the fused attention kernels: the CPU
kernel and the CUDA kernel body (PTX emulated, built for llvm) against a float64 reference, and
the real CUDA build through nvcc/ptxas (no GPU needed)."""

import math

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from attnforge import cuda_aot
from attnforge.schedules.attention_cpu import fused_attention_cpu
from attnforge.schedules.attention_cuda import (
    cuda_target,
    fused_attention_cuda,
    fused_attention_cuda_reference_tir,
)
from attnforge.schedules.block_mask import MaskSpec

H = 4  # query heads of every case below


@T.prim_func(private=True)
def alibi(score: T.float32, b: T.int32, h: T.int32, q: T.int32, k: T.int32,
          slope: T.Buffer((H,), "float32")) -> T.float32:
    return score + slope[T.max(T.min(h, H - 1), 0)] * T.Cast("float32", k - q)


@T.prim_func(private=True)
def softcap(score: T.float32, b: T.int32, h: T.int32, q: T.int32, k: T.int32) -> T.float32:
    return T.tanh(score / T.float32(5.0)) * T.float32(5.0) + T.Cast("float32", b) * T.float32(0.5)


def _mod64(name, s, b, h, q, k, slope):
    if name == "alibi":
        return s + slope[h] * (k - q)
    return np.tanh(s / 5.0) * 5.0 + b * 0.5


def _reference(q, k, v, scale, name, slope, allowed):
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1).astype(np.float64), np.repeat(v, group, 1).astype(np.float64)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) * scale
    B, Hq, Nq, Nk = s.shape
    b, h, qi, ki = np.ix_(np.arange(B), np.arange(Hq), np.arange(Nq), np.arange(Nk))
    s = _mod64(name, s, b, h, qi, ki, slope)
    s = np.where(allowed, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    return (p @ v) / p.sum(-1, keepdims=True)


CASES = [("alibi", alibi, MaskSpec.causal()), ("softcap", softcap, MaskSpec.sliding_window(30))]


def _inputs(rng, B, Hkv, Nq, Nk, D, dtype):
    q = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    return q, k, v


def _run(f, bm, arrays, extra, out_shape, out_dtype):
    lib = tvm.compile(tvm.IRModule({"main": f}), target="llvm")
    out = np.full(out_shape, np.nan, dtype=out_dtype)
    args = [*arrays, bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full, *extra, out]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    lib["main"](*args)
    return args[-1].numpy().astype(np.float64)


@pytest.mark.parametrize("name,mod,mask", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_score_mod_matches_float64(name, mod, mask):
    rng = np.random.default_rng(1)
    B, Hkv, Nq, Nk, D = 2, 2, 100, 90, 32  # GQA, ragged tails, batch 2
    q, k, v = _inputs(rng, B, Hkv, Nq, Nk, D, np.float32)
    slope = rng.uniform(0.05, 0.5, H).astype(np.float32)
    f, bm = fused_attention_cpu(B, H, Hkv, Nq, Nk, D, mask=mask, score_mod=mod)
    extra = [slope] if name == "alibi" else []
    assert len(f.params) == 7 + len(extra)  # captured buffers sit just before the output
    out = _run(f, bm, (q, k, v), extra, (B, H, Nq, D), np.float32)
    allowed = mask.dense(Nq, Nk)[None]
    ref = _reference(q, k, v, 1 / math.sqrt(D), name, slope, allowed)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name,mod,mask", CASES, ids=[c[0] for c in CASES])
def test_emulated_cuda_kernel_score_mod_matches_float64(name, mod, mask):
    rng = np.random.default_rng(2)
    B, Hkv, Nq, Nk, D = 2, 2, 70, 80, 32
    q, k, v = _inputs(rng, B, Hkv, Nq, Nk, D, np.float16)
    slope = rng.uniform(0.05, 0.5, H).astype(np.float32)
    f, bm = fused_attention_cuda_reference_tir(
        batch=B, q_heads=H, kv_heads=Hkv, q_len=Nq, kv_len=Nk, head_dim=D, dtype="float16",
        mask=mask, block_q=64, block_kv=32, score_mod=mod)
    extra = [slope] if name == "alibi" else []
    out = _run(f, bm, (q, k, v), extra, (B, H, Nq, D), np.float16)
    ref = _reference(q, k, v, 1 / math.sqrt(D), name, slope, mask.dense(Nq, Nk)[None])
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)  # fp16 P and output


def test_default_kernel_is_unchanged_without_score_mod():
    a, _ = fused_attention_cpu(1, 2, 2, 64, 64, 16, mask=MaskSpec.causal())
    b, _ = fused_attention_cpu(1, 2, 2, 64, 64, 16, mask=MaskSpec.causal(), score_mod=None)
    tvm.ir.assert_structural_equal(a, b)
    assert len(a.params) == 7


def test_rejects_a_malformed_score_mod():
    @T.prim_func(private=True)
    def bad(score: T.float32, b: T.int32) -> T.float32:
        return score

    with pytest.raises(ValueError, match="score_mod must be a PrimFunc"):
        fused_attention_cpu(1, 2, 2, 64, 64, 16, score_mod=bad)


needs_nvcc = pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None, reason="needs nvcc")


@needs_nvcc
@pytest.mark.parametrize("arch", [pytest.param("sm_80", marks=pytest.mark.slow), "sm_90"])
def test_cuda_build_with_score_mod_ptxas(arch):
    f, _ = fused_attention_cuda(batch=2, q_heads=H, kv_heads=H, q_len=1000, kv_len=1000,
                                head_dim=64, dtype="float16", mask=MaskSpec.causal(),
                                arch=arch, score_mod=alibi)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=cuda_target(arch))
    (src,) = cuda_aot.cuda_sources(lib)
    _, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    (rep,) = cuda_aot.ptxas_report(log).values()
    assert rep["registers"] <= 255 and rep["stack"] == 0 and rep["spill_stores"] == 0, rep
