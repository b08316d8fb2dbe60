"""INT8 VNNI kernel, per-row (per-token) epilogue: exact against an integer reference."""

import pathlib

import numpy as np
import pytest
import tvm
from attnforge.schedules.matmul_int8_cpu import (
    int8_matmul_func,
    int8_matmul_reference,
    pack_weight,
)
from attnforge.target import host_target


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_vnni(), reason="no avx512_vnni in /proc/cpuinfo")


@pytest.mark.parametrize(("m", "n", "k"), [(64, 64, 64), (37, 50, 30), (1, 17, 5), (130, 96, 260)])
def test_per_row_epilogue(m, n, k):
    rng = np.random.default_rng(m + n + k)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    rs = rng.uniform(1e-4, 1.0, m).astype(np.float32)
    rz = rng.integers(0, 256, m).astype(np.int32)
    ws = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    cs = w.astype(np.int64).sum(axis=1).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": int8_matmul_func(m, n, k, per_row=True)}),
                      target=host_target())
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    args = [tvm.runtime.tensor(x) for x in
            (a, pack_weight(w), rs, rz, ws, cs, np.zeros((m, n), np.float32))]
    lib["main"](*args)
    acc = int8_matmul_reference(a, w).astype(np.float64)  # exact int32, checked to fit
    ref = (acc - rz[:, None] * cs[None, :].astype(np.float64)) * (
        rs[:, None].astype(np.float64) * ws[None, :])
    # fp32 epilogue on exact integers: error bounded by a few fp32 ulps of the operands
    bound = 4 * np.finfo(np.float32).eps * (np.abs(acc) + np.abs(rz[:, None] * cs[None, :])) \
        * rs[:, None] * ws[None, :]
    assert (np.abs(args[-1].numpy() - ref) <= bound + 1e-30).all()
