"""FlexAttention import: models calling ``flex_attention`` (block masks from ``create_block_mask``,
score mods, captured tensors, GQA) compiled with ``compile_model`` on llvm against eager
``flex_attention`` and a float64 run; the converter's and the subgraph translator's output as
TVMScript Before/Expected; clear errors for what cannot be compiled."""

import copy

import numpy as np
import pytest
import torch
import tvm
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import attnforge
from attnforge.frontends import UnsupportedOpError, import_torch_model
from attnforge.frontends.flex_attention import is_flex_node
from attnforge.frontends.flex_subgraph import score_mod_to_tir


def _block_mask(fn, n, b=None):
    return create_block_mask(fn, b, None, n, n, device="cpu")


def _compile_and_check(model, inputs, atol=2e-5):
    """Compile on llvm; outputs vs eager flex_attention (fp32) and a float64 eager run."""
    torch.manual_seed(0)
    cm = attnforge.compile_model(model, inputs, target="llvm")
    fresh = [torch.randn_like(x) for x in inputs]  # new random data, not the export inputs
    got = cm(*fresh)
    got = got if isinstance(got, (tuple, list)) else (got,)
    with torch.no_grad():
        ref = model(*fresh)
        ref64 = copy.deepcopy(model).double()(*[x.double() for x in fresh])
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    ref64 = ref64 if isinstance(ref64, (tuple, list)) else (ref64,)
    for g, r, r64 in zip(got, ref, ref64, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-4)
        torch.testing.assert_close(g.double(), r64, atol=atol, rtol=1e-4)
    return cm


B, HQ, HKV, N, D = 2, 4, 2, 200, 32  # N not a multiple of flex's 128 or our 64
SEGMENTS = torch.tensor([0] * 70 + [1] * 90 + [2] * 40)  # document ids, captured by mask_mod


def causal(b, h, q, k):
    return q >= k


def document(b, h, q, k):
    return SEGMENTS[q] == SEGMENTS[k]


def softcap(score, b, h, q, k):
    return torch.tanh(score / 8.0) * 8.0


class CausalAlibiAndDocumentSoftcap(torch.nn.Module):
    """Two sites: causal + ALiBi (per-head slope parameter, captured by the score mod) and a
    document mask + tanh softcapping with GQA (4 query heads on 2 kv heads)."""

    def __init__(self):
        super().__init__()
        self.slope = torch.nn.Parameter(torch.rand(HQ) * 0.2 + 0.05, requires_grad=False)
        self.causal = _block_mask(causal, N)
        self.doc = _block_mask(document, N)

    def forward(self, q, k, v, k2, v2):
        def alibi(score, b, h, qi, ki):
            return score + self.slope[h] * (ki - qi)

        o1 = flex_attention(q, k, v, score_mod=alibi, block_mask=self.causal)
        o2 = flex_attention(q, k2, v2, score_mod=softcap, block_mask=self.doc, enable_gqa=True)
        return o1, o2


def test_causal_alibi_and_document_softcap_gqa():
    q = torch.randn(B, HQ, N, D)
    k, v = torch.randn(B, HQ, N, D), torch.randn(B, HQ, N, D)
    k2, v2 = torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, D)
    cm = _compile_and_check(CausalAlibiAndDocumentSoftcap(), (q, k, v, k2, v2))
    sites = cm.report["attention"]
    assert [s["lowered_to"] for s in sites] == ["attnforge.fused_attention_cpu"] * 2
    assert all(s["source_op"] == "flex_attention" for s in sites)
    assert sites[0]["mask"] == "causal" and sites[0]["mask_mod"] == "mask_mod(ge)"
    assert sites[0]["score_mod"] == "score_mod(index, sub, mul, add)"
    assert sites[1]["mask"].startswith("static block-sparse") and sites[1]["gqa_groups"] == 2
    assert sites[1]["score_mod"] == "score_mod(div, tanh, mul)"
    assert sites[1]["visited_fraction"] < 1.0  # documents: off-diagonal blocks skipped


class WindowRelposAndPrefixLM(torch.nn.Module):
    """Sliding window (causal, 32 back) + relative-position score mod; prefix-LM mask + a
    learned T5-style relative-position bias table (captured 2-D tensor, clamped distance)."""

    def __init__(self, n):
        super().__init__()
        self.window = _block_mask(lambda b, h, q, k: (q >= k) & (q - k <= 32), n)
        self.prefix = _block_mask(lambda b, h, q, k: (k <= q) | (k < 20), n)
        self.table = torch.nn.Parameter(torch.randn(2, 33), requires_grad=False)

    def forward(self, q, k, v):
        def relpos(score, b, h, qi, ki):
            return score - (qi - ki).abs().float() * 0.05 + torch.where(h > 0, 0.3, -0.3)

        def table_bias(score, b, h, qi, ki):
            return score + self.table[h, (qi - ki).clamp(-16, 16) + 16]

        o1 = flex_attention(q, k, v, score_mod=relpos, block_mask=self.window)
        o2 = flex_attention(q, k, v, score_mod=table_bias, block_mask=self.prefix)
        return o1, o2


def test_sliding_window_relpos_and_prefix_lm():
    n = 130
    x = [torch.randn(B, 2, n, 16) for _ in range(3)]
    cm = _compile_and_check(WindowRelposAndPrefixLM(n), x)
    window, prefix = cm.report["attention"]
    assert window["mask"] == "sliding_window(left=32, right=0)"
    assert prefix["mask"].startswith("static block-sparse")
    assert prefix["score_mod"] == "score_mod(sub, clamp, add, index, add)"


class PerBatchDocumentsAndScoreOnly(torch.nn.Module):
    """Document ids that differ per batch row (mask varies over b) and a score mod with no
    block mask at all (depends on the batch index)."""

    def __init__(self, n):
        super().__init__()
        seg = torch.stack([torch.arange(n) // 40, torch.arange(n) // 25])
        self.docs = create_block_mask(lambda b, h, q, k: seg[b, q] == seg[b, k], B, None, n, n,
                                      device="cpu")

    def forward(self, q, k, v):
        def many_ops(s, b, h, qi, ki):  # comparisons, xor/or, where, clamp, max, floor div
            keep = (qi == ki) | ((qi % 3 != 1) ^ (ki > 5))
            return (torch.where(keep, s * 2, s.clamp(min=-1.0)) + torch.maximum(qi, ki).float()
                    // 7 - (h - qi) // 4 + b * 0.25)

        o1 = flex_attention(q, k, v, block_mask=self.docs)
        o2 = flex_attention(q, k, v, score_mod=many_ops)
        return o1, o2


def test_batch_varying_documents_and_score_mod_without_block_mask(tmp_path):
    n = 90
    x = [torch.randn(B, 2, n, 16) for _ in range(3)]
    model = PerBatchDocumentsAndScoreOnly(n)
    cm = _compile_and_check(model, x)
    docs, plain = cm.report["attention"]
    assert docs["lowered_to"] and docs["mask"] == "dense data-dependent"  # const [B,1,N,N]
    assert plain["mask"] == "full" and plain["score_mod"].startswith("score_mod(eq, remainder")
    cm.export(tmp_path / "flex.afm")  # the artifact runs without torch: numpy in, numpy out
    loaded = attnforge.load(tmp_path / "flex.afm")
    with torch.no_grad():
        want = model(*x)
    for got, w in zip(loaded(*[t.numpy() for t in x]), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), w.numpy(), atol=2e-5, rtol=1e-4)


def test_reference_body_without_kernels():
    """What runs when no kernel takes a site: the attention functions' Relax bodies (score mods
    as broadcast Relax ops, captured slope via take), built and run unlowered."""
    from tvm import relax

    from attnforge.passes import AnalyzeAttentionMask, FuseAttention

    n = 70
    model = CausalAlibiAndDocumentSoftcap.__new__(CausalAlibiAndDocumentSoftcap)
    torch.nn.Module.__init__(model)
    model.slope = torch.nn.Parameter(torch.rand(HQ) * 0.2 + 0.05, requires_grad=False)
    model.causal = _block_mask(causal, n)
    model.doc = _block_mask(lambda b, h, q, k: q // 30 == k // 30, n)
    x = [torch.randn(1, HQ, n, 16)] + [torch.randn(1, HQ, n, 16) for _ in range(2)] + [
        torch.randn(1, HKV, n, 16) for _ in range(2)]
    mod = AnalyzeAttentionMask()(FuseAttention()(import_torch_model(model, x).mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in x])
    with torch.no_grad():
        want = model(*x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ structural (TVMScript)
def _flex_node(model, inputs):
    ep = import_torch_model(model, inputs).exported_program
    return ep, next(n for n in ep.graph.nodes if is_flex_node(n))


class _Alibi(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.slope = torch.nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, q, k, v):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + self.slope[h] * (
            ki - qi))


def test_score_mod_translation_alibi():
    x = [torch.randn(1, 4, 8, 4) for _ in range(3)]
    ep, node = _flex_node(_Alibi(), x)
    got = score_mod_to_tir(getattr(ep.graph_module, node.args[3].target), [np.ones(4, "float32")],
                           "test")

    @T.prim_func(private=True)
    def expected(score: T.float32, b: T.int32, h: T.int32, q_idx: T.int32, kv_idx: T.int32,
                 captured0: T.Buffer((4,), "float32")) -> T.float32:
        return score + captured0[T.max(T.min(T.Select(h < 0, h + 4, h), 3), 0)] * T.Cast(
            "float32", kv_idx - q_idx)

    tvm.ir.assert_structural_equal(got, expected)


def test_score_mod_translation_softcap():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return flex_attention(q, k, v, score_mod=softcap)

    ep, node = _flex_node(M(), [torch.randn(1, 2, 8, 4) for _ in range(3)])
    got = score_mod_to_tir(getattr(ep.graph_module, node.args[3].target), [], "test")

    @T.prim_func(private=True)
    def expected(score: T.float32, b: T.int32, h: T.int32, q_idx: T.int32,
                 kv_idx: T.int32) -> T.float32:
        return T.tanh(score / T.float32(8.0)) * T.float32(8.0)

    tvm.ir.assert_structural_equal(got, expected)


CAUSAL8 = _block_mask(causal, 8)


class _CausalGQA(torch.nn.Module):
    def forward(self, q, k, v):
        return flex_attention(q, k, v, block_mask=CAUSAL8, enable_gqa=True)


@I.ir_module
class ExpectedCausalGQA:
    @R.function(private=True)
    def attention(q: R.Tensor((1, 2, 8, 4), "float32"), k: R.Tensor((1, 1, 8, 4), "float32"),
                  v: R.Tensor((1, 1, 8, 4), "float32"),
                  mask: R.Tensor((1, 1, 8, 8), "bool")) -> R.Tensor((1, 2, 8, 4), "float32"):
        with R.dataflow():
            k2 = R.repeat(k, repeats=2, axis=1)
            v2 = R.repeat(v, repeats=2, axis=1)
            kt = R.permute_dims(k2, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s1 = R.multiply(s, R.const(0.5, "float32"))
            s2 = R.where(mask, s1, R.const(float("-inf"), "float32"))
            p = R.nn.softmax(s2, axis=-1)
            mf = R.astype(mask, "float32")
            row = R.max(mf, axis=[-1], keepdims=True)
            ok = R.greater(row, R.const(0.0, "float32"))
            p2 = R.where(ok, p, R.const(0.0, "float32"))
            o = R.matmul(p2, v2)
            R.output(o)
        return o


def test_converter_output_causal_gqa():
    """Before: a model calling flex_attention; Expected: the annotated attention function and
    a call passing the keep-mask as a constant (then AnalyzeAttentionMask finds "causal")."""
    x = [torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)]
    mod = import_torch_model(_CausalGQA(), x).mod
    got = mod["attention"]
    attrs = dict(got.attrs.items())
    tvm.ir.assert_structural_equal(got, ExpectedCausalGQA["attention"].with_attrs(attrs))
    assert attrs["Composite"] == "attnforge.attention" and int(attrs["attnforge.gqa_groups"]) == 2
    assert float(attrs["attnforge.scale"]) == 0.5 and bool(attrs["attnforge.safe_softmax"])
    assert attrs["attnforge.mask_kind"] == "bool" and attrs["attnforge.source_op"] == (
        "flex_attention")
    call = mod["main"].body.blocks[0].bindings[0].value
    np.testing.assert_array_equal(call.args[3].value.numpy()[0, 0], np.tril(np.ones((8, 8), bool)))
    from attnforge.passes import AnalyzeAttentionMask, FuseAttention, attention_report

    (entry,) = attention_report(AnalyzeAttentionMask()(FuseAttention()(mod)))
    assert entry["mask"] == "causal" and entry["mask_input"] == "none"


# ------------------------------------------------------------------ errors
def test_unsupported_op_in_mask_mod():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            bm = create_block_mask(lambda b, h, qi, ki: torch.fmod(qi, 7) == ki % 3, None, None,
                                   64, 64, device="cpu")
            return flex_attention(q, k, v, block_mask=bm)

    with pytest.raises(UnsupportedOpError, match=r"mask_mod: aten\.fmod\.Scalar .* not supported"):
        import_torch_model(M(), [torch.randn(1, 2, 64, 16) for _ in range(3)])


def test_data_dependent_mask_mod():
    class M(torch.nn.Module):
        def forward(self, q, k, v, lens):
            bm = create_block_mask(lambda b, h, qi, ki: ki < lens[b], 2, None, 64, 64,
                                   device="cpu")
            return flex_attention(q, k, v, block_mask=bm)

    x = [torch.randn(2, 2, 64, 16) for _ in range(3)]
    with pytest.raises(UnsupportedOpError, match="data-dependent tensor 'lens'.*run-time input"):
        import_torch_model(M(), (*x, torch.tensor([30, 64])))


def test_data_dependent_score_mod():
    class M(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + bias[b])

    x = [torch.randn(2, 2, 64, 16) for _ in range(3)]
    with pytest.raises(UnsupportedOpError, match="score_mod: data-dependent tensor 'bias'"):
        import_torch_model(M(), (*x, torch.randn(2)))


def test_return_lse_is_rejected():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            out, lse = flex_attention(q, k, v, return_lse=True)
            return out + lse[..., None]

    with pytest.raises(UnsupportedOpError, match="return_lse"):
        import_torch_model(M(), [torch.randn(1, 2, 64, 16) for _ in range(3)])


@pytest.mark.slow
@pytest.mark.parametrize("target,precision", [("cuda:sm_90", "float16"),
                                              ("cuda:sm_80", "bfloat16")])
def test_cuda_compile_uses_the_tensor_core_kernel_slow(target, precision):
    """Builds for CUDA without a GPU: both flex sites (score mods, GQA) go to the tensor-core
    kernel; verification runs the same pipeline on this CPU (the report says so)."""
    n = 128
    x = [torch.randn(B, HQ, n, 64)] + [torch.randn(B, HQ, n, 64) for _ in range(2)] + [
        torch.randn(B, HKV, n, 64) for _ in range(2)]
    model = CausalAlibiAndDocumentSoftcap.__new__(CausalAlibiAndDocumentSoftcap)
    torch.nn.Module.__init__(model)
    model.slope = torch.nn.Parameter(torch.rand(HQ) * 0.2, requires_grad=False)
    model.causal = _block_mask(causal, n)
    model.doc = _block_mask(lambda b, h, q, k: q // 50 == k // 50, n)
    cm = attnforge.compile_model(model, x, target=target, precision=precision)
    sites = cm.report["attention"]
    assert [s["lowered_to"] for s in sites] == ["attnforge.fused_attention_cuda"] * 2, sites
    assert sites[0]["score_mod"] == "score_mod(index, sub, mul, add)"


def test_symbolic_lengths_are_refused_clearly():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return flex_attention(q, k, v, score_mod=softcap)

    seq = torch.export.Dim("seq", min=8, max=256)
    with pytest.raises(attnforge.frontends.FrontendError, match="symbolic shapes"):
        import_torch_model(M(), [torch.randn(1, 2, 64, 16) for _ in range(3)],
                           dynamic_shapes=({2: seq}, {2: seq}, {2: seq}))
