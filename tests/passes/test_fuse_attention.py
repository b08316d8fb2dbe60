"""FuseAttention: Before/Expected for each recognised form, near-misses and a no-op."""

import math

import tvm
from attnforge.passes import FuseAttention, attention_rejections
from tvm.script import ir as I
from tvm.script import relax as R

T4 = R.Tensor((2, 4, 8, 4), "float32")
S4 = R.Tensor((2, 4, 8, 8), "float32")
K2 = R.Tensor((2, 2, 8, 4), "float32")
KH = R.Tensor((2, 4, 4, 4), "float32")  # half of T4's rows
T3 = R.Tensor((8, 8, 4), "float32")
NINF = -math.inf


def _check(before, expected):
    after = FuseAttention()(before)
    tvm.ir.assert_structural_equal(after, expected)
    return after


def test_scale_after_scores():
    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: T4, v: T4) -> T4:
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                s2 = R.multiply(s, R.const(0.5, "float32"))
                p = R.nn.softmax(s2, axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def attention(q: T4, k: T4, v: T4) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.gqa_groups": 1,
                         "attnforge.layout": "BHND", "attnforge.mask_kind": "none",
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
            cls = Expected
            with R.dataflow():
                o = cls.attention(q, k, v)
                R.output(o)
            return o

    _check(Before, Expected)
    assert attention_rejections(FuseAttention()(Before)) == []


def test_scale_on_q_and_divide_with_additive_mask():
    """SDPA-style sqrt scale on Q and Kᵀ, divide on the scores, then an additive mask."""

    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: T4, v: T4, m: R.Tensor((8, 8), "float32")) -> T4:
            with R.dataflow():
                qs = R.multiply(q, R.const(0.5, "float32"))
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                kts = R.multiply(kt, R.const(0.5, "float32"))
                s = R.matmul(qs, kts)
                s2 = R.divide(s, R.const(2.0, "float32"))
                s3 = R.add(s2, m)
                p = R.nn.softmax(s3, axis=3)
                o = R.matmul(p, v)
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def attention(q: T4, k: T4, v: T4, mask: R.Tensor((8, 8), "float32")) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.gqa_groups": 1,
                         "attnforge.layout": "BHND", "attnforge.mask_invert": False,
                         "attnforge.mask_kind": "additive", "attnforge.safe_softmax": False,
                         "attnforge.scale": 0.125})
            with R.dataflow():
                qs = R.multiply(q, R.const(0.5, "float32"))
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                kts = R.multiply(kt, R.const(0.5, "float32"))
                s = R.matmul(qs, kts)
                s2 = R.divide(s, R.const(2.0, "float32"))
                s3 = R.add(s2, mask)
                p = R.nn.softmax(s3, axis=3)
                o = R.matmul(p, v)
                R.output(o)
            return o

        @R.function
        def main(q: T4, k: T4, v: T4, m: R.Tensor((8, 8), "float32")) -> T4:
            cls = Expected
            with R.dataflow():
                o = cls.attention(q, k, v, m)
                R.output(o)
            return o

    _check(Before, Expected)


def test_masked_fill_bool_gqa_repeat_kv_and_batch_fold():
    """HF eager Llama shape: repeat_kv, the importer's bmm fold, masked_fill with -inf."""
    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: K2, v: K2, m: R.Tensor((8, 8), "bool")) -> T4:
            with R.dataflow():
                ke = R.expand_dims(k, axis=[2])
                kb = R.broadcast_to(ke, R.shape([2, 2, 2, 8, 4]))
                kr = R.reshape(kb, R.shape([2, 4, 8, 4]))
                ve = R.expand_dims(v, axis=[2])
                vb = R.broadcast_to(ve, R.shape([2, 2, 2, 8, 4]))
                vr = R.reshape(vb, R.shape([2, 4, 8, 4]))
                kt = R.permute_dims(kr, axes=[0, 1, 3, 2])
                q3 = R.reshape(q, R.shape([8, 8, 4]))
                k3 = R.reshape(kt, R.shape([8, 4, 8]))
                s = R.matmul(q3, k3)
                s4 = R.reshape(s, R.shape([2, 4, 8, 8]))
                s5 = R.multiply(s4, R.const(0.5, "float32"))
                s6 = R.where(m, R.const(NINF, "float32"), s5)
                p = R.nn.softmax(s6, axis=-1)
                p3 = R.reshape(p, R.shape([8, 8, 8]))
                v3 = R.reshape(vr, R.shape([8, 8, 4]))
                o3 = R.matmul(p3, v3)
                o = R.reshape(o3, R.shape([2, 4, 8, 4]))
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def attention(q: T4, k: K2, v: K2, mask: R.Tensor((8, 8), "bool")) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.gqa_groups": 2,
                         "attnforge.layout": "BHND", "attnforge.mask_fill": NINF,
                         "attnforge.mask_invert": True, "attnforge.mask_kind": "bool",
                         "attnforge.safe_softmax": False, "attnforge.scale": 0.5})
            with R.dataflow():
                ke = R.expand_dims(k, axis=[2])
                kb = R.broadcast_to(ke, R.shape([2, 2, 2, 8, 4]))
                kr = R.reshape(kb, R.shape([2, 4, 8, 4]))
                ve = R.expand_dims(v, axis=[2])
                vb = R.broadcast_to(ve, R.shape([2, 2, 2, 8, 4]))
                vr = R.reshape(vb, R.shape([2, 4, 8, 4]))
                kt = R.permute_dims(kr, axes=[0, 1, 3, 2])
                q3 = R.reshape(q, R.shape([8, 8, 4]))
                k3 = R.reshape(kt, R.shape([8, 4, 8]))
                s = R.matmul(q3, k3)
                s4 = R.reshape(s, R.shape([2, 4, 8, 8]))
                s5 = R.multiply(s4, R.const(0.5, "float32"))
                s6 = R.where(mask, R.const(NINF, "float32"), s5)
                p = R.nn.softmax(s6, axis=-1)
                p3 = R.reshape(p, R.shape([8, 8, 8]))
                v3 = R.reshape(vr, R.shape([8, 8, 4]))
                o3 = R.matmul(p3, v3)
                o = R.reshape(o3, R.shape([2, 4, 8, 4]))
                R.output(o)
            return o

        @R.function
        def main(q: T4, k: K2, v: K2, m: R.Tensor((8, 8), "bool")) -> T4:
            cls = Expected
            with R.dataflow():
                o = cls.attention(q, k, v, m)
                R.output(o)
            return o

    _check(Before, Expected)


def test_batch_folded_3d_bool_where_keep():
    @I.ir_module
    class Before:
        @R.function
        def main(q: T3, k: T3, v: T3, keep: R.Tensor((8, 8), "bool")) -> T3:
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 2, 1])
                s = R.matmul(q, kt)
                s2 = R.multiply(s, R.const(0.5, "float32"))
                s3 = R.where(keep, s2, R.const(-3.4028234663852886e38, "float32"))
                p = R.nn.softmax(s3, axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def attention(q: T3, k: T3, v: T3, mask: R.Tensor((8, 8), "bool")) -> T3:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.gqa_groups": 1,
                         "attnforge.layout": "BND", "attnforge.mask_fill": -3.4028234663852886e38,
                         "attnforge.mask_invert": False, "attnforge.mask_kind": "bool",
                         "attnforge.safe_softmax": False, "attnforge.scale": 0.5})
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 2, 1])
                s = R.matmul(q, kt)
                s2 = R.multiply(s, R.const(0.5, "float32"))
                s3 = R.where(mask, s2, R.const(-3.4028234663852886e38, "float32"))
                p = R.nn.softmax(s3, axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

        @R.function
        def main(q: T3, k: T3, v: T3, keep: R.Tensor((8, 8), "bool")) -> T3:
            cls = Expected
            with R.dataflow():
                o = cls.attention(q, k, v, keep)
                R.output(o)
            return o

    _check(Before, Expected)


def test_safe_softmax_of_sdpa_decomposition():
    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: T4, v: T4, m: R.Tensor((8, 8), "float32")) -> T4:
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                s2 = R.add(s, m)
                p = R.nn.softmax(s2, axis=-1)
                e = R.equal(s2, R.const(NINF, "float32"))
                n = R.logical_not(e)
                i8 = R.astype(n, dtype="int8")
                mx = R.max(i8, axis=[-1], keepdims=True)
                b = R.astype(mx, dtype="bool")
                empty = R.logical_not(b)
                z = R.full_like(p, R.const(0.0, "float32"))
                p2 = R.where(empty, z, p)
                o = R.matmul(p2, v)
                R.output(o)
            return o

    after = FuseAttention()(Before)
    f = after["attention"]
    assert f.attrs["attnforge.safe_softmax"] is True
    assert f.attrs["attnforge.scale"] == 1.0
    assert len(f.body.blocks[0].bindings) == 13
    assert len(after["main"].body.blocks[0].bindings) == 1


def _unchanged(before):
    after = FuseAttention()(before)
    tvm.ir.assert_structural_equal(after.without_attr("attnforge.attention_rejections")
                                   if after.attrs else after, before)
    return attention_rejections(after)


def test_near_miss_softmax_over_wrong_axis():
    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: T4, v: T4) -> T4:
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                p = R.nn.softmax(s, axis=2)
                o = R.matmul(p, v)
                R.output(o)
            return o

    rej = _unchanged(Before)
    assert len(rej) == 1 and "axis 2" in rej[0]["reason"] and rej[0]["fused"] is False


def test_near_miss_op_between_softmax_and_matmul():
    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: T4, v: T4) -> T4:
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                p = R.nn.softmax(s, axis=-1)
                p2 = R.multiply(p, R.const(2.0, "float32"))
                o = R.matmul(p2, v)
                R.output(o)
            return o

    rej = _unchanged(Before)
    assert len(rej) == 1 and "relax.multiply" in rej[0]["reason"]


def test_near_miss_probabilities_also_returned():
    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k: T4, v: T4) -> R.Tuple(T4, S4):
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                p = R.nn.softmax(s, axis=-1)
                o = R.matmul(p, v)
                out = (o, p)
                R.output(out)
            return out

    rej = _unchanged(Before)
    assert len(rej) == 1 and "uses" in rej[0]["reason"]


def test_no_attention_is_a_no_op():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                z = R.nn.softmax(y, axis=-1)
                R.output(z)
            return z

    after = FuseAttention()(Before)
    tvm.ir.assert_structural_equal(after, Before)
    assert attention_rejections(after) == []


def test_concatenated_kv_producer_ends_the_operand_walk():
    """K and V made by concat (a cached prefix + new rows, as chunked prefill builds them):
    concat takes a tuple, so the walk back from the operands stops there and the site fuses."""

    @I.ir_module
    class Before:
        @R.function
        def main(q: T4, k0: KH, k1: KH, v0: KH, v1: KH) -> T4:
            with R.dataflow():
                k = R.concat((k0, k1), axis=2)
                v = R.concat((v0, v1), axis=2)
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt)
                s2 = R.multiply(s, R.const(0.5, "float32"))
                p = R.nn.softmax(s2, axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def attention(q: T4, k: T4, v: T4) -> T4:
            R.func_attr({"Composite": "attnforge.attention", "attnforge.gqa_groups": 1,
                         "attnforge.layout": "BHND", "attnforge.mask_kind": "none",
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
        def main(q: T4, k0: KH, k1: KH, v0: KH, v1: KH) -> T4:
            cls = Expected
            with R.dataflow():
                k = R.concat((k0, k1), axis=2)
                v = R.concat((v0, v1), axis=2)
                o = cls.attention(q, k, v)
                R.output(o)
            return o

    _check(Before, Expected)
    assert attention_rejections(FuseAttention()(Before)) == []
