"""The model table: real HF architectures (random weights) compile, fuse every attention
site, and match eager PyTorch (fp32, rel. error < 1e-4)."""

import pytest
import torch

import attnforge
from attnforge.models import build_hf_model

# (model, expected mask description substring)
MODELS = [
    ("gpt2", "causal"),
    ("llama", "causal"),
    ("mistral", "sliding_window"),
    ("bert", None),
    ("vit", None),
]
FAST = {("gpt2", "eager", 1), ("llama", "sdpa", 2), ("mistral", "eager", 2),
        ("bert", "sdpa", 2), ("vit", "eager", 2), ("gpt2", "sdpa", 2)}


def _cases():
    for name, mask in MODELS:
        for impl in ("eager", "sdpa"):
            for batch in (1, 2):
                marks = () if (name, impl, batch) in FAST else (pytest.mark.slow,)
                yield pytest.param(name, impl, batch, mask, marks=marks,
                                   id=f"{name}-{impl}-b{batch}")


@pytest.mark.parametrize("name,impl,batch,mask", list(_cases()))
def test_model_matches_eager_and_fuses_attention(name, impl, batch, mask):
    seq = 128 if name == "mistral" else 64
    model, inputs = build_hf_model(name, batch=batch, seq_len=seq, attn_implementation=impl)
    cm = attnforge.compile_model(model, inputs)
    v = cm.report["verification"]
    assert v["passed"] and v["max_rel_err"] < 1e-4
    sites = cm.report["attention"]
    assert len(sites) == 2, sites  # 2 layers
    for site in sites:
        assert site["lowered_to"] == "attnforge.fused_attention_cpu", site
        if mask:
            assert mask in site["mask"], site
    if name == "mistral":  # window 32 at sequence 128: 3 of 4 blocks of 64 are visited
        assert all(s["visited_fraction"] <= 0.75 for s in sites)
    fresh = tuple(torch.randint_like(x, 0, 1000) if x.dtype == torch.int64 else
                  torch.randn_like(x) for x in inputs)
    with torch.no_grad():
        ref = model(*fresh)[0]
    got = cm(*fresh)[0]
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
