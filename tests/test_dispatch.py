"""Length dispatch and symbolic-length fused attention, end to end (compile -> export -> load),
and a static sparsity layout combined with a run-time padding mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnforge
from attnforge.sparsity import BigBird, Dispatch, SlidingWindow

THRESHOLD, WINDOW = 100, 40


class CausalAttention(torch.nn.Module):
    """One causal GQA attention layer; ``window`` set gives the reference for the long side."""

    def __init__(self, embed=32, heads=4, kv_heads=2, window=None):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, embed // heads
        self.q = torch.nn.Linear(embed, embed)
        self.kv = torch.nn.Linear(embed, 2 * kv_heads * self.d)
        self.window = window

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        if self.window is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            i = torch.arange(n)
            d = i[:, None] - i[None, :]
            mask = (d >= 0) & (d < self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, n, -1)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dense = CausalAttention().eval()
    windowed = CausalAttention(window=WINDOW).eval()
    windowed.load_state_dict(dense.state_dict())
    return dense, windowed


def _seq(max_len=512):
    return ({1: torch.export.Dim("seq", min=3, max=max_len)},)


def test_dispatch_both_sides_from_one_loaded_artifact(models, tmp_path):
    dense, windowed = models
    x = torch.randn(2, 32, 32)
    cm = attnforge.compile_model(dense, (x,), dynamic_shapes=_seq(),
                                 sparsity=Dispatch(THRESHOLD, long=SlidingWindow(WINDOW)))
    (site,) = cm.report["attention"]
    assert site["lowered_to"] == "attnforge.fused_attention_cpu"
    assert site["dispatch"]["threshold"] == THRESHOLD
    assert site["dispatch"]["short"] == "causal"
    assert site["dispatch"]["long"] == f"sliding_window(left={WINDOW - 1}, right=0)"
    assert site["sparsity_changed"] and "changes the model's function" in site["mask_note"]
    assert cm.report["sparsity"]["changed_sites"] == [0]
    assert cm.report["sparsity"]["dispatch"][0]["threshold"] == THRESHOLD
    assert "Dispatch(threshold=100" in cm.report["sparsity"]["policy"]
    cm.export(str(tmp_path / "d.afm"))
    loaded = attnforge.load(str(tmp_path / "d.afm"))
    for n in (37, 64, 99, 100, 130, 257):  # both sides, non-multiples of the 64 block
        x = torch.randn(2, n, 32)
        with torch.no_grad():
            want = (windowed if n >= THRESHOLD else dense)(x).numpy()
            other = (dense if n >= THRESHOLD else windowed)(x).numpy()
        got = np.asarray(loaded(x.numpy()))
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-5, (n, err)
        if n > WINDOW:  # the two sides really differ here: the check can fail
            assert np.abs(other - want).max() / np.abs(want).max() > 1e-3


def test_dispatch_static_shapes_picks_side_at_compile_time(models):
    dense, windowed = models
    x = torch.randn(2, 130, 32)
    cm = attnforge.compile_model(dense, (x,),
                                 sparsity=Dispatch(THRESHOLD, long=SlidingWindow(WINDOW)))
    (site,) = cm.report["attention"]
    assert "static shapes: kv_len=130 picks the long side" in site["sparsity"]
    with torch.no_grad():
        want = windowed(x).numpy()
    got = cm(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_dispatch_static_layout_long_policy_is_refused(models):
    dense, _ = models
    with pytest.raises(ValueError, match="cannot be used with a symbolic sequence length"):
        attnforge.compile_model(dense, (torch.randn(2, 32, 32),), dynamic_shapes=_seq(),
                                sparsity=Dispatch(THRESHOLD, long=BigBird(16, 3, 1, 1)))


@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_hf_decoder_dynamic_seq_len_fused(name):
    from attnforge.models import build_hf_model

    impl, layers = ("sdpa", 1) if name == "llama" else ("eager", 2)  # default test: 1 layer
    model, inputs = build_hf_model(name, batch=2, seq_len=32, attn_implementation=impl,
                                   layers=layers)
    cm = attnforge.compile_model(model, inputs, dynamic_shapes=_seq())
    sites = [s for s in cm.report["attention"] if s.get("fused", True)]
    assert len(sites) == layers
    for s in sites:
        assert s["lowered_to"] == "attnforge.fused_attention_cpu", s["reason"]
        assert s["mask"] == "causal" and s["shape"]["q_len"] == "seq"
    for n in (5, 64, 100, 127):  # GPT-2 tiny has 128 positions
        x = torch.randint(0, 1000, (2, n))
        with torch.no_grad():
            want = model(x).logits.numpy()
        got = cm(x)
        got = getattr(got, "logits", got)
        got = (got[0] if isinstance(got, (tuple, list)) else got).numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, n


class PaddedAttention(CausalAttention):
    """Causal attention with a run-time key padding mask; ``layout``: an extra fixed bool mask
    (the eager reference for a static sparsity policy)."""

    def __init__(self, layout=None):
        super().__init__()
        self.layout = None if layout is None else torch.from_numpy(layout)

    def forward(self, x, keep_keys):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        i = torch.arange(n)
        mask = (i[:, None] >= i[None, :]) & keep_keys[:, None, None, :]
        if self.layout is not None:
            mask = mask & self.layout
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, n, -1)


def test_static_policy_with_run_time_padding_mask():
    """BigBird (a static layout) on a model called with a padding mask: both applied."""
    n = 96
    policy = BigBird(16, 3, 1, 1, seed=3)
    torch.manual_seed(1)
    model = PaddedAttention().eval()
    ref = PaddedAttention(policy.dense(n, n)[0]).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, n, 32)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, -7:] = False  # right padding: key 0 stays visible (global block), no empty row
    cm = attnforge.compile_model(model, (x, keep), sparsity=policy)
    (site,) = cm.report["attention"]
    assert site["lowered_to"] == "attnforge.fused_attention_cpu"
    assert site["mask"].startswith("static block-sparse") and site["mask_input"] == "bool"
    assert site["visited_fraction"] < 1.0  # the layout still skips blocks
    assert "ANDed with the layout" in site["mask_note"]
    keep2 = keep.clone()
    keep2[0, -3:] = False  # a different padding at run time
    with torch.no_grad():
        want = ref(x, keep2).numpy()
        dense = model(x, keep2).numpy()
    got = cm(x, keep2).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert np.abs(dense - want).max() / np.abs(want).max() > 1e-3  # the policy mattered


def _window(n):
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    return (d >= 0) & (d < WINDOW)


def test_dispatch_with_run_time_padding_mask():
    """Symbolic length + a padding mask tensor + dispatch: the tensor is applied on both sides."""
    torch.manual_seed(2)
    model = PaddedAttention().eval()
    x = torch.randn(2, 32, 32)
    keep = torch.ones(2, 32, dtype=torch.bool)
    seq = torch.export.Dim("seq", min=3, max=512)
    cm = attnforge.compile_model(model, (x, keep), dynamic_shapes=({1: seq}, {1: seq}),
                                 sparsity=Dispatch(THRESHOLD, long=SlidingWindow(WINDOW)))
    (site,) = cm.report["attention"]
    assert site["lowered_to"] == "attnforge.fused_attention_cpu", site["reason"]
    assert site["mask_input"] == "bool" and site["dispatch"]["long"].startswith("sliding")
    for n in (70, 130):
        x = torch.randn(2, n, 32)
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[1, -9:] = False
        ref = PaddedAttention(_window(n) if n >= THRESHOLD else None).eval()
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            want = ref(x, keep).numpy()
        got = cm(x, keep).numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, n


@pytest.mark.slow
def test_hf_llama_dynamic_seq_len_with_padding_mask():
    from attnforge.models import build_hf_model

    model, inputs = build_hf_model("llama", batch=2, seq_len=32, attn_implementation="sdpa",
                                   layers=1)
    am = torch.ones_like(inputs[0])
    am[0, :5] = 0  # left padding
    seq = torch.export.Dim("seq", min=3, max=256)
    cm = attnforge.compile_model(model, (inputs[0], am), dynamic_shapes=({1: seq}, {1: seq}))
    (site,) = [s for s in cm.report["attention"] if s.get("fused", True)]
    assert site["lowered_to"] == "attnforge.fused_attention_cpu", site["reason"]
    assert site["mask"] == "causal" and site["mask_input"] == "bool"
    for n in (7, 100):
        x = torch.randint(0, 1000, (2, n))
        a = torch.ones_like(x)
        a[0, :3] = 0
        with torch.no_grad():
            want = model(x, a).logits.numpy()
        got = cm(x, a).logits.numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, n
