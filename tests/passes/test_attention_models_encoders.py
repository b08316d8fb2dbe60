"""End to end on tiny HF encoders (batch 2, hidden 64, 2 layers): every attention site is
fused and lowered with a full (or data-dependent) mask and matches eager PyTorch."""

import pytest


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_encoder(name, impl, run_attention_model):
    report, rejections, err = run_attention_model(name, impl)
    assert len(report) == 2 and rejections == []
    for e in report:
        assert e["lowered_to"] == "attnforge.fused_attention_cpu", e
        assert e["mask"] == "full", e
    assert err < 1e-4


def test_bert_eager_with_padding_mask_is_dynamic(run_attention_model):
    report, _, err = run_attention_model("bert", "eager", padding=True)
    assert len(report) == 2
    for e in report:
        assert e["lowered_to"] and e["mask"] == "dense data-dependent", e
        assert e["mask_input"] == "additive"  # finfo.min: padded rows stay exact
    assert err < 1e-4
