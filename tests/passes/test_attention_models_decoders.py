"""End to end on tiny HF decoders (batch 2, hidden 64, 2 layers): every attention site is
fused and lowered with the expected mask, and the result matches eager PyTorch."""

import pytest

CASES = [
    ("gpt2", {}, "causal"),
    ("llama", {}, "causal"),  # GQA 4 query heads / 2 kv heads
    ("mistral", {"seq_len": 128, "sliding_window": 32}, "sliding_window(left=31, right=0)"),
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name,kw,mask", CASES, ids=[c[0] for c in CASES])
def test_decoder(name, kw, mask, impl, run_attention_model):
    report, rejections, err = run_attention_model(name, impl, **kw)
    assert len(report) == 2 and rejections == []
    for e in report:
        assert e["lowered_to"] == "attnforge.fused_attention_cpu", e
        assert e["mask"] == mask, e
        assert e["gqa_groups"] == (2 if name != "gpt2" else 1)
    assert err < 1e-4


def test_llama_sdpa_with_padding_keeps_causal_structure(run_attention_model):
    report, _, err = run_attention_model("llama", "sdpa", padding=True)
    assert len(report) == 2
    for e in report:
        assert e["lowered_to"] and e["mask"] == "causal" and e["mask_input"] == "bool", e
    assert err < 1e-4
