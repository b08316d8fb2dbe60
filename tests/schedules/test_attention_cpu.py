"""Tests of the fused flash-style attention kernel for llvm (schedules/attention_cpu.py)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import tvm
import tvm_ffi
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.block_mask import MaskSpec
from hypothesis import given, settings
from hypothesis import strategies as st

F32_MIN = float(np.finfo(np.float32).min)


@functools.cache
def _target():
    return default_cpu_target()


@functools.lru_cache(maxsize=64)
def _build(**kw):
    f, bm = fused_attention_cpu(**kw)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=_target())
    return lib, bm


def _reference(q, k, v, scale, allowed=None, additive=None, empty_rows="zero"):
    """float64 softmax(scale q k^T + additive, masked -inf) v with repeated kv heads."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = scale * q @ k.transpose(0, 1, 3, 2)
    if additive is not None:
        s = s + additive.astype(np.float64)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.exp(s - np.where(np.isinf(m), 0.0, m))
        den = p.sum(-1, keepdims=True)
        o = (p @ v) / den
    return np.where(den == 0, 0.0, o) if empty_rows == "zero" else o


def _check(B=1, Hq=2, Hkv=2, Nq=70, Nk=70, D=32, Dv=None, spec=None, mask_input=None,
           mtensor=None, empty_rows="zero", block_q=64, block_kv=64, seed=0, rtol=1e-5):
    spec = MaskSpec.full() if spec is None else spec
    Dv = D if Dv is None else Dv
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Nq, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, Nk, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, Nk, Dv), dtype=np.float32)
    scale = float(D) ** -0.5 * 1.3
    lib, bm = _build(batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Nq, kv_len=Nk, head_dim=D,
                     v_head_dim=Dv, scale=scale, mask=spec, block_q=block_q, block_kv=block_kv,
                     mask_input=mask_input,
                     mask_input_shape=None if mtensor is None else tuple(mtensor.shape),
                     empty_rows=empty_rows)
    out = np.full((B, Hq, Nq, Dv), 7.0, dtype=np.float32)  # never zeros: catches missed stores
    args = [q, k, v, bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full]
    args += [mtensor] if mtensor is not None else []
    targs = [tvm.runtime.tensor(a) for a in args + [out]]
    lib["main"](*targs)
    out = targs[-1].numpy()
    allowed = spec.dense(Nq, Nk)[None] if spec.kind in ("structured", "static") else None
    if mask_input == "bool":
        allowed = mtensor if allowed is None else allowed & mtensor
    additive = mtensor if mask_input == "additive" else None
    ref = _reference(q, k, v, scale, allowed, additive, empty_rows)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    fin = ~np.isnan(ref)
    np.testing.assert_allclose(out[fin], ref[fin], rtol=rtol, atol=rtol * np.abs(ref[fin]).max())
    return out, ref


# ---------------------------------------------------------------------------- structure
def test_primfunc_is_deterministic_and_annotated():
    kw = {"batch": 2, "q_heads": 4, "kv_heads": 2, "q_len": 40, "kv_len": 50, "head_dim": 32,
          "scale": 0.2, "mask": MaskSpec.causal(10), "block_q": 16, "block_kv": 16}
    f1, bm1 = fused_attention_cpu(**kw)
    f2, bm2 = fused_attention_cpu(**kw)
    tvm.ir.assert_structural_equal(f1, f2)
    np.testing.assert_array_equal(bm1.kv_indices, bm2.kv_indices)
    f3, _ = fused_attention_cpu(**{**kw, "block_kv": 32})
    assert not tvm_ffi.structural_equal(f1, f3)
    f4, _ = fused_attention_cpu(**{**kw, "rows": 2})
    assert not tvm_ffi.structural_equal(f1, f4)
    assert int(f1.attrs["op_pattern"]) == 8
    assert bool(f1.attrs["tir.noalias"])
    assert str(f1.attrs["global_symbol"]) == "fused_attention_cpu"
    shapes = [tuple(int(x) for x in p.shape) for p in f1.params]
    dtypes = [str(p.dtype) for p in f1.params]
    nqb, w = bm1.num_q_blocks, bm1.max_blocks
    assert shapes == [(2, 4, 40, 32), (2, 2, 50, 32), (2, 2, 50, 32), (1, nqb), (1, nqb, w),
                      (1, nqb, w), (2, 4, 40, 32)]
    assert dtypes == ["float32"] * 3 + ["int32"] * 3 + ["float32"]
    assert [p.name for p in f1.params] == ["Q", "K", "V", "kv_num_blocks", "kv_indices",
                                           "kv_is_full", "O"]


def test_mask_tensor_parameter_and_v_head_dim():
    f, bm = fused_attention_cpu(batch=2, q_heads=4, kv_heads=1, q_len=40, kv_len=50, head_dim=32,
                                v_head_dim=16, mask=MaskSpec.dynamic(), mask_input="bool",
                                mask_input_shape=(2, 1, 40, 50))
    bufs = list(f.params)
    assert len(bufs) == 8
    assert tuple(int(x) for x in bufs[6].shape) == (2, 1, 40, 50) and str(bufs[6].dtype) == "bool"
    assert tuple(int(x) for x in bufs[7].shape) == (2, 4, 40, 16)
    assert float(bm.visited_fraction) == 1.0 and bm.partial_fraction == 1.0
    f, _ = fused_attention_cpu(batch=1, q_heads=2, kv_heads=2, q_len=8, kv_len=8, head_dim=32,
                               mask_input="additive", mask_input_shape=(8, 8))
    assert str(f.params[6].dtype) == "float32"


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "case",
    [
        {"B": 2, "Nq": 130, "Nk": 130, "D": 64, "spec": MaskSpec.causal()},
        {"Nq": 70, "Nk": 150, "D": 64, "spec": MaskSpec.causal(80)},  # bottom-right, Nq < Nk
        {"Nq": 100, "Nk": 60, "spec": MaskSpec.causal(-40)},  # first rows have no key at all
        {"Nq": 100, "Nk": 60, "spec": MaskSpec.causal(-40), "empty_rows": "nan"},
        {"Nq": 200, "Nk": 200, "spec": MaskSpec.sliding_window(40)},
        {"Nq": 150, "Nk": 170, "spec": MaskSpec.sliding_window(30, 20)},
        {"Nq": 150, "Nk": 150, "spec": MaskSpec.chunked(48)},
        {"Nq": 150, "Nk": 150, "spec": MaskSpec.chunked(48, causal=True), "block_q": 32,
         "block_kv": 16},
        {"Hq": 8, "Hkv": 2, "Nq": 90, "Nk": 90, "D": 80, "spec": MaskSpec.causal()},  # GQA
        {"Hq": 4, "Hkv": 1, "Nq": 65, "Nk": 129, "D": 128, "spec": MaskSpec.full()},  # MQA
        {"Nq": 1, "Nk": 77, "D": 64, "Dv": 32, "spec": MaskSpec.full()},  # decode-like, Dv != D
    ],
    ids=lambda c: f"{c['spec'].describe()}-{c.get('Nq')}x{c.get('Nk')}-{c.get('empty_rows', '')}",
)
def test_structured_masks(case):
    _check(**case)


@pytest.mark.parametrize("empty_rows", ["zero", "nan"])
@pytest.mark.parametrize("per_head", [False, True])
def test_static_block_sparse(empty_rows, per_head):
    rng = np.random.default_rng(3)
    hm, nq, nk, bs = (2 if per_head else 1), 100, 90, 16
    blocks = rng.random((hm, -(-nq // bs), -(-nk // bs))) < 0.35
    dense = np.repeat(np.repeat(blocks, bs, 1), bs, 2)[:, :nq, :nk]
    dense &= rng.random(dense.shape) < 0.8  # partial blocks too
    dense[:, 5] = False  # a fully masked row
    spec = MaskSpec.static(dense)
    mt = dense[None]  # (1, Hm, Nq, Nk)
    out, _ = _check(Hq=2, Nq=nq, Nk=nk, spec=spec, mask_input="bool", mtensor=mt,
                    empty_rows=empty_rows, block_q=bs, block_kv=bs)
    assert (out[:, :, 5] == 0).all() if empty_rows == "zero" else np.isnan(out[:, :, 5]).all()


@pytest.mark.parametrize("empty_rows", ["zero", "nan"])
def test_dynamic_padding_mask(empty_rows):
    B, Nq, Nk = 2, 70, 100
    rng = np.random.default_rng(1)
    m = np.ones((B, 1, Nq, Nk), dtype=bool)
    m[0, :, :, 60:] = False  # padded keys of sample 0
    m[1] = rng.random((1, Nq, Nk)) < 0.7
    m[1, 0, 3] = False  # a fully padded row
    out, _ = _check(B=B, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, spec=MaskSpec.dynamic(), mask_input="bool",
                    mtensor=m, empty_rows=empty_rows)
    assert (out[1, :, 3] == 0).all() if empty_rows == "zero" else np.isnan(out[1, :, 3]).all()


def test_causal_combined_with_padding_mask():
    m = np.ones((2, 1, 1, 90), dtype=bool)  # key padding broadcast over queries
    m[1, ..., 50:] = False
    _check(B=2, Nq=90, Nk=90, spec=MaskSpec.causal(), mask_input="bool", mtensor=m)


@pytest.mark.parametrize("shape", [(1, 1, 80, 96), (2, 3, 80, 96)])
def test_additive_mask_with_finfo_min_rows(shape):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(shape) * 2).astype(np.float32)
    a[..., 7, :] = F32_MIN  # a whole row at finfo.min: uniform weights, as in PyTorch
    a[..., 9, 40:] = F32_MIN
    out, _ = _check(B=2, Hq=3, Hkv=1, Nq=80, Nk=96, spec=MaskSpec.dynamic(),
                    mask_input="additive", mtensor=a)
    assert np.isfinite(out).all()


def test_causal_combined_with_additive_key_padding():
    a = np.zeros((2, 1, 1, 96), dtype=np.float32)  # HF-style [B, 1, 1, Nk] additive padding
    a[0, ..., :3] = F32_MIN  # left padding: the first queries see only padded keys
    a[1, ..., 70:] = F32_MIN
    _check(B=2, Hq=2, Hkv=1, Nq=96, Nk=96, spec=MaskSpec.causal(), mask_input="additive",
           mtensor=a)


def test_bfloat16_inputs():
    torch = pytest.importorskip("torch")
    B, H, N, D = 1, 2, 100, 64
    lib, bm = _build(batch=B, q_heads=H, kv_heads=H, q_len=N, kv_len=N, head_dim=D,
                     dtype="bfloat16", scale=0.125, mask=MaskSpec.causal())
    q, k, v = (torch.randn(B, H, N, D).bfloat16() for _ in range(3))
    o = torch.zeros(B, H, N, D, dtype=torch.bfloat16)
    arrays = [torch.from_numpy(a) for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    lib["main"](q, k, v, *arrays, o)
    ref = _reference(q.float().numpy(), k.float().numpy(), v.float().numpy(), 0.125,
                     MaskSpec.causal().dense(N, N)[None])
    np.testing.assert_allclose(o.float().numpy(), ref, atol=1e-2 * np.abs(ref).max())


_SPECS = st.sampled_from(["full", "causal", "window", "window2", "chunk"])


@settings(max_examples=15, deadline=None)
@given(nq=st.integers(1, 150), nk=st.integers(1, 150), d=st.sampled_from([32, 48, 64]),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), kind=_SPECS,
       off=st.integers(-20, 40), blocks=st.sampled_from([(64, 64), (32, 16), (16, 32)]))
def test_property_random_shapes_and_masks(nq, nk, d, heads, kind, off, blocks):
    spec = {"full": MaskSpec.full(), "causal": MaskSpec.causal(off),
            "window": MaskSpec.sliding_window(abs(off) + 3, 0, off),
            "window2": MaskSpec.sliding_window(5, abs(off)),
            "chunk": MaskSpec.chunked(20 + off % 17)}
    _check(B=2, Hq=heads[0], Hkv=heads[1], Nq=nq, Nk=nk, D=d, spec=spec[kind],
           block_q=blocks[0], block_kv=blocks[1], seed=nq * 1000 + nk)


# ---------------------------------------------------------------------------- codegen
def _has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return any("avx512f" in line for line in fh if line.startswith("flags"))
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512f(), reason="host CPU lacks avx512f (see /proc/cpuinfo)")
def test_asm_has_zmm_fma_and_no_scalar_exp():
    lib, _ = _build(batch=1, q_heads=1, kv_heads=1, q_len=128, kv_len=128, head_dim=64,
                    scale=0.125, mask=MaskSpec.causal())
    asm = lib.mod.inspect_source("asm")
    assert "vfmadd" in asm and any("vfmadd" in ln and "zmm" in ln for ln in asm.splitlines())
    assert "expf" not in asm and "exp2f" not in asm


# ---------------------------------------------------------------------------- errors
_BASE = {"batch": 1, "q_heads": 4, "kv_heads": 2, "q_len": 16, "kv_len": 16, "head_dim": 32}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kv_heads": 3}, "multiple of kv_heads"),
        ({"block_q": 0}, "block_q and block_kv must be positive"),
        ({"block_kv": -64}, "block_q and block_kv must be positive"),
        ({"q_len": 0}, "q_len must be positive"),
        ({"mask_input": "float"}, "mask_input must be one of"),
        ({"mask_input": "bool"}, "pass mask_input_shape"),
        ({"mask_input": "bool", "mask_input_shape": (1, 3, 16, 16)}, "heads dim must be 1 or 4"),
        ({"mask_input": "bool", "mask_input_shape": (16,)}, "expected 2 to 4 dims"),
        ({"mask": MaskSpec.dynamic()}, "pass the mask tensor"),
        ({"mask": MaskSpec.static(np.ones((16, 16), bool))}, "mask_input='bool'"),
        ({"empty_rows": "inf"}, "empty_rows must be one of"),
        ({"block_kv": 30, "rows": 4}, "multiple of rows"),
    ],
)
def test_invalid_arguments_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        fused_attention_cpu(**{**_BASE, **kw})


def test_unsupported_dtype_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="float16"):
        fused_attention_cpu(**_BASE, dtype="float16")


if os.environ.get("TVM_NUM_THREADS") is None:  # keep the suite fast on shared 2-core hosts
    os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)
