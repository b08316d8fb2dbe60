"""AnalyzeAttentionMask: mask structures recovered from the graph, exactness rules."""

import math

import numpy as np
import pytest
import tvm
from attnforge.passes import AnalyzeAttentionMask, FuseAttention
from attnforge.passes import _attention_ir as ir
from attnforge.passes.analyze_attention_mask import classify_bool_mask, spec_from_attrs
from attnforge.schedules.block_mask import MaskSpec
from tvm import relax

N, D = 16, 4


def _attention_module(mask_fn, kind="bool", nq=N, nk=N, extra_params=(), safe=False):
    """q,k,v [1,2,N,D]; ``mask_fn(bb, params)`` returns the keep mask (bool) or additive mask."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([1, 2, nq, D], "float32"))
    k = relax.Var("k", relax.TensorType([1, 2, nk, D], "float32"))
    v = relax.Var("v", relax.TensorType([1, 2, nk, D], "float32"))
    extra = [relax.Var(n, relax.TensorType(s, dt)) for n, s, dt in extra_params]
    with bb.function("main", [q, k, v, *extra]):
        with bb.dataflow():
            m = mask_fn(bb, extra)
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            s = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, kt)),
                                          relax.const(0.5, "float32")))
            if kind == "bool":
                s = bb.emit(relax.op.where(m, s, relax.const(-math.inf, "float32")))
            else:
                s = bb.emit(relax.op.add(s, m))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            out = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(out)
    return bb.get()


def _analyse(mod):
    out = AnalyzeAttentionMask()(FuseAttention()(mod))
    (_, callee, _, _), = list(ir.iter_sites(out))
    return out[callee]


def _iota(bb, n, axis):
    a = bb.emit(relax.op.arange(0, n, 1, "int64"))
    return bb.emit(relax.op.expand_dims(a, [axis]))


def test_causal_from_iotas():
    def mask(bb, _):
        q, k = _iota(bb, N, 1), _iota(bb, N, 0)
        return bb.emit(relax.op.less_equal(k, q))

    f = _analyse(_attention_module(mask))
    assert spec_from_attrs(f) == MaskSpec.causal()
    assert ir.attr(f, ir.A_MASK_INPUT) == "none" and ir.attr(f, ir.A_EMPTY_ROWS) == "nan"


def test_sliding_window_from_iotas_additive_finfo_min():
    def mask(bb, _):
        q, k = _iota(bb, N, 1), _iota(bb, N, 0)
        d = bb.emit(relax.op.subtract(q, k))
        ok = bb.emit(relax.op.logical_and(
            bb.emit(relax.op.less_equal(d, relax.const(3, "int64"))),
            bb.emit(relax.op.greater_equal(d, relax.const(0, "int64")))))
        return bb.emit(relax.op.where(ok, relax.const(0.0, "float32"),
                                      relax.const(float(np.finfo(np.float32).min), "float32")))

    f = _analyse(_attention_module(mask, kind="additive"))
    assert spec_from_attrs(f) == MaskSpec.sliding_window(3)
    assert "finfo.min" in ir.attr(f, ir.A_MASK_NOTE)


def _const_mask(arr):
    return lambda bb, _: relax.const(arr)


@pytest.mark.parametrize("nq,nk,spec", [
    (N, N, MaskSpec.causal()),
    (8, N, MaskSpec.causal(q_offset=8)),  # bottom-right aligned (PyTorch is_causal, Nq<Nk)
    (N, N, MaskSpec.sliding_window(4)),  # left window
    (N, N, MaskSpec.sliding_window(2, right=3)),  # left/right window
    (N, N, MaskSpec.chunked(4)),
    (N, N, MaskSpec.chunked(8, causal=True)),
])
def test_structured_constant_masks(nq, nk, spec):
    keep = spec.dense(nq, nk)[0]
    f = _analyse(_attention_module(_const_mask(keep), nq=nq, nk=nk))
    got = spec_from_attrs(f)
    assert got.kind == "structured"
    assert np.array_equal(got.dense(nq, nk), spec.dense(nq, nk)), (got, spec)


def test_static_block_sparse_mask():
    rng = np.random.default_rng(0)
    keep = np.kron(rng.random((4, 4)) < 0.5, np.ones((4, 4), bool))
    keep[np.arange(N), np.arange(N)] = True
    f = _analyse(_attention_module(_const_mask(keep)))
    spec = spec_from_attrs(f)
    assert spec.kind == "static" and np.array_equal(spec.static_mask[0], keep)
    assert ir.attr(f, ir.A_MASK_INPUT) == "bool"


def test_data_dependent_mask_is_dynamic():
    f = _analyse(_attention_module(lambda bb, ex: ex[0], extra_params=[("m", [1, 1, N, N],
                                                                         "bool")]))
    assert spec_from_attrs(f) == MaskSpec.dynamic()
    assert ir.attr(f, ir.A_MASK_INPUT) == "bool"


def test_static_and_dynamic_keeps_the_structure():
    def mask(bb, ex):
        q, k = _iota(bb, N, 1), _iota(bb, N, 0)
        causal = bb.emit(relax.op.less_equal(k, q))
        return bb.emit(relax.op.logical_and(causal, ex[0]))

    f = _analyse(_attention_module(mask, extra_params=[("pad", [1, 1, 1, N], "bool")]))
    assert spec_from_attrs(f) == MaskSpec.causal()
    assert ir.attr(f, ir.A_MASK_INPUT) == "bool"  # padding still applied element-wise


def test_finfo_min_with_fully_masked_rows_stays_additive():
    add = np.where(MaskSpec.causal().dense(N, N)[0], 0.0, np.finfo(np.float32).min)
    add[3] = np.finfo(np.float32).min  # PyTorch gives this row uniform weights
    f = _analyse(_attention_module(_const_mask(add.astype("float32")), kind="additive"))
    assert ir.attr(f, ir.A_MASK_INPUT) == "additive"
    assert ir.attr(f, ir.A_MASK_CONST) is not None


def test_classify_bool_mask_edge_cases():
    assert classify_bool_mask(np.ones((5, 7), bool)) == MaskSpec.full()
    assert classify_bool_mask(np.zeros((4, 4), bool)).kind == "static"
    per_head = np.stack([MaskSpec.causal().dense(4, 4)[0], np.ones((4, 4), bool)])
    assert classify_bool_mask(per_head).kind == "static"


def test_calls_with_different_masks_get_separate_functions():
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([1, 2, N, D], "float32"))
    with bb.function("main", [q]):
        with bb.dataflow():
            outs = []
            for spec in (MaskSpec.causal(), MaskSpec.sliding_window(2)):
                kt = bb.emit(relax.op.permute_dims(q, [0, 1, 3, 2]))
                s = bb.emit(relax.op.matmul(q, kt))
                s = bb.emit(relax.op.where(relax.const(spec.dense(N, N)[0]), s,
                                           relax.const(-math.inf, "float32")))
                p = bb.emit(relax.op.nn.softmax(s, axis=-1))
                outs.append(bb.emit(relax.op.matmul(p, q)))
            out = bb.emit_output(relax.op.add(*outs))
        bb.emit_func_output(out)
    mod = AnalyzeAttentionMask()(FuseAttention()(bb.get()))
    specs = [spec_from_attrs(mod[c]) for _, c, _, _ in ir.iter_sites(mod)]
    assert specs == [MaskSpec.causal(), MaskSpec.sliding_window(2)]
    assert tvm.relax.analysis.check_well_formed(mod)
