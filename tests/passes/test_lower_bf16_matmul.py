"""LowerBF16Matmul: Before/Expected TVMScript, symbolic rows, no-op cases, built numerics."""

import pathlib

import ml_dtypes
import numpy as np
import pytest
import tvm
from attnforge.passes.lower_bf16_matmul import (
    LowerBF16Matmul, count_bf16_matmuls, register_tile,
)
from attnforge.passes.store_weights_bf16 import StoreWeightsBF16, to_bfloat16
from attnforge.schedules.cpu_schedule import cpu_build_pipeline
from attnforge.schedules.matmul_bf16_cpu import (
    bf16_matmul_func, bf16_matmul_reference, pack_weight,
)
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})


def _has_bf16() -> bool:
    try:
        return "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@I.ir_module
class Before:  # what StoreWeightsBF16 leaves: bf16 constant weights, fp32 activations
    @R.function
    def main(x: R.Tensor((2, 9, 40), "float32"), wb: R.Tensor((40, 24), "bfloat16"),
             w2b: R.Tensor((24, 50), "bfloat16")):
        with R.dataflow():
            y = R.matmul(x, wb, out_dtype="float32")
            z = R.matmul(y, w2b, out_dtype="float32")
            R.output(z)
        return z


# The kernels are generated (bf16_matmul_func, tested in tests/schedules/): the placeholders
# (same signature) are swapped for them in _with_kernel.
@I.ir_module
class Expected:
    @T.prim_func
    def bf16_matmul_cpu(x: T.handle, w: T.handle, out: T.handle):
        T.evaluate(0)

    @T.prim_func
    def bf16_matmul_cpu1(x: T.handle, w: T.handle, out: T.handle):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((2, 9, 40), "float32"), wp: R.Tensor((1, 20, 2, 16, 2), "uint16"),
             w2p: R.Tensor((1, 12, 4, 16, 2), "uint16")):
        cls = Expected
        with R.dataflow():
            lv = R.reshape(x, R.shape([18, 40]))
            lv1 = R.call_tir(cls.bf16_matmul_cpu, (lv, wp), out_ty=R.Tensor((18, 24), "float32"))
            y = R.reshape(lv1, R.shape([2, 9, 24]))
            lv2 = R.reshape(y, R.shape([18, 24]))
            lv3 = R.call_tir(cls.bf16_matmul_cpu1, (lv2, w2p),
                             out_ty=R.Tensor((18, 50), "float32"))
            z = R.reshape(lv3, R.shape([2, 9, 50]))
            R.output(z)
        return z


@I.ir_module
class BeforeSymbolic:
    @R.function
    def main(x: R.Tensor(("n", 40), "float32"), wb: R.Tensor((40, 24), "bfloat16")):
        n = T.int64()
        with R.dataflow():
            y = R.matmul(x, wb, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class ExpectedSymbolic:
    @T.prim_func
    def bf16_matmul_cpu(x: T.handle, w: T.handle, out: T.handle):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor(("n", 40), "float32"), wp: R.Tensor((1, 20, 2, 16, 2), "uint16")):
        n = T.int64()
        cls = ExpectedSymbolic
        with R.dataflow():
            y = R.call_tir(cls.bf16_matmul_cpu, (x, wp), out_ty=R.Tensor((n, 24), "float32"))
            R.output(y)
        return y


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((40, 24)).astype(np.float32),
            rng.standard_normal((24, 50)).astype(np.float32))


def _with_kernel(mod, name, m, n, k):
    kernel = bf16_matmul_func(m, n, k, **register_tile(n))
    mod[name] = kernel.with_attr("global_symbol", name)
    relax.analysis.well_formed(mod)  # raises on a malformed module
    return mod


def _run(mod, *arrays):
    built = tvm.compile(cpu_build_pipeline(TARGET)(mod), target=TARGET)
    vm = relax.VirtualMachine(built, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in arrays)).numpy()


def test_before_expected_static():
    w, w2 = _weights()
    got = LowerBF16Matmul()(relax.transform.BindParams(
        "main", {"wb": to_bfloat16(w), "w2b": to_bfloat16(w2)})(Before))
    expected = relax.transform.BindParams("main", {
        "wp": pack_weight(w, register_tile(24)["nb"]),
        "w2p": pack_weight(w2, register_tile(50)["nb"])})(Expected)
    expected = _with_kernel(_with_kernel(expected, "bf16_matmul_cpu", 18, 24, 40),
                            "bf16_matmul_cpu1", 18, 50, 24)
    tvm.ir.assert_structural_equal(got, expected)
    assert count_bf16_matmuls(got) == 2 and count_bf16_matmuls(Before) == 0


def test_before_expected_symbolic_rows():
    w, _ = _weights()
    got = LowerBF16Matmul()(relax.transform.BindParams("main", {"wb": to_bfloat16(w)})(
        BeforeSymbolic))
    expected = relax.transform.BindParams(
        "main", {"wp": pack_weight(w, register_tile(24)["nb"])})(ExpectedSymbolic)
    expected = _with_kernel(expected, "bf16_matmul_cpu", tirx.Var("m", "int64"), 24, 40)
    tvm.ir.assert_structural_equal(got, expected, map_free_vars=True)


def test_noop_cases():
    w, w2 = _weights()
    # weights not constant: nothing to pack
    tvm.ir.assert_structural_equal(LowerBF16Matmul()(Before), Before)
    # fewer rows than min_rows (a decode step): left to the weights-only fp32 path
    bound = relax.transform.BindParams("main", {"wb": to_bfloat16(w),
                                                "w2b": to_bfloat16(w2)})(Before)
    tvm.ir.assert_structural_equal(LowerBF16Matmul(min_rows=19)(bound), bound)

    @I.ir_module
    class Fp32Weight:  # fp32 weight (StoreWeightsBF16 not run / site excluded): untouched
        @R.function
        def main(x: R.Tensor((32, 40), "float32"), w: R.Tensor((40, 24), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    fp32 = relax.transform.BindParams("main", {"w": w})(Fp32Weight)
    tvm.ir.assert_structural_equal(LowerBF16Matmul()(fp32), fp32)


@pytest.mark.skipif(not _has_bf16(), reason="no avx512_bf16 in /proc/cpuinfo")
def test_store_then_lower_numerics():
    """fp32 graph -> StoreWeightsBF16 -> LowerBF16Matmul, built: matches float64 math on the
    bf16-rounded operands (only the fp32 accumulation order differs)."""

    @I.ir_module
    class Fp32:  # two projections of one x (as q / k): one shared reshape, one kernel
        @R.function
        def main(x: R.Tensor((2, "n", 40), "float32"), w: R.Tensor((40, 24), "float32"),
                 w3: R.Tensor((40, 24), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                v = R.matmul(x, w3)
                z = R.add(y, v)
                R.output(z)
            return z

    w, w3 = _weights(1)[0], _weights(3)[0]
    mod = relax.transform.BindParams("main", {"w": w, "w3": w3})(Fp32)
    mod = LowerBF16Matmul()(StoreWeightsBF16()(mod))
    text = mod.script(show_meta=False)
    assert text.count("R.call_tir(cls.bf16_matmul_cpu,") == 2 and "R.matmul" not in text
    assert text.count("R.reshape(x,") == 1
    for rows in (13, 1):  # symbolic n: 26 rows (not a multiple of the row tile) and 2
        x = np.random.default_rng(rows).standard_normal((2, rows, 40)).astype(np.float32)
        got = _run(mod, x).reshape(2 * rows, 24)
        x2 = x.reshape(2 * rows, 40)
        ref = bf16_matmul_reference(x2, w) + bf16_matmul_reference(x2, w3)
        xa = np.abs(x2.astype(ml_dtypes.bfloat16).astype(np.float64))
        mag = sum(xa @ np.abs(m.astype(ml_dtypes.bfloat16).astype(np.float64)) for m in (w, w3))
        assert np.all(np.abs(got - ref) <= 1e-6 * mag * 40 ** 0.5 + 1e-6)
