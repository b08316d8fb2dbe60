"""SmoothQuant: Before/Expected TVMScript, shared multiply for a shared input, numerics, errors."""

import numpy as np
import pytest
import tvm
from attnforge.passes.smooth_quant import SmoothQuant
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class Before:  # two projections of the same x (as q/k), then a third on their sum
    @R.function
    def main(x: R.Tensor((2, 5, 8), "float32"), wq: R.Tensor((8, 6), "float32"),
             wk: R.Tensor((8, 6), "float32"), wo: R.Tensor((6, 4), "float32")):
        with R.dataflow():
            q = R.matmul(x, wq)
            k = R.matmul(x, wk)
            h = R.add(q, k)
            o = R.matmul(h, wo)
            R.output(o)
        return o


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 5, 8), "float32"), inv: R.Tensor((8,), "float32"),
             wq: R.Tensor((8, 6), "float32"), wk: R.Tensor((8, 6), "float32"),
             wo: R.Tensor((6, 4), "float32")):
        with R.dataflow():
            xs = R.multiply(x, inv)
            q = R.matmul(xs, wq)
            k = R.matmul(xs, wk)
            h = R.add(q, k)
            o = R.matmul(h, wo)
            R.output(o)
        return o


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32)
            for n, s in (("wq", (8, 6)), ("wk", (8, 6)), ("wo", (6, 4)))}


def _bind(mod, params):
    return relax.transform.BindParams("main", params)(mod)


def test_before_expected_shared_multiply():
    w = _weights()
    s = np.linspace(0.5, 4.0, 8, dtype=np.float32)
    got = SmoothQuant({0: s, 1: s})(_bind(Before, w))
    expected = _bind(Expected, {"inv": (1.0 / s).astype(np.float32),
                                "wq": w["wq"] * s[:, None], "wk": w["wk"] * s[:, None],
                                "wo": w["wo"]})
    tvm.ir.assert_structural_equal(got, expected)


def test_noop_and_input_untouched():
    mod = _bind(Before, _weights())
    text = mod.script()
    tvm.ir.assert_structural_equal(SmoothQuant({})(mod), mod)
    SmoothQuant({2: np.full(6, 2.0, np.float32)})(mod)
    assert mod.script() == text  # the pass never mutates its input module


def test_same_function_in_fp32():
    from attnforge.schedules.cpu_schedule import cpu_build_pipeline
    from attnforge.target import host_target

    target = host_target()
    mod = _bind(Before, _weights())
    rng = np.random.default_rng(3)
    scales = {0: rng.uniform(0.1, 10, 8), 1: rng.uniform(0.1, 10, 8), 2: rng.uniform(0.1, 10, 6)}
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)

    def run(m):
        with tvm.transform.PassContext(opt_level=3):
            ex = tvm.compile(cpu_build_pipeline(target)(m), target=target)
        return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    np.testing.assert_allclose(run(SmoothQuant(scales)(mod)), run(mod), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("s", "match"), [(np.ones(5), r"shape \(8,\)"),
                                          (np.array([1, 1, 1, 0, 1, 1, 1, 1.0]), "site 0"),
                                          (np.full(8, np.nan), "non-finite")])
def test_errors_name_the_site(s, match):
    with pytest.raises(ValueError, match=match):
        SmoothQuant({0: s})(_bind(Before, _weights()))
