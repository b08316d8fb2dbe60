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


def _mixing(k, seed=4):
    """A fixed channel mixing: activations ``z @ mix`` have correlated, unequal channels."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, k)) / np.sqrt(k) + np.diag(rng.uniform(0.2, 2.0, k))


def _correlated_inputs(rng, tokens, k):
    return rng.standard_normal((tokens, k)) @ _mixing(k)


def test_gptq_reduces_output_error_on_fresh_inputs():
    """GPTQ (K = 200: crosses its 128-row block) vs round-to-nearest: same scales, int8 in
    [-127, 127], and a smaller output error on inputs it was not calibrated on."""
    from attnforge.passes._gptq import gptq_round, output_error

    rng = np.random.default_rng(3)
    k, n = 200, 24
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x_cal = _correlated_inputs(np.random.default_rng(4), 1024, k)
    x_new = _correlated_inputs(np.random.default_rng(5), 1024, k)  # fresh draws
    q_rtn, s = quantize_weight(w)
    q_gptq, s2 = quantize_weight(w, x_cal.T @ x_cal)
    np.testing.assert_array_equal(s, s2)
    assert q_gptq.dtype == np.int8 and np.abs(q_gptq.astype(int)).max() <= 127
    assert (q_gptq != q_rtn).mean() > 0.05  # it really re-rounds

    def err(q, x):
        return float(np.sum((x @ (q * s - w).astype(np.float64)) ** 2))

    assert err(q_gptq, x_new) < 0.8 * err(q_rtn, x_new)
    h = x_cal.T @ x_cal
    assert output_error(w, q_gptq, s, h) < 0.8 * output_error(w, q_rtn, s, h)
    # with H = I every row is independent: GPTQ is round-to-nearest
    np.testing.assert_array_equal(gptq_round(w, s, np.eye(k)), q_rtn)


def test_gptq_dead_channel_rounds_to_nearest():
    from attnforge.passes._gptq import gptq_round

    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    x = rng.standard_normal((64, 8))
    x[:, 2] = 0.0  # never active in calibration
    q_rtn, s = quantize_weight(w)
    np.testing.assert_array_equal(gptq_round(w, s, x.T @ x)[2], q_rtn[2])


def test_hessians_give_gptq_sites():
    w, w2 = _weights()
    h = _correlated_inputs(np.random.default_rng(7), 64, 8)
    h = h.T @ h
    wq, ws = quantize_weight(w, h)
    w2q, w2s = quantize_weight(w2)
    got = QuantizeWeights(hessians={0: h})(_bind(Before, w=w, w2=w2))
    tvm.ir.assert_structural_equal(got, _bind(Expected, wq=wq, ws=ws, w2q=w2q, w2s=w2s))
    with pytest.raises(ValueError, match=r"site 1: gptq_round: weight \(16, 8\) needs"):
        QuantizeWeights(hessians={1: h})(_bind(Before, w=w, w2=w2))
