"""The row-reduction rule of generation programs: an RMSNorm-shaped func computes its sum once
per row (not once per output element, as dlight's CPU ``Reduction`` rule did), matches numpy
for 1 and 5 rows, and declines matmuls."""

import numpy as np
import pytest
import tvm
from tvm import te, topi
from tvm.s_tir.dlight.analysis import get_root_block

from attnforge.generation.norm_schedule import RowReductionCPU
from attnforge.target import host_target


def _rms_norm(rows, hidden):
    x = te.placeholder((rows, hidden), name="x")
    w = te.placeholder((hidden,), name="w")
    ms = topi.divide(topi.sum(topi.multiply(x, x), axis=1, keepdims=True), float(hidden))
    y = topi.multiply(topi.multiply(x, topi.rsqrt(topi.add(ms, 1e-6))), w)
    return te.create_prim_func([x, w, y])


def _reduction_blocks(sch):
    blocks = sch.get_child_blocks(get_root_block(sch))
    return [sch.get(b).name_hint for b in blocks
            if any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]


@pytest.mark.parametrize("rows,hidden", [(1, 512), (5, 200)])
def test_rms_norm_reduces_once_per_row_and_matches_numpy(rows, hidden):
    sch = RowReductionCPU().apply(_rms_norm(rows, hidden), host_target(), False)
    assert sch is not None
    # the sum's loop nest is just (rows, hidden): not nested in a loop over output elements
    (red,) = _reduction_blocks(sch)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock(red))]
    assert [int(lp.extent) for lp in loops] == [rows, hidden]
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=host_target())
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, hidden), dtype=np.float32)
    w = rng.standard_normal(hidden, dtype=np.float32)
    y = tvm.runtime.tensor(np.full((rows, hidden), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_declines_matmul():
    a = te.placeholder((1, 64), name="a")
    b = te.placeholder((64, 128), name="b")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((1, 128), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")
    assert RowReductionCPU().apply(te.create_prim_func([a, b, c]), host_target(), False) is None
