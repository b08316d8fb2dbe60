"""cm.report["accuracy"]: metrics against eager fp32 on held-out inputs, for each precision."""

import numpy as np
import pytest
import torch

import attnforge
from attnforge.accuracy import accuracy_metrics, held_out_inputs
from attnforge.models import build_hf_model


def test_metrics_on_known_arrays():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 7))
    same = accuracy_metrics([ref], [ref.copy()], ["logits"])["outputs"][0]
    assert same["max_abs_err"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert same["top1_agreement"] == 1.0 and same["kl_divergence"] == pytest.approx(0.0)
    flipped = ref.copy()
    flipped[..., 0] = ref.max(-1) + 1.0  # every position now predicts token 0
    m = accuracy_metrics([ref], [flipped], ["logits"])["outputs"][0]
    expected = float((ref.argmax(-1) == 0).mean())
    assert m["top1_agreement"] == pytest.approx(expected) and m["kl_divergence"] > 0
    neg = accuracy_metrics([ref], [-ref], ["hidden"])
    assert neg["min_cosine"] == pytest.approx(-1.0) and "top1_agreement" not in neg["outputs"][0]


def test_held_out_inputs_are_fresh_and_in_range():
    ids = torch.randint(3, 50, (2, 16))
    (fresh,) = held_out_inputs((ids,))
    assert fresh.shape == ids.shape and fresh.dtype == ids.dtype
    assert not torch.equal(fresh, ids) and fresh.min() >= 3 and fresh.max() <= 49


@pytest.mark.parametrize("precision,min_top1", [("float32", 1.0), ("bfloat16", 0.9)])
def test_report_accuracy_per_precision(precision, min_top1):
    model, inputs = build_hf_model("llama", batch=2, seq_len=96)
    cm = attnforge.compile_model(model, inputs, precision=precision)
    acc = cm.report["accuracy"]
    assert acc["precision"] == precision and "held-out" in acc["inputs"]
    (logits,) = acc["outputs"]
    assert logits["name"] == "logits" and logits["cosine"] > 0.999
    assert logits["top1_agreement"] >= min_top1
    assert logits["kl_divergence"] < (1e-6 if precision == "float32" else 1e-2)
    if precision == "bfloat16":
        assert all(s["compute_dtype"] == "bfloat16" for s in cm.report["attention"])
        assert cm.report["verification"]["rtol"] == 5e-2
