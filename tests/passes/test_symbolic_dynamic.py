"""Symbolic sequence length in the attention passes: Before/Expected TVMScript, errors."""

import math
import re

import numpy as np
import pytest
import tvm
from attnforge.passes import AnalyzeAttentionMask, FuseAttention, InsertSparsity
from attnforge.passes.lower_attention import LowerAttentionToTIR
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from attnforge.sparsity import BigBird, Dispatch, MaskMod, SlidingWindow

TQ = R.Tensor((2, 4, "n", 8), "float32")  # string dims: one symbolic var per function
TK = R.Tensor((2, 2, "n", 8), "float32")


@I.ir_module
class Causal:
    """GQA attention with a causal mask built from iotas of symbolic extent."""

    @R.function
    def main(q: TQ, k: TK, v: TK) -> TQ:
        n = T.int64()
        with R.dataflow():
            ke = R.expand_dims(k, axis=[2])
            kb = R.broadcast_to(ke, R.shape([2, 2, 2, n, 8]))
            kr = R.reshape(kb, R.shape([2, 4, n, 8]))
            ve = R.expand_dims(v, axis=[2])
            vb = R.broadcast_to(ve, R.shape([2, 2, 2, n, 8]))
            vr = R.reshape(vb, R.shape([2, 4, n, 8]))
            kt = R.permute_dims(kr, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.5, "float32"))
            i = R.arange(0, n, 1, dtype="int64")
            qi = R.reshape(i, R.shape([n, 1]))
            ki = R.reshape(i, R.shape([1, n]))
            keep = R.less_equal(ki, qi)
            s3 = R.where(keep, s2, R.const(-math.inf, "float32"))
            p = R.nn.softmax(s3, axis=-1)
            o = R.matmul(p, vr)
            R.output(o)
        return o


def _causal_head_dim_16():
    """``Causal`` with head dim 16 (the CUDA kernel's mma tiles need multiples of 16)."""
    text = re.sub(r"\b8\b", "16", Causal.script())
    return tvm.script.from_source(text.replace('R.const("-inf"', 'R.const(float("-inf")'))




def test_fuse_attention_symbolic_length():
    @I.ir_module
    class Before:
        @R.function
        def main(q: TQ, k: TQ, v: TQ) -> TQ:
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
        def attention(q: TQ, k: TQ, v: TQ) -> TQ:
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
        def main(q: TQ, k: TQ, v: TQ) -> TQ:
            cls = Expected
            with R.dataflow():
                o = cls.attention(q, k, v)
                R.output(o)
            return o

    tvm.ir.assert_structural_equal(FuseAttention()(Before), Expected)


def _attention_attrs(mod):
    funcs = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("attention")]
    assert len(funcs) == 1
    return {k: v for k, v in funcs[0].attrs.items()}


def test_analyze_symbolic_causal_gqa():
    """Before = fused module; Expected = the same with the analysis attrs (causal, no tensor)."""
    before = FuseAttention()(Causal)
    gv = next(g for g, _ in before.functions_items() if g.name_hint.startswith("attention"))
    assert int(before[gv].attrs["attnforge.gqa_groups"]) == 2
    expected = before.clone()
    expected[gv] = before[gv].with_attrs({
        "attnforge.mask_spec": {"kind": "structured", "min_diff": 0},
        "attnforge.mask_input": "none", "attnforge.empty_rows": "nan",
        "attnforge.mask_note": "bool mask (fill -inf); symbolic length: the same structure at "
                               "the sampled lengths [3, 67, 200, 1024]"})
    tvm.ir.assert_structural_equal(AnalyzeAttentionMask()(before), expected)


def test_insert_dispatch_symbolic():
    """Before = analysed module; Expected = the same with the dispatch attrs."""
    before = AnalyzeAttentionMask()(FuseAttention()(Causal))
    after = InsertSparsity(Dispatch(100, long=SlidingWindow(32)))(before)
    gv = next(g for g, _ in before.functions_items() if g.name_hint.startswith("attention"))
    note = str(before[gv].attrs["attnforge.mask_note"]) + (
        "; sparsity policy Dispatch(threshold=100, short=model's own mask, "
        "long=SlidingWindow(32, causal)) applied as a length dispatch (one kernel, chosen at "
        "run time on kv_len: < 100 -> causal, >= 100 -> sliding_window(left=31, right=0)): "
        "this changes the model's function")
    expected = before.clone()
    expected[gv] = before[gv].with_attrs({
        "attnforge.mask_spec": {"kind": "structured", "min_diff": 0},
        "attnforge.dispatch": {"threshold": 100, "policy": (
            "Dispatch(threshold=100, short=model's own mask, long=SlidingWindow(32, causal))"),
            "long": {"kind": "structured", "min_diff": 0, "max_diff": 31}},
        "attnforge.empty_rows": "zero", "attnforge.sparsity": (
            "Dispatch(threshold=100, short=model's own mask, long=SlidingWindow(32, causal))"),
        "attnforge.sparsity_changed": True, "attnforge.mask_note": note})
    tvm.ir.assert_structural_equal(after, expected)


def test_insert_structured_policy_symbolic():
    before = AnalyzeAttentionMask()(FuseAttention()(Causal))
    attrs = _attention_attrs(InsertSparsity(SlidingWindow(16))(before))
    assert dict(attrs["attnforge.mask_spec"]) == {"kind": "structured", "min_diff": 0,
                                                  "max_diff": 15}
    assert bool(attrs["attnforge.sparsity_changed"])


def test_symbolic_refuses_static_layout_policy():
    before = AnalyzeAttentionMask()(FuseAttention()(Causal))
    with pytest.raises(ValueError, match="BigBird.*cannot be used with a symbolic sequence length"):
        InsertSparsity(BigBird(16, 3, 1, 1))(before)
    with pytest.raises(ValueError, match="BigBird.*cannot be used with a symbolic"):
        InsertSparsity(Dispatch(100, long=BigBird(16, 3, 1, 1)))(before)
    with pytest.raises(ValueError, match="not one structured rule for every length"):
        InsertSparsity(MaskMod(lambda b, h, q, k: (q - k) < 100, "window100"))(before)


def test_lower_symbolic_emits_layout_then_kernel():
    mod = LowerAttentionToTIR("llvm")(AnalyzeAttentionMask()(FuseAttention()(Causal)))
    text = mod["main"].script()
    assert text.index("attnforge_block_mask") < text.index("fused_attention_cpu_dynamic")
    assert not any(g.name_hint.startswith("attention") for g, _ in mod.functions_items())
    entry = mod.attrs["attnforge.attention_sites"][0]
    assert entry["lowered_to"] == "attnforge.fused_attention_cpu"
    assert entry["shape"]["q_len"] == "n" and entry["mask"] == "causal"
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})),
                                  tvm.cpu())
    rng = np.random.default_rng(0)
    for n in (5, 70):  # one kernel, two lengths (one ragged)
        q = rng.standard_normal((2, 4, n, 8)).astype("float32")
        k, v = (rng.standard_normal((2, 2, n, 8)).astype("float32") for _ in range(2))
        got = vm["main"](*[tvm.runtime.tensor(a) for a in (q, k, v)]).numpy()
        kr, vr = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
        s = (q @ kr.transpose(0, 1, 3, 2)) * 0.5
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ vr
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_lower_symbolic_cuda():
    """CUDA: fp32 is refused clearly (tensor cores need fp16/bf16); fp16 lowers to the layout
    + dynamic CUDA kernel and the module builds (never run on a GPU here)."""
    mod = AnalyzeAttentionMask()(FuseAttention()(Causal))
    cuda = {"kind": "cuda", "arch": "sm_90"}
    entry = LowerAttentionToTIR(cuda)(mod).attrs["attnforge.attention_sites"][0]
    assert entry["lowered_to"] is None and "dtype='float32' is not supported" in entry["reason"]
    with pytest.raises(ValueError, match="multiples of 16"):  # head_dim 8: mma tiles
        from attnforge.schedules.attention_cuda_dynamic import fused_attention_cuda_dynamic

        fused_attention_cuda_dynamic(None, 4, 2, None, None, 8)
    mod16 = AnalyzeAttentionMask()(FuseAttention()(_causal_head_dim_16()))
    out = LowerAttentionToTIR(cuda, compute_dtype="float16")(mod16)
    assert out.attrs["attnforge.attention_sites"][0]["lowered_to"] == (
        "attnforge.fused_attention_cuda")
    text = out["main"].script()
    assert "attnforge_block_mask" in text and "fused_attention_cuda_dynamic" in text


def test_dispatch_bad_arguments():
    with pytest.raises(ValueError, match="threshold must be an integer >= 1"):
        Dispatch(0)
    with pytest.raises(TypeError, match="not a sparsity policy"):
        Dispatch(16, long="window")
    with pytest.raises(TypeError, match="cannot itself be a Dispatch"):
        Dispatch(16, long=Dispatch(8))


def test_dispatch_static_shapes_picks_side():
    d = Dispatch(100, long=SlidingWindow(8))
    assert d.mask_spec(50, 50) is None  # short side: the model's own mask
    np.testing.assert_array_equal(d.dense(120, 120), SlidingWindow(8).dense(120, 120))


@I.ir_module
class DynBatch:
    """Attention whose only symbolic dim is the batch (static length 70)."""

    @R.function
    def main(q: R.Tensor(("b", 2, 70, 8), "float32"), k: R.Tensor(("b", 2, 70, 8), "float32"),
             v: R.Tensor(("b", 2, 70, 8), "float32")) -> R.Tensor(("b", 2, 70, 8), "float32"):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            p = R.nn.softmax(s, axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


def test_symbolic_batch_static_length_policy_and_dispatch():
    mod = AnalyzeAttentionMask()(FuseAttention()(DynBatch))
    attrs = _attention_attrs(InsertSparsity(Dispatch(64, long=SlidingWindow(16)))(mod))
    assert dict(attrs["attnforge.mask_spec"]) == {"kind": "structured", "min_diff": 0,
                                                  "max_diff": 15}  # long side: 70 >= 64
    assert "picks its side at compile time" in attrs["attnforge.sparsity"]
    lowered = LowerAttentionToTIR("llvm")(InsertSparsity(SlidingWindow(16))(mod))
    vm = tvm.relax.VirtualMachine(tvm.compile(lowered, tvm.target.Target({"kind": "llvm"})),
                                  tvm.cpu())
    rng = np.random.default_rng(1)
    d = np.arange(70)[:, None] - np.arange(70)[None, :]
    keep = (d >= 0) & (d < 16)
    for b in (1, 3):
        q, k, v = (rng.standard_normal((b, 2, 70, 8)).astype("float32") for _ in range(3))
        got = vm["main"](*[tvm.runtime.tensor(a) for a in (q, k, v)]).numpy()
        s = np.where(keep, q @ k.transpose(0, 1, 3, 2), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(got, (p / p.sum(-1, keepdims=True)) @ v, atol=2e-5,
                                   rtol=1e-4)
