"""INT8 VNNI matmul kernel: exact int32 accumulation, fused dequant, padding, vpdpbusd in asm."""

import pathlib

import numpy as np
import pytest
import tvm
from attnforge.target import host_target
from attnforge.schedules.matmul_int8_cpu import (
    fold_dequant,
    int8_matmul_func,
    int8_matmul_reference,
    pack_weight,
    packed_shape,
)

TARGET = host_target()


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_vnni(), reason="no avx512_vnni in /proc/cpuinfo")


def _run(lib, arrays, out_shape, out_dtype):
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (*arrays, np.zeros(out_shape, out_dtype))]
    lib["main"](*args)
    return args[-1].numpy()


def _data(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    return a, w


def test_pack_weight_layout():
    w = np.arange(20 * 6, dtype=np.int64).reshape(20, 6).astype(np.int8)
    wp = pack_weight(w, nb=1)
    assert wp.shape == packed_shape(20, 6, nb=1) == (2, 2, 16, 4)
    assert wp[1, 1, 3, 1] == w[19, 5]
    assert wp[1, 1, 4, 0] == 0 and wp[0, 1, 0, 2] == 0  # zero padding in N and K
    with pytest.raises(ValueError, match="int8"):
        pack_weight(w.astype(np.int32))


@pytest.mark.parametrize(
    ("m", "n", "k", "mr", "nb"),
    [(64, 64, 64, 4, 2), (37, 50, 30, 4, 2), (1, 17, 5, 4, 2), (100, 96, 130, 6, 2),
     (33, 200, 64, 8, 1)],
)
def test_int32_accumulator_exact(m, n, k, mr, nb):
    a, w = _data(m, n, k)
    func = int8_matmul_func(m, n, k, dequant=False, mr=mr, nb=nb)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    got = _run(lib, (a, pack_weight(w, nb)), (m, n), np.int32)
    np.testing.assert_array_equal(got, int8_matmul_reference(a, w))


def test_extreme_values_exact():
    m, n, k = 16, 32, 1024  # |acc| up to 255 * 128 * 1024 = 33e6: still exact in int32
    a = np.full((m, k), 255, np.uint8)
    w = np.full((n, k), -128, np.int8)
    w[1] = 127
    lib = tvm.compile(tvm.IRModule({"main": int8_matmul_func(m, n, k, dequant=False)}),
                      target=TARGET)
    np.testing.assert_array_equal(_run(lib, (a, pack_weight(w)), (m, n), np.int32),
                                  int8_matmul_reference(a, w))


def test_fused_dequant_matches_fp32_formula():
    m, n, k = 45, 70, 90
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    wf = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    a_scale, a_zp = float(x.max() - x.min()) / 255, 0
    a_zp = int(np.round(-x.min() / a_scale))
    a = np.clip(np.round(x / a_scale) + a_zp, 0, 255).astype(np.uint8)
    w_scale = np.abs(wf).max(axis=1) / 127
    w = np.clip(np.round(wf / w_scale[:, None]), -127, 127).astype(np.int8)
    scale, offset = fold_dequant(w, w_scale, a_scale, a_zp, bias)
    lib = tvm.compile(tvm.IRModule({"main": int8_matmul_func(m, n, k)}), target=TARGET)
    got = _run(lib, (a, pack_weight(w), scale, offset), (m, n), np.float32)
    exact = (a.astype(np.float64) - a_zp) @ (w.astype(np.float64) * w_scale[:, None]).T
    exact = exact * a_scale + bias
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4 * np.abs(exact).max())
    # and it approximates the fp32 linear layer (quantisation error only)
    ref = x @ wf.T + bias
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_asm_has_vpdpbusd():
    lib = tvm.compile(tvm.IRModule({"main": int8_matmul_func(64, 64, 64)}), target=TARGET)
    asm = lib.mod.inspect_source("asm")
    assert "vpdpbusd" in asm
    assert "zmm" in asm


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        int8_matmul_func(0, 16, 16)
    with pytest.raises(ValueError, match="1 KB"):
        int8_matmul_func(16, 16, 16, mr=8, nb=4)
