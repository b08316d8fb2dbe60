"""InsertDynamicQuantize (per-token uint8 at run time) and its lowering: Before/Expected, numerics.
"""

import pathlib

import numpy as np
import pytest
import tvm
from attnforge.passes.insert_dynamic_quantize import InsertDynamicQuantize
from attnforge.passes.insert_quantize import InsertActivationQuantize
from attnforge.passes.lower_int8_matmul import LowerInt8Matmul
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class Before:  # two projections of the same x (as q/k/v), int8 weights, fp32 activation
    @R.function
    def main(x: R.Tensor((2, 5, 40), "float32"), wq: R.Tensor((40, 24), "int8"),
             ws: R.Tensor((24,), "float32"), vq: R.Tensor((40, 24), "int8"),
             vs: R.Tensor((24,), "float32")):
        with R.dataflow():
            dq = R.dequantize(wq, ws, R.const(0, "int8"), axis=1, out_dtype="float32")
            y = R.matmul(x, dq)
            dv = R.dequantize(vq, vs, R.const(0, "int8"), axis=1, out_dtype="float32")
            v = R.matmul(x, dv)
            z = R.add(y, v)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 5, 40), "float32"), wq: R.Tensor((40, 24), "int8"),
             ws: R.Tensor((24,), "float32"), vq: R.Tensor((40, 24), "int8"),
             vs: R.Tensor((24,), "float32")):
        with R.dataflow():
            dq = R.dequantize(wq, ws, R.const(0, "int8"), axis=1, out_dtype="float32")
            x2 = R.reshape(x, R.shape([10, 40]))
            mn = R.min(x2, axis=[1])
            lo = R.minimum(mn, R.const(0.0, "float32"))
            mx = R.max(x2, axis=[1])
            hi = R.maximum(mx, R.const(0.0, "float32"))
            rng = R.subtract(hi, lo)
            step = R.divide(rng, R.const(255.0, "float32"))
            s = R.maximum(step, R.const(1e-30, "float32"))
            neg = R.negative(lo)
            ratio = R.divide(neg, s)
            rounded = R.round(ratio)
            clipped = R.clip(rounded, 0, 255)
            z = R.astype(clipped, "int32")
            q = R.quantize(x2, s, z, axis=0, out_dtype="uint8")
            xd = R.dequantize(q, s, z, axis=0, out_dtype="float32")
            y2 = R.matmul(xd, dq)
            y = R.reshape(y2, R.shape([2, 5, 24]))
            dv = R.dequantize(vq, vs, R.const(0, "int8"), axis=1, out_dtype="float32")
            v2 = R.matmul(xd, dv)
            v = R.reshape(v2, R.shape([2, 5, 24]))
            z_1 = R.add(y, v)
            R.output(z_1)
        return z_1


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"wq": rng.integers(-127, 128, (40, 24), dtype=np.int8),
            "ws": rng.random(24, dtype=np.float32) * 0.02,
            "vq": rng.integers(-127, 128, (40, 24), dtype=np.int8),
            "vs": rng.random(24, dtype=np.float32) * 0.02}


def _bind(mod, params):
    return relax.transform.BindParams("main", params)(mod)


def test_before_expected_shared_quantization():
    p = _params()
    tvm.ir.assert_structural_equal(InsertDynamicQuantize()(_bind(Before, p)),
                                   _bind(Expected, p))


def test_noop_cases():
    p = _params()
    mod = _bind(Before, p)
    tvm.ir.assert_structural_equal(InsertDynamicQuantize(sites=[])(mod), mod)
    # sites with static per-tensor parameters already: their activation is no longer fp32
    static = InsertActivationQuantize({0: (0.05, 7), 1: (0.05, 7)})(mod)
    tvm.ir.assert_structural_equal(InsertDynamicQuantize()(static), static)


def test_only_selected_sites():
    got = InsertDynamicQuantize(sites=[1])(_bind(Before, _params())).script(show_meta=False)
    assert got.count("R.quantize(") == 1 and got.count("R.matmul(x, ") == 1


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _run(mod, x):
    from attnforge.schedules.cpu_schedule import cpu_build_pipeline
    from attnforge.target import host_target

    target = host_target()
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(cpu_build_pipeline(target)(mod), target=target)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.skipif(not _has_vnni(), reason="no avx512_vnni in /proc/cpuinfo")
def test_lowered_per_row_kernel_matches_qdq_and_reference():
    p = _params()
    qdq = InsertDynamicQuantize()(_bind(Before, p))
    lowered = LowerInt8Matmul()(qdq)
    text = lowered.script(show_meta=False)
    assert text.count("R.call_tir(cls.int8_matmul_cpu") == 2 and "R.matmul" not in text
    rng = np.random.default_rng(1)
    # rows of very different magnitude, one all-zero row, one all-negative row
    x = (rng.standard_normal((2, 5, 40)) * np.logspace(-3, 1, 5)[:, None]).astype(np.float32)
    x[0, 2] = 0.0
    x[1, 3] = -np.abs(x[1, 3])
    got = _run(lowered, x)
    np.testing.assert_allclose(got, _run(qdq, x), rtol=1e-5, atol=1e-6)
    # numpy reference of the same per-row quantisation, then exact integer matmul
    x2 = x.reshape(10, 40).astype(np.float64)
    lo, hi = np.minimum(x2.min(1), 0), np.maximum(x2.max(1), 0)
    s = np.maximum((hi - lo) / 255, 1e-30)
    z = np.clip(np.round(-lo / s), 0, 255)
    q = np.clip(np.round(x2 / s[:, None]) + z[:, None], 0, 255)
    ref = sum(((q - z[:, None]) * s[:, None]) @ (p[w].astype(np.float64) * p[sc])
              for w, sc in (("wq", "ws"), ("vq", "vs")))
    np.testing.assert_allclose(got.reshape(10, 24), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    fp32 = x2 @ (p["wq"] * p["ws"] + p["vq"] * p["vs"])
    row_err = np.abs(got.reshape(10, 24) - fp32).max(1) / (np.abs(fp32).max(1) + 1e-30)
    assert row_err[np.abs(fp32).max(1) > 0].max() < 0.05  # every row keeps its own precision


def test_reshapes_of_one_tensor_share_the_quantization():
    @I.ir_module
    class TwoReshapes:  # as BERT's q/k/v: each site reshapes the hidden state itself
        @R.function
        def main(x: R.Tensor((2, 5, 40), "float32"), wq: R.Tensor((40, 24), "int8"),
                 ws: R.Tensor((24,), "float32"), vq: R.Tensor((40, 24), "int8"),
                 vs: R.Tensor((24,), "float32")):
            with R.dataflow():
                a = R.reshape(x, R.shape([10, 40]))
                dq = R.dequantize(wq, ws, R.const(0, "int8"), axis=1, out_dtype="float32")
                y = R.matmul(a, dq)
                b = R.reshape(x, R.shape([10, 40]))
                dv = R.dequantize(vq, vs, R.const(0, "int8"), axis=1, out_dtype="float32")
                v = R.matmul(b, dv)
                z = R.add(y, v)
                R.output(z)
            return z

    got = InsertDynamicQuantize()(_bind(TwoReshapes, _params())).script(show_meta=False)
    assert got.count("R.quantize(") == 1 and got.count("R.min(") == 1
