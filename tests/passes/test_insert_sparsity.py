"""InsertSparsity: Before/Expected attrs, no-op, clones, errors, and numerics after lowering.

Policies here are tiny protocol objects (the pass must not depend on ``attnforge.sparsity``);
numerics compare the lowered module with a numpy reference of the same dense mask.
"""

import math

import numpy as np
import pytest
import tvm
from attnforge.passes import AnalyzeAttentionMask, FuseAttention, LowerAttentionToTIR
from attnforge.passes import _attention_ir as ir
from attnforge.passes.analyze_attention_mask import spec_from_attrs
from attnforge.passes.insert_sparsity import InsertSparsity, intersect_specs
from attnforge.schedules.block_mask import MaskSpec
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

T4 = R.Tensor((1, 2, 8, 4), "float32")
LLVM = tvm.target.Target({"kind": "llvm"})


class Fixed:
    """Protocol object: the same spec for every site, or per layer from a dict."""

    def __init__(self, spec, name="fixed", layers=None):
        self.spec, self.name, self.layer_indices = spec, name, layers

    def mask_spec(self, q_len, kv_len, num_heads, layer):
        if isinstance(self.spec, dict):
            return self.spec.get(layer)
        return self.spec(q_len, kv_len, num_heads) if callable(self.spec) else self.spec

    def describe(self):
        return self.name


def _before(mask_spec, note="no mask"):
    """An analysed module (what AnalyzeAttentionMask leaves) whose site has ``mask_spec``."""

    @I.ir_module
    class Before:
        @R.function(private=True)
        def attention(q: T4, k: T4, v: T4) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.empty_rows": "nan",
                         "attnforge.gqa_groups": 1, "attnforge.layout": "BHND",
                         "attnforge.mask_input": "none", "attnforge.mask_kind": "none",
                         "attnforge.mask_note": note, "attnforge.mask_spec": mask_spec,
                         "attnforge.safe_softmax": False, "attnforge.scale": 0.5})
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                s2 = R.multiply(s, R.const(0.5, "float32"))
                p = R.nn.softmax(s2, axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

        @R.function
        def main(q: T4, k: T4, v: T4) -> T4:
            cls = Before
            with R.dataflow():
                o = cls.attention(q, k, v)
                R.output(o)
            return o

    return Before


def test_window_on_unmasked_site():
    Before = _before({"kind": "full"})

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def attention(q: T4, k: T4, v: T4) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.empty_rows": "zero",
                         "attnforge.gqa_groups": 1, "attnforge.layout": "BHND",
                         "attnforge.mask_input": "none", "attnforge.mask_kind": "none",
                         "attnforge.mask_note": "no mask; sparsity policy win applied -> "
                         "sliding_window(left=2, right=0): this changes the model's function",
                         "attnforge.mask_spec": {"kind": "structured", "min_diff": 0,
                                                 "max_diff": 2},
                         "attnforge.safe_softmax": False, "attnforge.scale": 0.5,
                         "attnforge.sparsity": "win", "attnforge.sparsity_changed": True})
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                s2 = R.multiply(s, R.const(0.5, "float32"))
                p = R.nn.softmax(s2, axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

        @R.function
        def main(q: T4, k: T4, v: T4) -> T4:
            cls = Expected
            with R.dataflow():
                o = cls.attention(q, k, v)
                R.output(o)
            return o

    after = InsertSparsity(Fixed(MaskSpec.sliding_window(2), "win"))(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    tvm.ir.assert_structural_equal(Before, _before({"kind": "full"}))  # input untouched


def test_policy_leaving_every_site_alone_is_a_no_op():
    Before = _before({"kind": "structured", "min_diff": 0})
    tvm.ir.assert_structural_equal(InsertSparsity(Fixed(None))(Before), Before)


def test_causal_site_and_band_stays_structured():
    Before = _before({"kind": "structured", "min_diff": 0}, note="causal")
    after = InsertSparsity(Fixed(MaskSpec.sliding_window(3, right=3)))(Before)
    f = after["attention"]
    assert spec_from_attrs(f) == MaskSpec.sliding_window(3)  # causal & band = causal window
    assert ir.attr(f, "attnforge.sparsity_changed") is True


def test_exact_re_expression_is_recorded_as_unchanged():
    Before = _before({"kind": "structured", "min_diff": 0}, note="causal")
    causal = MaskSpec.static(MaskSpec.causal().dense(8, 8))  # the same mask, as an array
    f = InsertSparsity(Fixed(causal, "tril"))(Before)["attention"]
    assert spec_from_attrs(f) == MaskSpec.causal()
    assert ir.attr(f, "attnforge.sparsity_changed") is False
    assert ir.attr(f, ir.A_EMPTY_ROWS) == "nan"
    assert "exactly this site's own mask" in ir.attr(f, ir.A_MASK_NOTE)


def test_static_policy_sets_the_static_layout():
    Before = _before({"kind": "structured", "min_diff": 0})
    lay = np.zeros((8, 8), bool)
    lay[:, :2] = True
    lay[np.arange(8), np.arange(8)] = True
    f = InsertSparsity(Fixed(MaskSpec.static(lay)))(Before)["attention"]
    spec = spec_from_attrs(f)
    assert spec.kind == "static" and ir.attr(f, ir.A_MASK_INPUT) == "bool"
    assert np.array_equal(spec.static_mask[0], lay & np.tril(np.ones((8, 8), bool)))


def test_shared_function_is_cloned_when_layers_differ():
    @I.ir_module
    class Before:
        @R.function(private=True)
        def attention(q: T4, k: T4, v: T4) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.empty_rows": "nan",
                         "attnforge.gqa_groups": 1, "attnforge.layout": "BHND",
                         "attnforge.mask_input": "none", "attnforge.mask_kind": "none",
                         "attnforge.mask_note": "no mask", "attnforge.mask_spec": {"kind": "full"},
                         "attnforge.safe_softmax": False, "attnforge.scale": 0.5})
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                p = R.nn.softmax(R.matmul(q, kt), axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

        @R.function
        def main(q: T4, k: T4, v: T4) -> T4:
            cls = Before
            with R.dataflow():
                a = cls.attention(q, k, v)
                b = cls.attention(a, k, v)
                R.output(b)
            return b

    after = InsertSparsity(Fixed({1: MaskSpec.chunked(4)}, layers={1}))(Before)
    specs = [spec_from_attrs(after[c]) for _, c, _, _ in ir.iter_sites(after)]
    assert specs == [MaskSpec.full(), MaskSpec.chunked(4)]
    assert relax.analysis.check_well_formed(after)


def test_errors():
    with pytest.raises(TypeError, match="mask_spec"):
        InsertSparsity(object())
    with pytest.raises(ValueError, match="names layers \\[3\\].*1 attention sites"):
        InsertSparsity(Fixed({3: MaskSpec.causal()}, layers={3}))(_before({"kind": "full"}))
    with pytest.raises(ValueError, match="AnalyzeAttentionMask first"):
        InsertSparsity(Fixed(MaskSpec.causal()))(FuseAttention()(_attention(8, 8, 2, 2)))
    with pytest.raises(ValueError, match="2 heads"):
        InsertSparsity(Fixed(MaskSpec.static(np.ones((3, 8, 8), bool))))(
            _before({"kind": "full"}))


def test_intersect_specs_with_offsets_and_chunks():
    a, b = MaskSpec.causal(q_offset=4), MaskSpec.sliding_window(2, right=1)
    got = intersect_specs(a, b, 6, 10)
    assert got.kind == "structured"
    assert np.array_equal(got.dense(6, 10), a.dense(6, 10) & b.dense(6, 10))
    c = intersect_specs(MaskSpec.chunked(4), MaskSpec.chunked(3), 12, 12)
    assert np.array_equal(c.dense(12, 12), MaskSpec.chunked(4).dense(12, 12)
                          & MaskSpec.chunked(3).dense(12, 12))


# ----------------------------------------------------------------- numerics after lowering
def _attention(nq, nk, h, hkv, d=8, keep=None, mask_param=False, b=1):
    """Hand-written GQA attention; ``keep``: a constant bool mask; ``mask_param``: a run-time
    bool mask input ``[1, 1, nq, nk]``."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([b, h, nq, d], "float32"))
    k = relax.Var("k", relax.TensorType([b, hkv, nk, d], "float32"))
    v = relax.Var("v", relax.TensorType([b, hkv, nk, d], "float32"))
    params = [q, k, v] + ([relax.Var("m", relax.TensorType([1, 1, nq, nk], "bool"))]
                          if mask_param else [])
    with bb.function("main", params):
        with bb.dataflow():
            g = h // hkv
            kk, vv = k, v
            if g > 1:
                kk, vv = (bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(
                    bb.emit(relax.op.expand_dims(t, [2])), [b, hkv, g, nk, d])),
                    [b, h, nk, d])) for t in (k, v))
            s = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(kk, [0, 1, 3, 2]))))
            s = bb.emit(relax.op.divide(s, relax.const(math.sqrt(d), "float32")))
            m = params[3] if mask_param else (None if keep is None else relax.const(keep))
            if m is not None:
                s = bb.emit(relax.op.where(m, s, relax.const(-math.inf, "float32")))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            out = bb.emit_output(relax.op.matmul(p, vv))
        bb.emit_func_output(out)
    return bb.get()


def _reference(q, k, v, keep):
    """Softmax attention in float64 with a bool mask; rows with no key give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    s = np.where(keep, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    tot = e.sum(-1, keepdims=True)
    return (e @ v) / np.where(tot > 0, tot, 1)


def _run(mod, policy, args):
    mod = tvm.transform.Sequential([FuseAttention(), AnalyzeAttentionMask(),
                                    InsertSparsity(policy), LowerAttentionToTIR(LLVM)])(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _random_static(nq, nk, h, rng):
    m = rng.random((h, nq, nk)) < 0.3
    m[:, :, 0] = rng.random((h, nq)) < 0.9  # a few rows may end up empty
    return MaskSpec.static(m)


@pytest.mark.parametrize("nq,nk,h,hkv,site,pol", [
    (70, 70, 4, 2, "causal", lambda nq, nk, h: MaskSpec.sliding_window(9, right=9)),
    (100, 100, 2, 2, "causal", lambda nq, nk, h: MaskSpec.chunked(32)),
    (65, 130, 4, 1, "none", lambda nq, nk, h: MaskSpec.sliding_window(20, q_offset=nk - nq)),
    (90, 90, 4, 2, "causal", "static"),
    (77, 77, 2, 1, "none", "static"),
])
def test_lowered_matches_reference(nq, nk, h, hkv, site, pol):
    rng = np.random.default_rng(nq + nk)
    causal = MaskSpec.causal().dense(nq, nk)[0]
    mod = _attention(nq, nk, h, hkv, keep=causal if site == "causal" else None)
    spec = _random_static(nq, nk, h, rng) if pol == "static" else pol(nq, nk, h)
    args = [rng.standard_normal(s).astype("float32") for s in
            ((1, h, nq, 8), (1, hkv, nk, 8), (1, hkv, nk, 8))]
    got = _run(mod, Fixed(spec), args)
    keep = spec.dense(nq, nk) & (causal if site == "causal" else True)
    np.testing.assert_allclose(got, _reference(*args, keep[None]), atol=2e-5, rtol=1e-4)


def test_run_time_mask_keeps_the_tensor_and_gains_the_structure():
    nq = nk = 96
    rng = np.random.default_rng(1)
    mod = _attention(nq, nk, 2, 2, mask_param=True)
    pad = np.ones((1, 1, nq, nk), bool)
    pad[..., :5] = False  # left padding
    args = [rng.standard_normal((1, 2, nq, 8)).astype("float32") for _ in range(3)] + [pad]
    window = MaskSpec.sliding_window(15)
    analysed = AnalyzeAttentionMask()(FuseAttention()(mod))
    f = InsertSparsity(Fixed(window))(analysed)
    (_, callee, _, _), = ir.iter_sites(f)
    assert spec_from_attrs(f[callee]) == window
    assert ir.attr(f[callee], ir.A_MASK_INPUT) == "bool"
    got = _run(mod, Fixed(window), args)
    keep = pad & window.dense(nq, nk)[None]
    np.testing.assert_allclose(got, _reference(*args[:3], keep), atol=2e-5, rtol=1e-4)
    # A static (per-head) layout with the run-time mask: layout kept for block skipping, the
    # kernel applies run-time & layout on every visited block.
    static = _random_static(nq, nk, 2, rng)
    f = InsertSparsity(Fixed(static))(analysed)
    (_, callee, _, _), = ir.iter_sites(f)
    assert ir.attr(f[callee], "attnforge.runtime_and_static") is True
    assert spec_from_attrs(f[callee]).kind == "static"
    got = _run(mod, Fixed(static), args)
    keep = pad & static.dense(nq, nk)[None]
    np.testing.assert_allclose(got, _reference(*args[:3], keep), atol=2e-5, rtol=1e-4)


def test_batch_varying_constant_mask_is_folded_with_a_static_policy():
    n, rng = 72, np.random.default_rng(5)
    keep = np.ones((2, 1, n, n), bool)
    keep[1, ..., :7] = False  # the second sequence is left-padded: varies over the batch
    mod = _attention(n, n, 2, 2, keep=keep, b=2)
    pol = _random_static(n, n, 1, rng)
    analysed = AnalyzeAttentionMask()(FuseAttention()(mod))
    f = InsertSparsity(Fixed(pol))(analysed)
    (_, callee, _, _), = ir.iter_sites(f)
    assert ir.attr(f[callee], ir.A_MASK_CONST).shape == (2, 1, n, n)
    assert "folded into the constant mask" in ir.attr(f[callee], ir.A_MASK_NOTE)
    args = [rng.standard_normal((2, 2, n, 8)).astype("float32") for _ in range(3)]
    got = _run(mod, Fixed(pol), args)
    want = _reference(*args, keep & pol.static_mask[None])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
