"""InsertActivationQuantize, FoldDequantizeQuantize, LowerInt8Matmul: Before/Expected, numerics."""

import pathlib

import numpy as np
import pytest
import tvm
from attnforge.passes.fold_dequantize_quantize import FoldDequantizeQuantize
from attnforge.passes.insert_quantize import InsertActivationQuantize
from attnforge.passes.lower_int8_matmul import LowerInt8Matmul
from attnforge.passes.quantize_weights import QuantizeWeights
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
S, Z = 0.05, 7


@I.ir_module
class QDQWeights:  # two projections of the same x (as q/k/v), int8 weights, fp32 activation
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
class ExpectedInserted:
    @R.function
    def main(x: R.Tensor((2, 5, 40), "float32"), wq: R.Tensor((40, 24), "int8"),
             ws: R.Tensor((24,), "float32"), vq: R.Tensor((40, 24), "int8"),
             vs: R.Tensor((24,), "float32")):
        with R.dataflow():
            dq = R.dequantize(wq, ws, R.const(0, "int8"), axis=1, out_dtype="float32")
            xq = R.quantize(x, R.const(S, "float32"), R.const(Z, "uint8"), axis=-1,
                            out_dtype="uint8")
            xd = R.dequantize(xq, R.const(S, "float32"), R.const(Z, "uint8"), axis=-1,
                              out_dtype="float32")
            y = R.matmul(xd, dq)
            dv = R.dequantize(vq, vs, R.const(0, "int8"), axis=1, out_dtype="float32")
            v = R.matmul(xd, dv)
            z = R.add(y, v)
            R.output(z)
        return z


@I.ir_module
class RoundTrip:
    @R.function
    def main(x: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            q = R.quantize(x, R.const(S, "float32"), R.const(Z, "uint8"), out_dtype="uint8")
            d = R.dequantize(q, R.const(S, "float32"), R.const(Z, "uint8"))
            q2 = R.quantize(d, R.const(S, "float32"), R.const(Z, "uint8"), out_dtype="uint8")
            R.output(q2)
        return q2


@I.ir_module
class RoundTripFolded:
    @R.function
    def main(x: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            q = R.quantize(x, R.const(S, "float32"), R.const(Z, "uint8"), out_dtype="uint8")
            R.output(q)
        return q


@I.ir_module
class Requantize:  # different scale: not an identity, left alone
    @R.function
    def main(x: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            q = R.quantize(x, R.const(S, "float32"), R.const(Z, "uint8"), out_dtype="uint8")
            d = R.dequantize(q, R.const(S, "float32"), R.const(Z, "uint8"))
            q2 = R.quantize(d, R.const(0.1, "float32"), R.const(Z, "uint8"), out_dtype="uint8")
            R.output(q2)
        return q2


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"wq": rng.integers(-127, 128, (40, 24), dtype=np.int8),
            "ws": rng.random(24, dtype=np.float32) * 0.02,
            "vq": rng.integers(-127, 128, (40, 24), dtype=np.int8),
            "vs": rng.random(24, dtype=np.float32) * 0.02}


def _bind(mod, params):
    return relax.transform.BindParams("main", params)(mod)


def test_insert_shares_one_quantize():
    p = _params()
    got = InsertActivationQuantize({0: (S, Z), 1: (S, Z)})(_bind(QDQWeights, p))
    tvm.ir.assert_structural_equal(got, _bind(ExpectedInserted, p))


def test_insert_noop():
    p = _params()
    mod = _bind(QDQWeights, p)
    tvm.ir.assert_structural_equal(InsertActivationQuantize({})(mod), mod)
    # fp32-weight matmuls (excluded from QuantizeWeights) get no activation quantisation
    tvm.ir.assert_structural_equal(InsertActivationQuantize({0: (S, Z)})(RoundTrip), RoundTrip)


@pytest.mark.parametrize(("scale", "zp", "match"), [(0.0, 0, "scale 0.0"),
                                                    (float("nan"), 0, "scale nan"),
                                                    (0.1, 300, "zero point 300")])
def test_insert_errors(scale, zp, match):
    with pytest.raises(ValueError, match=match):
        InsertActivationQuantize({0: (scale, zp)})


def test_fold_round_trip():
    tvm.ir.assert_structural_equal(FoldDequantizeQuantize()(RoundTrip), RoundTripFolded)


def test_fold_keeps_requantize():
    tvm.ir.assert_structural_equal(FoldDequantizeQuantize()(Requantize), Requantize)


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _run(mod, x):
    from attnforge.schedules.cpu_schedule import cpu_build_pipeline

    mod = cpu_build_pipeline(TARGET)(mod)
    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.skipif(not _has_vnni(), reason="no avx512_vnni in /proc/cpuinfo")
def test_lower_matches_qdq_graph():
    p = _params()
    qdq = InsertActivationQuantize({0: (S, Z), 1: (S, Z)})(_bind(QDQWeights, p))
    lowered = LowerInt8Matmul()(qdq)
    text = lowered.script(show_meta=False)
    assert text.count("R.call_tir(cls.int8_matmul_cpu") == 2
    assert "R.matmul" not in text and "R.dequantize" not in text
    assert len([gv for gv, f in lowered.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc)]) == 1  # one kernel for both sites
    x = np.random.default_rng(1).uniform(-0.3, 0.9, (2, 5, 40)).astype(np.float32)
    np.testing.assert_allclose(_run(lowered, x), _run(qdq, x), rtol=1e-5, atol=1e-5)


def test_lower_noop_on_weight_only_sites():
    mod = _bind(QDQWeights, _params())  # activation not quantised: stays QDQ in fp32
    tvm.ir.assert_structural_equal(LowerInt8Matmul()(mod), mod)


def test_full_sequence_on_fp32_graph():
    @I.ir_module
    class Fp32:
        @R.function
        def main(x: R.Tensor((6, 40), "float32"), w: R.Tensor((40, 24), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    scale = float(x.max() - min(x.min(), 0)) / 255
    zp = round(-min(x.min(), 0) / scale)
    mod = QuantizeWeights()(_bind(Fp32, {"w": w}))
    mod = FoldDequantizeQuantize()(InsertActivationQuantize({0: (scale, zp)})(mod))
    if _has_vnni():
        mod = LowerInt8Matmul()(mod)
    ref = x @ w
    assert np.abs(_run(mod, x) - ref).max() / np.abs(ref).max() < 0.02
