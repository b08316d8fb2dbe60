"""The skinny-matmul rule used by generation programs: applies to ``[M<=16, K] x [K, N]``,
numerically exact vs numpy, declines other shapes/layouts."""

import numpy as np
import pytest
import tvm
from tvm.s_tir import dlight as dl
from tvm.script import tirx as T

from attnforge.schedules.decode_matvec_cpu import DecodeMatvecCPU
from attnforge.target import host_target


def _matmul(M, K, N, transposed=False):
    bshape = (N, K) if transposed else (K, N)

    @T.prim_func(private=True, s_tir=True)
    def main(A: T.Buffer((M, K), "float32"), B: T.Buffer(bshape, "float32"),
             C: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, j, k in T.grid(M, N, K):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                if transposed:
                    C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vj, vk]
                else:
                    C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vk, vj]

    return main


@pytest.mark.parametrize("M,K,N", [(1, 512, 1024), (3, 100, 1000), (8, 64, 4096)])
def test_applies_and_matches_numpy(M, K, N):
    func = _matmul(M, K, N)
    sch = DecodeMatvecCPU().apply(func, host_target(), False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized" in text
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=host_target())
    rng = np.random.default_rng(M)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    c = tvm.runtime.tensor(np.full((M, N), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,K,N,transposed", [(32, 64, 64, False), (1, 64, 64, True),
                                              (1, 64, 50, False)])
def test_declines_other_shapes(M, K, N, transposed):
    assert DecodeMatvecCPU().apply(_matmul(M, K, N, transposed), host_target(), False) is None


def test_runs_inside_apply_default_schedule():
    mod = tvm.IRModule({"main": _matmul(2, 64, 128)})
    with host_target():
        out = dl.ApplyDefaultSchedule(DecodeMatvecCPU())(mod)
    assert out["main"].attrs["tirx.is_scheduled"]


@pytest.mark.parametrize("M,K,N", [(1, 512, 1024), (5, 96, 320)])
def test_bf16_weights_get_the_same_schedule(M, K, N):
    """``StoreWeightsBF16``'s form ``A fp32 x float32(B bf16)``: scheduled (not left to the
    elementwise rule) and equal to numpy on the bf16-rounded weights."""
    import ml_dtypes

    @T.prim_func(private=True, s_tir=True)
    def main(A: T.Buffer((M, K), "float32"), B: T.Buffer((K, N), "bfloat16"),
             C: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, j, k in T.grid(M, N, K):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vk] * T.Cast("float32", B[vk, vj])

    sch = DecodeMatvecCPU().apply(main, host_target(), False)
    assert sch is not None and "T.vectorized" in sch.mod["main"].script()
    assert DecodeMatvecCPU(weight_dtypes=("float32",)).apply(main, host_target(), False) is None
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=host_target())
    rng = np.random.default_rng(K)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32).astype(ml_dtypes.bfloat16)
    c = tvm.runtime.tensor(np.full((M, N), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a.astype(np.float64) @ b.astype(np.float64),
                               rtol=1e-5, atol=1e-4)
