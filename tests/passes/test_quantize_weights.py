"""QuantizeWeights: Before/Expected TVMScript, exclusion by position / name, errors, no-op."""

import numpy as np
import pytest
import tvm
from attnforge.passes.quantize_weights import QuantizeWeights, quantize_weight
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32"),
             w2: R.Tensor((16, 8), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.matmul(y, w2)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), wq: R.Tensor((8, 16), "int8"),
             ws: R.Tensor((16,), "float32"), w2q: R.Tensor((16, 8), "int8"),
             w2s: R.Tensor((8,), "float32")):
        with R.dataflow():
            dq = R.dequantize(wq, ws, R.const(0, "int8"), axis=1, out_dtype="float32")
            y = R.matmul(x, dq)
            dq2 = R.dequantize(w2q, w2s, R.const(0, "int8"), axis=1, out_dtype="float32")
            z = R.matmul(y, dq2)
            R.output(z)
        return z


@I.ir_module
class ExpectedKeepLast:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), wq: R.Tensor((8, 16), "int8"),
             ws: R.Tensor((16,), "float32"), w2: R.Tensor((16, 8), "float32")):
        with R.dataflow():
            dq = R.dequantize(wq, ws, R.const(0, "int8"), axis=1, out_dtype="float32")
            y = R.matmul(x, dq)
            z = R.matmul(y, w2)
            R.output(z)
        return z


def _weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    return w, rng.standard_normal((16, 8)).astype(np.float32)


def _bind(mod, **params):
    return relax.transform.BindParams("main", params)(mod)


def test_quantize_weight_numerics():
    w, _ = _weights()
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.shape == (16,)
    assert s[3] == 1.0 and not q[:, 3].any()
    assert np.abs(q).max() == 127
    np.testing.assert_allclose(q * s, w, atol=s.max() / 2 + 1e-7)


def test_all_sites():
    w, w2 = _weights()
    (wq, ws), (w2q, w2s) = quantize_weight(w), quantize_weight(w2)
    got = QuantizeWeights()(_bind(Before, w=w, w2=w2))
    tvm.ir.assert_structural_equal(got, _bind(Expected, wq=wq, ws=ws, w2q=w2q, w2s=w2s))


@pytest.mark.parametrize("exclude", [[-1], [1], ["lm_head"]])
def test_exclude(exclude):
    w, w2 = _weights()
    wq, ws = quantize_weight(w)
    got = QuantizeWeights(exclude=exclude, names={0: "proj", 1: "lm_head"})(
        _bind(Before, w=w, w2=w2))
    tvm.ir.assert_structural_equal(got, _bind(ExpectedKeepLast, wq=wq, ws=ws, w2=w2))


def test_noop_without_constant_weights():
    tvm.ir.assert_structural_equal(QuantizeWeights()(Before), Before)


def test_errors():
    w, w2 = _weights()
    mod = _bind(Before, w=w, w2=w2)
    with pytest.raises(ValueError, match="out of range"):
        QuantizeWeights(exclude=[5])(mod)
    with pytest.raises(ValueError, match="no matmul site named 'nope'"):
        QuantizeWeights(exclude=["nope"], names={1: "lm_head"})(mod)
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="site 0 has a NaN/inf weight"):
        QuantizeWeights()(_bind(Before, w=w, w2=w2))
