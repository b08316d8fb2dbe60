"""QuantizeEmbedding: Before/Expected TVMScript, no-op cases, errors, gather vs float64."""

import numpy as np
import pytest
import tvm
from attnforge.passes.quantize_embedding import (
    QuantizeEmbedding,
    embedding_tables,
    quantize_rows,
)
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class Before:
    @R.function
    def main(ids: R.Tensor((2, 5), "int64"), table: R.Tensor((11, 8), "float32")):
        with R.dataflow():
            flat = R.reshape(ids, (10,))
            emb = R.take(table, flat, axis=0, mode="fast")
            y = R.reshape(emb, (2, 5, 8))
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(ids: R.Tensor((2, 5), "int64"), tq: R.Tensor((11, 8), "int8"),
             ts: R.Tensor((11,), "float32")):
        with R.dataflow():
            flat = R.reshape(ids, (10,))
            rows = R.take(tq, flat, axis=0, mode="fast")
            wide = R.astype(rows, "float32")
            scales = R.take(ts, flat, axis=0, mode="fast")
            col = R.expand_dims(scales, -1)
            emb = R.multiply(wide, col)
            y = R.reshape(emb, (2, 5, 8))
            R.output(y)
        return y


@I.ir_module
class ExpectedGroup4:  # H = 8, two scales per row, stored [2, V]
    @R.function
    def main(ids: R.Tensor((2, 5), "int64"), tq: R.Tensor((11, 8), "int8"),
             ts: R.Tensor((2, 11), "float32")):
        with R.dataflow():
            flat = R.reshape(ids, (10,))
            rows = R.take(tq, flat, axis=0, mode="fast")
            wide = R.astype(rows, "float32")
            sc = R.take(ts, flat, axis=1, mode="fast")
            sc_t = R.permute_dims(sc, [1, 0])
            parts = R.reshape(wide, (10, 2, 4))
            col = R.expand_dims(sc_t, -1)
            scaled = R.multiply(parts, col)
            emb = R.reshape(scaled, (10, 8))
            y = R.reshape(emb, (2, 5, 8))
            R.output(y)
        return y


@I.ir_module
class ConstantIds:  # position-embedding style: indices known at compile time (FoldConstant's)
    @R.function
    def main(x: R.Tensor((3, 8), "float32"), table: R.Tensor((11, 8), "float32")):
        with R.dataflow():
            emb = R.take(table, R.const(np.array([0, 1, 2], "int64")), axis=0)
            y = R.add(x, emb)
            R.output(y)
        return y


@I.ir_module
class Axis1:
    @R.function
    def main(ids: R.Tensor((3,), "int64"), table: R.Tensor((11, 8), "float32")):
        with R.dataflow():
            y = R.take(table, ids, axis=1)
            R.output(y)
        return y


def _table(v=11, h=8, seed=0):
    rng = np.random.default_rng(seed)
    t = (rng.standard_normal((v, h)) * rng.uniform(0.01, 3.0, (v, 1))).astype(np.float32)
    t[4] = 0.0  # an all-zero row
    return t


def _bind(mod, **params):
    return relax.transform.BindParams("main", params)(mod)


def test_quantize_rows_range_and_error():
    t = _table()
    q, s = quantize_rows(t)
    assert q.dtype == np.int8 and s.shape == (11,) and s[4] == 1.0 and not q[4].any()
    assert np.abs(q).max() == 127 and (np.abs(q).max(axis=1)[np.arange(11) != 4] == 127).all()
    assert (np.abs(q.astype(np.float64) * s[:, None] - t) <= s[:, None] / 2 * (1 + 1e-6)).all()


def test_before_expected():
    t = _table()
    tq, ts = quantize_rows(t)
    mod = _bind(Before, table=t)
    assert embedding_tables(mod) == [(11, 8)]
    got = QuantizeEmbedding()(mod)
    tvm.ir.assert_structural_equal(got, _bind(Expected, tq=tq, ts=ts))
    assert embedding_tables(got) == []  # idempotent: the int8 table is not fp32


def test_before_expected_grouped_and_group_fallback():
    t = _table()
    tq, ts = quantize_rows(t, 4)
    assert ts.shape == (11, 2)
    got = QuantizeEmbedding(group=4)(_bind(Before, table=t))
    tvm.ir.assert_structural_equal(got, _bind(ExpectedGroup4, tq=tq, ts=ts.T.copy()))
    assert embedding_tables(got) == []  # the [G, V] scales are gathered on axis 1
    tq1, ts1 = quantize_rows(t)  # group 3 does not divide H = 8: one scale per row
    tvm.ir.assert_structural_equal(QuantizeEmbedding(group=3)(_bind(Before, table=t)),
                                   _bind(Expected, tq=tq1, ts=ts1))
    with pytest.raises(ValueError, match="group=0"):
        QuantizeEmbedding(group=0)


@pytest.mark.parametrize("mod", [Before, ConstantIds, Axis1])  # Before: table not constant
def test_noop(mod):
    bound = mod if mod is Before else _bind(mod, table=_table())
    tvm.ir.assert_structural_equal(QuantizeEmbedding()(bound), bound)


def test_nan_table_names_the_gather():
    t = _table()
    t[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"QuantizeEmbedding: the gather table \[11, 8\]"):
        QuantizeEmbedding()(_bind(Before, table=t))


@pytest.mark.parametrize("group", [None, 8])
def test_built_gather_matches_float64_reference(group):
    """The compiled int8 gather (batch 2, odd vocabulary) vs a float64 dequantisation, and its
    error against the fp32 table bounded by half a step per row / group."""
    t = _table(v=37, h=24, seed=1)
    @I.ir_module
    class Mod:
        @R.function
        def main(ids: R.Tensor((2, 7), "int64"), table: R.Tensor((37, 24), "float32")):
            with R.dataflow():
                y = R.take(table, ids, axis=0)
                R.output(y)
            return y

    qmod = QuantizeEmbedding(group=group)(_bind(Mod, table=t))
    ex = tvm.compile(qmod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    ids = np.random.default_rng(2).integers(0, 37, (2, 7)).astype("int64")
    got = vm["main"](tvm.runtime.tensor(ids)).numpy()
    q, s = quantize_rows(t, group)
    step = np.repeat(s.reshape(37, -1), 24 // s.reshape(37, -1).shape[1], axis=1)  # [V, H]
    ref = q.astype(np.float64)[ids] * step.astype(np.float64)[ids]
    assert got.dtype == np.float32 and got.shape == (2, 7, 24)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert (np.abs(got - t[ids]) <= step[ids] / 2 * (1 + 1e-5)).all()
