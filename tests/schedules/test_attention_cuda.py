"""CUDA fused attention: numerics of the kernel body (PTX ops emulated in TIR, built for llvm)
and the real cuda build checked through nvcc / ptxas / cuobjdump (no GPU needed)."""

import math

import numpy as np
import pytest
import tvm
from attnforge.schedules.attention_cuda import (
    cuda_target,
    fused_attention_cuda,
    fused_attention_cuda_reference_tir,
    shared_memory_bytes,
)
from attnforge.schedules.block_mask import MaskSpec

from attnforge import cuda_aot

_EMU_CACHE = {}


def _reference(q, k, v, allowed, scale, additive=None, empty_rows="zero"):
    """float64 attention; ``allowed`` broadcastable to [B, Hq, Nq, Nk]."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1).astype(np.float64), np.repeat(v, group, 1).astype(np.float64)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) * scale
    if additive is not None:
        s = s + additive.astype(np.float64)
    s = np.where(allowed, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    den = p.sum(-1, keepdims=True)
    out = (p @ v) / np.where(den > 0, den, 1)
    empty = den[..., 0] == 0
    out[empty] = 0.0 if empty_rows == "zero" else np.nan
    return out


def _as_np_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float16


def _run_emu(seed=0, mask_tensor=None, mask_arr=None, **kw):
    """Build the emulated kernel for llvm, run it on random inputs, return (out, inputs)."""
    key = repr(sorted((k, repr(v)) for k, v in kw.items()))
    if key not in _EMU_CACHE:
        f, bm = fused_attention_cuda_reference_tir(**kw)
        _EMU_CACHE[key] = (tvm.compile(tvm.IRModule({"main": f}), target="llvm"), bm)
    lib, bm = _EMU_CACHE[key]
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, Nq, Nk, D = (kw[n] for n in ("batch", "q_heads", "kv_heads", "q_len", "kv_len",
                                             "head_dim"))
    Dv = kw.get("v_head_dim") or D
    npdt = _as_np_dtype(kw.get("dtype", "float16"))
    q = rng.standard_normal((B, Hq, Nq, D)).astype(npdt)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(npdt)
    v = rng.standard_normal((B, Hkv, Nk, Dv)).astype(npdt)
    out = np.full((B, Hq, Nq, Dv), np.nan, dtype=npdt)  # poisoned: unwritten elements show
    args = [q, k, v, bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full]
    if mask_arr is not None:
        args.append(mask_arr)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in [*args, out]]
    lib["main"](*args)
    return args[-1].numpy().astype(np.float64), (q, k, v), bm


BASE = {"batch": 1, "q_heads": 4, "kv_heads": 2, "q_len": 100, "kv_len": 90, "head_dim": 32,
        "block_q": 64, "block_kv": 32, "dtype": "float16"}


@pytest.mark.parametrize("name,over", [
    ("causal_gqa_ragged", {"mask": MaskSpec.causal(q_offset=-10)}),
    ("bottom_right_causal_3_stages", {"mask": MaskSpec.causal(q_offset=60), "q_len": 70,
                                      "kv_len": 130, "num_stages": 3}),
    ("window_1_stage", {"mask": MaskSpec.sliding_window(20), "num_stages": 1}),
    ("full_mqa_dv16_bq128", {"kv_heads": 1, "v_head_dim": 16, "block_q": 128}),
    ("chunked_causal", {"mask": MaskSpec.chunked(24, causal=True)}),
    ("causal_warp_rows32", {"mask": MaskSpec.causal(q_offset=-10), "warp_rows": 32}),
    ("window_warp_rows32_bq128_dv48", {"mask": MaskSpec.sliding_window(40), "warp_rows": 32,
                                       "block_q": 128, "v_head_dim": 48, "num_stages": 3}),
])
def test_emulated_kernel_matches_float64(name, over):
    kw = {**BASE, **over}
    out, (q, k, v), _ = _run_emu(**kw)
    spec = kw.get("mask", MaskSpec.full())
    allowed = spec.dense(kw["q_len"], kw["kv_len"])[None]
    ref = _reference(q, k, v, allowed, 1 / math.sqrt(kw["head_dim"]))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("empty_rows", ["zero", "nan"])
def test_emulated_fully_masked_rows(empty_rows):
    # q_offset = -70: rows 0..69 see no key; the whole first query tile visits no kv block.
    kw = {**BASE, "mask": MaskSpec.causal(q_offset=-70), "empty_rows": empty_rows}
    out, (q, k, v), _ = _run_emu(**kw)
    allowed = kw["mask"].dense(kw["q_len"], kw["kv_len"])[None]
    ref = _reference(q, k, v, allowed, 1 / math.sqrt(32), empty_rows=empty_rows)
    np.testing.assert_allclose(out[:, :, 70:], ref[:, :, 70:], atol=2e-3, rtol=2e-3)
    if empty_rows == "zero":
        assert (out[:, :, :70] == 0).all()
    else:
        assert np.isnan(out[:, :, :70]).all()


def test_emulated_static_block_sparse_bool_tensor():
    rng = np.random.default_rng(1)
    Nq, Nk = 100, 90
    blocks = rng.random((2, 3)) < 0.6  # block pattern on 64x32 blocks plus element noise
    dense = np.kron(blocks, np.ones((64, 32), bool))[:Nq, :Nk] & (rng.random((Nq, Nk)) < 0.8)
    dense[:, 0] = True
    kw = {**BASE, "mask": MaskSpec.static(dense), "mask_input": "bool",
          "mask_input_shape": (Nq, Nk)}
    out, (q, k, v), bm = _run_emu(mask_arr=dense, **kw)
    assert bm.visited_fraction < 1.0
    ref = _reference(q, k, v, dense[None, None], 1 / math.sqrt(32))
    np.testing.assert_allclose(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("warp_rows", [16, 32])
def test_emulated_dynamic_additive_mask_bf16(warp_rows):
    rng = np.random.default_rng(2)
    B, Nq, Nk = 2, 100, 90
    add = np.where(rng.random((B, 1, Nq, Nk)) < 0.2, -np.inf, rng.standard_normal((B, 1, Nq, Nk)))
    kw = {**BASE, "batch": B, "dtype": "bfloat16", "mask": MaskSpec.dynamic(),
          "mask_input": "additive", "mask_input_shape": (B, 1, Nq, Nk), "warp_rows": warp_rows}
    add_bf = add.astype(_as_np_dtype("bfloat16"))
    out, (q, k, v), _ = _run_emu(mask_arr=add_bf, **kw)
    ref = _reference(q, k, v, np.isfinite(add_bf.astype(np.float64)), 1 / math.sqrt(32),
                     additive=np.where(np.isfinite(add_bf.astype(np.float64)),
                                       add_bf.astype(np.float64), 0))
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)  # bf16 inputs and P


def test_rejects_bad_arguments():
    with pytest.raises(NotImplementedError, match="dtype"):
        fused_attention_cuda(**{**BASE, "dtype": "float32"})
    with pytest.raises(ValueError, match="multiples of 16"):
        fused_attention_cuda(**{**BASE, "head_dim": 40})
    with pytest.raises(ValueError, match="block_q"):
        fused_attention_cuda(**{**BASE, "block_q": 32})
    with pytest.raises(NotImplementedError, match="arch"):
        fused_attention_cuda(**{**BASE, "arch": "sm_70"})


# ---------------------------------------------------------------- cuda build (no GPU)
needs_nvcc = pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None, reason="needs nvcc")


def _cuda_source(arch, dtype, D, block_q, mask=None, **extra):
    f, _ = fused_attention_cuda(batch=4, q_heads=16, kv_heads=16, q_len=4096, kv_len=4096,
                                head_dim=D, dtype=dtype, mask=mask or MaskSpec.causal(),
                                block_q=block_q, block_kv=64, arch=arch, **extra)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=cuda_target(arch))
    (src,) = cuda_aot.cuda_sources(lib)
    return lib, src


@needs_nvcc
@pytest.mark.parametrize("arch,dtype,warp_rows", [
    ("sm_80", "float16", 16), ("sm_90", "float16", 16), ("sm_90", "bfloat16", 16),
    ("sm_90", "float16", 32),
    pytest.param("sm_80", "bfloat16", 16, marks=pytest.mark.slow),
    pytest.param("sm_80", "bfloat16", 32, marks=pytest.mark.slow)])
def test_cuda_build_ptx_ptxas_sass(arch, dtype, warp_rows):
    D, BQ = 128, 128
    lib, src = _cuda_source(arch, dtype, D, BQ, warp_rows=warp_rows)
    ptx = cuda_aot.compile_source(src, arch, "ptx").decode()
    ty = "f16" if dtype == "float16" else "bf16"
    n_mma = ptx.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32")
    # QK^T + PV per kv block, fully unrolled, per m16 tile of the warp
    assert n_mma == 2 * (D // 16) * (64 // 8) * (warp_rows // 16), n_mma
    assert "cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    cubin, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    (rep,) = cuda_aot.ptxas_report(log).values()
    assert rep["registers"] <= 255 and rep["stack"] == 0 and rep["spill_stores"] == 0, rep
    dyn = shared_memory_bytes(D, D, BQ, 64, 2, warp_rows)
    assert f"store i64 {dyn}," in lib.mod.inspect_source("ll")  # host launches with this smem
    assert dyn + rep["smem_static"] <= (227 if arch == "sm_90" else 163) * 1024
    text = cuda_aot.sass(cubin)
    if text is None:
        pytest.skip("cuobjdump/nvdisasm not installed (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm): SASS not checked")
    assert text.count("HMMA.16816.F32") == n_mma
    assert "LDGSTS" in text and "LDSM" in text


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("D,block_q,stages,warp_rows", [
    (64, 128, 2, 16), (128, 64, 3, 16), (64, 64, 1, 16), (128, 128, 3, 32), (64, 64, 2, 32)])
def test_cuda_build_variants_slow(arch, D, block_q, stages, warp_rows):
    _, src = _cuda_source(arch, "float16", D, block_q, mask=MaskSpec.sliding_window(512),
                       num_stages=stages, warp_rows=warp_rows)
    _, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    (rep,) = cuda_aot.ptxas_report(log).values()
    assert rep["registers"] <= 255 and rep["stack"] == 0, rep


@needs_nvcc
def test_cuda_build_with_mask_tensor():
    _, src = _cuda_source("sm_90", "float16", 64, 64, mask=MaskSpec.dynamic(), mask_input="bool",
                       mask_input_shape=(4, 1, 4096, 4096))
    _, log = cuda_aot.compile_source(src, "sm_90", "cubin", verbose=True)
    (rep,) = cuda_aot.ptxas_report(log).values()
    assert rep["stack"] == 0, rep


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py --dry-run builds its kernels and never touches a GPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path), "--dry-run", "--quick"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dry_run"] and len(res["built"]) == 3 + 3 * 2  # variants + timing x warp_rows
    assert (tmp_path / "table.md").exists()


def test_relax_call_tir_builds_for_cuda():
    """How LowerAttentionToTIR uses it for cuda: call_tir + BlockMask constants; dlight skips it."""
    from tvm import relax

    prim, bm = fused_attention_cuda(batch=1, q_heads=4, kv_heads=2, q_len=256, kv_len=256,
                                    head_dim=64, mask=MaskSpec.causal(), arch="sm_90")
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, 4, 256, 64), "float16"))
    kv = [relax.Var(n, relax.TensorType((1, 2, 256, 64), "float16")) for n in "kv"]
    with bb.function("main", [q, *kv]):
        with bb.dataflow():
            gv = bb.add_func(prim, "fused_attention_cuda")
            ins = [q, *kv] + [relax.const(a) for a in
                              (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
            o = bb.emit(relax.call_tir(gv, relax.Tuple(ins),
                                       out_ty=relax.TensorType((1, 4, 256, 64), "float16")))
            out = bb.emit_output(relax.op.add(o, o))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=cuda_target("sm_90"))
    (src,) = cuda_aot.cuda_sources(ex)
    assert src.count("af_mma(") == 1 + 2 * (64 // 16) * (64 // 8)  # definition + calls
