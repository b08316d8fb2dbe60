"""attnforge.sparsity: layouts vs brute force, bad inputs, and the fused kernel vs eager PyTorch
with the same dense mask (a hand-written attention module and a tiny HF Llama), compiled with
FuseAttention -> AnalyzeAttentionMask -> InsertSparsity -> LowerAttentionToTIR."""

import math

import numpy as np
import pytest
import torch
import tvm
from attnforge.passes import AnalyzeAttentionMask, FuseAttention, LowerAttentionToTIR
from attnforge.passes.attention_report import attention_report
from attnforge.passes.insert_sparsity import InsertSparsity
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from attnforge import sparsity as sp

LLVM = tvm.target.Target({"kind": "llvm"})


# ----------------------------------------------------------------- brute-force definitions
def _brute(policy, nq, nk, h=1, layer=0):
    """Element-by-element definition of each policy (independent of the vectorised code)."""
    off = nk - nq
    out = np.zeros((h, nq, nk), bool)
    rand = None
    if isinstance(policy, sp.BigBird):
        rand = policy.random_blocks(nq // policy.block_size, nk // policy.block_size, layer)
    for hh in range(h):
        for q in range(nq):
            for k in range(nk):
                out[hh, q, k] = _allowed(policy, hh, q, k, off, rand)
    return out


def _allowed(p, h, q, k, off, rand):
    if isinstance(p, sp.SlidingWindow):
        qa = q + off
        return qa - p.window < k <= qa if p.causal else abs(qa - k) <= p.window // 2
    if isinstance(p, sp.BlockLocal):
        return (q + off) // p.block_size == k // p.block_size
    if isinstance(p, sp.BlockSparse):
        lay = p.layout[h if p.layout.shape[0] > 1 else 0]
        return bool(lay[q // p.block_size, k // p.block_size])
    if isinstance(p, sp.BigBird):
        qb, kb, g = q // p.block_size, k // p.block_size, p.num_global_blocks
        return (abs(qb - kb) <= p.num_window_blocks // 2 or qb < g or kb < g
                or kb in rand[qb])
    if isinstance(p, sp.Longformer):
        gt = {int(i) for i in p.global_tokens}
        return abs(q + off - k) <= p.window // 2 or k in gt or (q + off) in gt
    if isinstance(p, sp.MaskMod):
        t = [torch.tensor(x) for x in (0, h, q, k)]
        return bool(p.fn(*t))
    raise AssertionError(p)


def _check_layout(policy, nq, nk, h=1, layer=0):
    got = policy.dense(nq, nk, h, layer)
    want = _brute(policy, nq, nk, h, layer)
    assert np.array_equal(np.broadcast_to(got, want.shape), want), policy.describe()


@settings(max_examples=25, deadline=None)
@given(nq=st.integers(1, 24), extra=st.integers(0, 8), w=st.integers(1, 12), causal=st.booleans())
def test_sliding_window_and_block_local_layouts(nq, extra, w, causal):
    _check_layout(sp.SlidingWindow(w, causal=causal), nq, nq + extra)
    _check_layout(sp.BlockLocal(w), nq, nq + extra)
    assert sp.SlidingWindow(w, causal=causal).mask_spec(nq, nq + extra).kind == "structured"


@settings(max_examples=20, deadline=None)
@given(nb=st.integers(1, 6), bs=st.integers(1, 5), h=st.sampled_from([1, 3]),
       seed=st.integers(0, 3), data=st.data())
def test_block_sparse_and_bigbird_layouts(nb, bs, h, seed, data):
    rng = np.random.default_rng(seed)
    nq = data.draw(st.integers((nb - 1) * bs + 1, nb * bs))  # ragged last block
    _check_layout(sp.BlockSparse(rng.random((h, nb, nb)) < 0.4, bs), nq, nq, h)
    g = data.draw(st.integers(0, nb))
    bb = sp.BigBird(bs, data.draw(st.sampled_from([1, 3, 5])), g, data.draw(st.integers(0, 3)),
                    seed=seed)
    _check_layout(bb, nb * bs, nb * bs, layer=data.draw(st.integers(0, 2)))


@settings(max_examples=20, deadline=None)
@given(nq=st.integers(1, 20), extra=st.integers(0, 6), half=st.integers(1, 6),
       gt=st.lists(st.integers(0, 19), max_size=3))
def test_longformer_layout(nq, extra, half, gt):
    gt = [i for i in gt if i < nq + extra]
    _check_layout(sp.Longformer(2 * half, gt), nq, nq + extra)
    _check_layout(sp.Longformer(2 * half, min(3, nq)), nq, nq)


def test_mask_mod_layouts_including_per_head_and_closures():
    doc = torch.tensor([0] * 7 + [1] * 6 + [2] * 5)

    def document(b, h, q, k):
        return doc[q] == doc[k]

    def per_head(b, h, q, k):
        return (q - k).abs() <= h + 1

    _check_layout(sp.MaskMod(document), 18, 18)
    _check_layout(sp.MaskMod(per_head), 12, 12, h=3)
    assert sp.MaskMod(per_head).mask_spec(12, 12, 3).static_mask.shape == (3, 12, 12)
    # a MaskMod that is a band is recognised as structured (exact)
    band = sp.MaskMod(lambda b, h, q, k: (q >= k) & (q - k < 4)).mask_spec(16, 16)
    assert band == sp.SlidingWindow(4).mask_spec(16, 16)


def test_combinators_and_layers():
    a, b = sp.SlidingWindow(5), sp.BigBird(4, 1, 1, 1, seed=2)
    n = 16
    assert np.array_equal((a & b).dense(n, n), a.dense(n, n) & b.dense(n, n))
    assert np.array_equal(sp.or_masks(a, b).dense(n, n), a.dense(n, n) | b.dense(n, n))
    assert (a & sp.BlockLocal(8)).mask_spec(n, n).kind == "structured"  # causal window chunks
    per = sp.Layers({0: a, 2: b})
    assert per.mask_spec(n, n, 1, 1) is None and per.layer_indices == {0, 2}
    assert np.array_equal(per.dense(n, n, 1, 2), b.dense(n, n, 1, 2))
    assert a.on_layers([1, 3]).layer_indices == {1, 3}
    assert (a | a.on_layers([1])).mask_spec(n, n, 1, 0) is None  # left alone == full
    bb = sp.BigBird(4, 3, 1, 2, seed=7)
    assert np.array_equal(bb.layout(8, 8, 0), sp.BigBird(4, 3, 1, 2, seed=7).layout(8, 8, 0))
    assert not np.array_equal(bb.layout(16, 16, 0), sp.BigBird(4, 3, 1, 2, seed=8).layout(
        16, 16, 0))


@pytest.mark.parametrize("make,arg", [
    (lambda: sp.SlidingWindow(0), "window"),
    (lambda: sp.SlidingWindow(-3), "window"),
    (lambda: sp.BlockLocal(0), "block_size"),
    (lambda: sp.BlockSparse(np.ones((2, 2), bool), 0), "block_size"),
    (lambda: sp.BlockSparse(np.ones((2, 2), bool), 4).mask_spec(16, 16), "layout"),
    (lambda: sp.BlockSparse(np.ones((3, 2, 2), bool), 4).mask_spec(8, 8, 2), "layout"),
    (lambda: sp.BlockSparse(np.full((2, 2), 3), 4), "layout"),
    (lambda: sp.BigBird(0), "block_size"),
    (lambda: sp.BigBird(4, 2), "num_window_blocks"),
    (lambda: sp.BigBird(8, 3, 5, 1).mask_spec(32, 32), "num_global_blocks"),
    (lambda: sp.BigBird(5).mask_spec(32, 32), "block_size"),
    (lambda: sp.Longformer(0), "window"),
    (lambda: sp.Longformer(5), "window"),
    (lambda: sp.Longformer(4, [40]).mask_spec(16, 16), "global_tokens"),
    (lambda: sp.MaskMod(lambda b, h, q, k: q - k).mask_spec(4, 4), "mask_mod"),
    (lambda: sp.MaskMod(lambda b, h, q, k: 1 / 0).mask_spec(4, 4), "mask_mod"),
    (lambda: sp.MaskMod(lambda b, h, q, k: q if q > k else k).mask_spec(  # noqa: FURB136
        4, 4), "mask_mod"),
    (lambda: sp.Layers({-1: sp.SlidingWindow(2)}), "layer index"),
    (lambda: sp.And(sp.SlidingWindow(2)), "two policies"),
])
def test_bad_inputs_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="mask_mod must be callable"):
        sp.MaskMod(3)
    with pytest.raises(TypeError, match="not a sparsity policy"):
        sp.SlidingWindow(4) & "causal"
    with pytest.raises(TypeError, match="layer 0 is not a policy"):
        sp.Layers({0: 4})


# ----------------------------------------------------------------- fused kernel vs eager
class HandAttention(torch.nn.Module):
    """matmul / scale / constant causal mask / softmax / matmul, HF-style GQA expand."""

    def __init__(self, causal: bool, groups: int):
        super().__init__()
        self.causal, self.groups = causal, groups

    def forward(self, q, k, v):
        b, hkv, n, d = k.shape
        if self.groups > 1:
            k, v = (t[:, :, None].expand(b, hkv, self.groups, n, d).reshape(
                b, hkv * self.groups, n, d) for t in (k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if self.causal:
            nq = q.shape[2]
            keep = torch.ones(nq, n, dtype=torch.bool).tril(n - nq)
            s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v


def _eager_masked(q, k, v, keep):
    """Eager PyTorch attention with a dense bool mask; rows with no key give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _compile(model, inputs, policy):
    from attnforge.frontends import import_torch_model

    mod = import_torch_model(model, inputs).mod
    mod = tvm.transform.Sequential([FuseAttention(), AnalyzeAttentionMask(),
                                    InsertSparsity(policy), LowerAttentionToTIR(LLVM)])(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
    return vm, attention_report(mod)


def _first(out):
    while not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


@pytest.mark.parametrize("nq,nk,h,hkv,causal,policy", [
    (100, 100, 4, 2, True, sp.SlidingWindow(33)),
    (130, 130, 2, 2, False, sp.SlidingWindow(40, causal=False)),
    (96, 96, 4, 1, True, sp.BlockLocal(48)),
    (128, 128, 4, 2, False, sp.BigBird(16, 3, 1, 2, seed=1)),
    (90, 90, 2, 1, True, sp.Longformer(20, [0, 45])),
    (70, 70, 4, 4, True, sp.MaskMod(lambda b, h, q, k: (q - k) % (h + 2) == 0, "stride")),
    (64, 96, 2, 2, True, sp.BlockSparse(np.random.default_rng(3).random((2, 4, 6)) < .5, 16)),
])
def test_fused_kernel_matches_eager_with_the_same_mask(nq, nk, h, hkv, causal, policy):
    g = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(1, h, nq, 16, generator=g)
    k, v = (torch.randn(1, hkv, nk, 16, generator=g) for _ in range(2))
    vm, report = _compile(HandAttention(causal, h // hkv), (q, k, v), policy)
    assert report[0]["lowered_to"] and "sparsity policy" in report[0]["mask_note"]
    got = _first(vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in (q, k, v)]))
    keep = torch.from_numpy(np.ascontiguousarray(policy.dense(nq, nk, h)))
    if causal:
        keep = keep & torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    want = _eager_masked(q, k, v, keep[None]).numpy()
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)


def test_tiny_llama_end_to_end_matches_eager_with_the_same_mask():
    from transformers import AttentionInterface

    from attnforge.models import build_hf_model

    n = 48
    policy = sp.Layers({0: sp.SlidingWindow(12), 1: sp.BigBird(8, 3, 1, 1, seed=4)})
    model, inputs = build_hf_model("llama", batch=1, seq_len=n, hidden=64, layers=2, heads=4)

    def reference(module, query, key, value, attention_mask, scaling=None, **_):
        keep = torch.from_numpy(policy.dense(n, n, query.shape[1], module.layer_idx).copy())
        keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        s = (query @ k.transpose(-1, -2) * scaling).masked_fill(~keep, float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2).contiguous(), None

    vm, report = _compile(model, inputs, policy)
    assert [e["mask"] for e in report] == ["sliding_window(left=11, right=0)",
                                           f"static block-sparse (1, {n}, {n})"]
    got = _first(vm["main"](tvm.runtime.tensor(inputs[0].numpy())))
    AttentionInterface.register("attnforge_sparsity_ref", reference)
    model.set_attn_implementation("attnforge_sparsity_ref")
    with torch.no_grad():
        want = model(*inputs).logits.numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, err


def test_evaluate_reports_error_and_top1():
    from attnforge.models import build_hf_model

    model, inputs = build_hf_model("llama", batch=1, seq_len=64, hidden=64, layers=2, heads=4)
    same = sp.evaluate(model, sp.SlidingWindow(64), inputs)  # causal & window(64) == causal
    assert same["top1_agreement"] == 1.0 and same["max_abs_error"] < 1e-3
    assert same["cosine_similarity"] > 0.9999
    assert [s["sparsity_changed"] for s in same["sites"]] == [False, False]
    sparse = sp.evaluate(model, sp.SlidingWindow(4).on_layers([1]), inputs)
    assert [s["sparsity_changed"] for s in sparse["sites"]] == [False, True]
    assert sparse["max_abs_error"] > 1e-3 and 0.0 <= sparse["top1_agreement"] <= 1.0
    assert set(sparse["outputs"]) == {"logits"}
