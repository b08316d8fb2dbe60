"""bf16 AVX-512 matmul kernel: packing, RNE rounding of x, numerics vs float64, vdpbf16ps in asm."""

import pathlib

import ml_dtypes
import numpy as np
import pytest
import tvm
from attnforge.schedules.matmul_bf16_cpu import (
    bf16_matmul_func, bf16_matmul_reference, pack_weight, packed_shape,
)
from tvm import tirx

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})


def _has_bf16() -> bool:
    try:
        return "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


needs_bf16 = pytest.mark.skipif(not _has_bf16(), reason="no avx512_bf16 in /proc/cpuinfo")


def _build(m, n, k, **kw):
    return tvm.compile(bf16_matmul_func(m, n, k, **kw), target=TARGET)


def _run(lib, x, w, nb=4):
    out = tvm.runtime.tensor(np.full((x.shape[0], w.shape[1]), np.nan, np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight(w, nb)), out)
    return out.numpy()


def _check(got, x, w):
    """Only the fp32 accumulation order may differ from float64 on the bf16-rounded inputs."""
    ref = bf16_matmul_reference(x, w)
    mag = (np.abs(x.astype(ml_dtypes.bfloat16).astype(np.float64))
           @ np.abs(w.astype(ml_dtypes.bfloat16).astype(np.float64)))
    # fp32 sums of k terms: error <~ k * 2^-24 * sum|terms|; 1e-6 * sqrt-ish slack, still far
    # below one bf16 rounding of x (2^-9 relative), which a wrong rounding would show
    tol = 2.0**-24 * 4 * np.sqrt(x.shape[1]) * mag + 1e-30
    assert np.all(np.abs(got - ref) <= tol), np.abs(got - ref).max()


def test_pack_weight_layout():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 37)).astype(np.float32)  # K odd, N not a multiple of 16
    p = pack_weight(w, nb=2)
    assert p.shape == packed_shape(37, 7, 2) == (2, 4, 2, 16, 2) and p.dtype == np.uint16
    bits = w.astype(ml_dtypes.bfloat16).view(np.uint16)
    for a, b, c, d, e in np.ndindex(p.shape):
        kk, nn = 2 * b + e, 16 * (2 * a + c) + d
        assert p[a, b, c, d, e] == (bits[kk, nn] if kk < 7 and nn < 37 else 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exceeds 24"):
        bf16_matmul_func(64, 64, 64, mr=8, nb=4)
    with pytest.raises(ValueError, match="sizes must be positive"):
        bf16_matmul_func(0, 64, 64)
    with pytest.raises(ValueError, match="2-D"):
        pack_weight(np.zeros((2, 3, 4), np.float32))


@needs_bf16
@pytest.mark.parametrize("m,n,k,tile", [
    (37, 50, 33, {}),                     # nothing divides: M, N, K (odd) padded
    (67, 130, 96, {"mr": 8, "nb": 2}),
    (128, 128, 256, {}),                  # exact tiles (vectorised copy-out)
    (5, 16, 2, {"mr": 4, "nb": 1}),
])
def test_numerics_static(m, n, k, tile):
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    _check(_run(_build(m, n, k, **tile), x, w, tile.get("nb", 4)), x, w)


@needs_bf16
def test_numerics_symbolic_rows():
    lib = _build(tirx.Var("m", "int64"), 70, 45)  # one kernel for every row count
    rng = np.random.default_rng(1)
    w = rng.standard_normal((45, 70)).astype(np.float32) * 3
    for m in (1, 6, 67):
        x = rng.standard_normal((m, 45)).astype(np.float32)
        _check(_run(lib, x, w), x, w)


@needs_bf16
def test_activation_rounding_is_nearest_even_and_keeps_nan():
    """x times an identity weight returns bf16(x) exactly: ties go to even, NaN stays NaN; a
    denormal becomes 0 (``vdpbf16ps`` treats denormal inputs as zero, whatever MXCSR says)."""
    one = 1.0
    ties = np.array([one + 2.0**-8, one + 3 * 2.0**-8, -(2.0 + 2.0**-7), 1.5 + 2.0**-9,
                     3.0e38, 1e-40], np.float32)  # halfway cases, near max, a denormal
    k = 8
    x = np.zeros((3, k), np.float32)
    x[0, :6] = ties
    x[1] = np.random.default_rng(2).standard_normal(k).astype(np.float32)
    x[2] = np.nan
    lib = _build(3, k, k)
    got = _run(lib, x, np.eye(k, dtype=np.float32))
    expect = x[:2].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert expect[0, 5] != 0 and got[0, 5] == 0  # the denormal, flushed
    expect[0, 5] = 0
    np.testing.assert_array_equal(got[:2], expect)
    assert got[0, 0] == 1.0 and got[0, 1] == one + 4 * 2.0**-8  # to even, both directions
    assert np.isnan(got[2]).all()


@needs_bf16
def test_asm_has_vdpbf16ps_inlined():
    mod = _build(64, 64, 64).mod
    asm = mod.inspect_source("asm")
    assert asm.count("vdpbf16ps") >= 24  # the unrolled 6 x 4 register tile
    assert "attnforge_dpbf16ps" not in asm  # the LLVM wrapper is inlined, no call
