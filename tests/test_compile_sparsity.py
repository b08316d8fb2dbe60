"""compile_model(sparsity=...): the policy reaches every site, the report says whether it
changed the model, and verification is enforced only when it did not."""

import torch

import attnforge
from attnforge.models import build_hf_model
from attnforge.sparsity import BigBird, Layers, SlidingWindow


def test_window_policy_on_causal_llama():
    model, inputs = build_hf_model("llama", batch=1, seq_len=256)
    dense = attnforge.compile_model(model, inputs)
    cm = attnforge.compile_model(model, inputs, sparsity=SlidingWindow(64))
    rep = cm.report
    assert rep["sparsity"]["changed_sites"] == [0, 1]
    for d, s in zip(dense.report["attention"], rep["attention"]):
        assert s["sparsity_changed"] and "sliding_window(left=63" in s["mask"], s
        assert s["visited_fraction"] < d["visited_fraction"]
    v = rep["verification"]
    assert v["enforced"] is False and "not enforced" in v["note"]
    assert 0.9 < rep["accuracy"]["outputs"][0]["cosine"] < 1.0


def test_policy_equal_to_the_models_mask_is_exact_and_verified():
    model, inputs = build_hf_model("llama", batch=1, seq_len=96)
    cm = attnforge.compile_model(model, inputs, sparsity=SlidingWindow(1000))
    assert cm.report["sparsity"]["changed_sites"] == []
    assert cm.report["verification"]["passed"] and "enforced" not in cm.report["verification"]
    with torch.no_grad():
        ref = model(*inputs).logits
    torch.testing.assert_close(cm(*inputs).logits, ref, rtol=1e-4, atol=1e-4)


def test_per_layer_policies():
    model, inputs = build_hf_model("llama", batch=1, seq_len=256)
    cm = attnforge.compile_model(model, inputs, sparsity=Layers({1: BigBird(64, 1, 1, 1, seed=0)}))
    first, second = cm.report["attention"]
    assert not first["sparsity_changed"] and first["mask"] == "causal"
    assert second["sparsity_changed"]
