"""StoreWeightsBF16: Before/Expected TVMScript, exclusion, no-op, errors, fp32-compute numerics."""

import ml_dtypes
import numpy as np
import pytest
import tvm
from attnforge.passes.store_weights_bf16 import StoreWeightsBF16, to_bfloat16
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((2, 5, 40), "float32"), w: R.Tensor((40, 24), "float32"),
             b: R.Tensor((24,), "float32"), w2: R.Tensor((24, 8), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            h = R.add(y, b)
            z = R.matmul(h, w2)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 5, 40), "float32"), wb: R.Tensor((40, 24), "bfloat16"),
             b: R.Tensor((24,), "float32"), w2b: R.Tensor((24, 8), "bfloat16")):
        with R.dataflow():
            y = R.matmul(x, wb, out_dtype="float32")
            h = R.add(y, b)
            z = R.matmul(h, w2b, out_dtype="float32")
            R.output(z)
        return z


@I.ir_module
class ExpectedKeepLast:
    @R.function
    def main(x: R.Tensor((2, 5, 40), "float32"), wb: R.Tensor((40, 24), "bfloat16"),
             b: R.Tensor((24,), "float32"), w2: R.Tensor((24, 8), "float32")):
        with R.dataflow():
            y = R.matmul(x, wb, out_dtype="float32")
            h = R.add(y, b)
            z = R.matmul(h, w2)
            R.output(z)
        return z


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((40, 24)).astype(np.float32),
            "b": rng.standard_normal(24).astype(np.float32),
            "w2": rng.standard_normal((24, 8)).astype(np.float32)}


def _bind(mod, params):
    return relax.transform.BindParams("main", params)(mod)


def test_before_expected():
    p = _params()
    got = StoreWeightsBF16()(_bind(Before, p))
    expected = _bind(Expected, {"wb": to_bfloat16(p["w"]), "b": p["b"],
                                "w2b": to_bfloat16(p["w2"])})
    tvm.ir.assert_structural_equal(got, expected)


def test_exclude_last_and_noop():
    p = _params()
    mod = _bind(Before, p)
    got = StoreWeightsBF16(exclude=[-1])(mod)
    tvm.ir.assert_structural_equal(got, _bind(ExpectedKeepLast, {
        "wb": to_bfloat16(p["w"]), "b": p["b"], "w2": p["w2"]}))
    tvm.ir.assert_structural_equal(StoreWeightsBF16()(Before), Before)  # weights not constant
    tvm.ir.assert_structural_equal(StoreWeightsBF16()(got), StoreWeightsBF16()(mod))


def test_nan_weight_is_refused():
    p = _params()
    p["w2"][3, 1] = np.nan
    with pytest.raises(ValueError, match="site 1 has a NaN/inf weight"):
        StoreWeightsBF16()(_bind(Before, p))


def test_fp32_compute_on_bf16_weights():
    from collections import Counter

    from attnforge.schedules.cpu_schedule import cpu_build_pipeline
    from attnforge.target import host_target

    target, p = host_target(), _params()
    stats = Counter()
    mod = cpu_build_pipeline(target, stats=stats)(StoreWeightsBF16()(_bind(Before, p)))
    assert stats["MatmulCPU"] == 2  # scheduled like fp32 matmuls (bias fused into the first)
    consts = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("bfloat16" in f.script() for f in consts)  # not folded back to fp32
    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    x = np.random.default_rng(1).standard_normal((2, 5, 40)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    bf = {k: p[k].astype(ml_dtypes.bfloat16).astype(np.float64) for k in ("w", "w2")}
    ref = (x.astype(np.float64) @ bf["w"] + p["b"]) @ bf["w2"]  # fp64 on the bf16 weights
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
