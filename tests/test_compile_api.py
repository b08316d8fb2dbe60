"""compile_model end to end on small modules: outputs, structure, report, bad input."""

import numpy as np
import pytest
import torch

import attnforge
from attnforge.errors import InputError, VerificationError


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(x).relu(), x * 2.0


def test_tuple_model_returns_same_structure_as_eager():
    model = TwoOutputs().eval()
    x = torch.randn(3, 16)
    cm = attnforge.compile_model(model, (x,))
    x2 = torch.randn(3, 16)
    got = cm(x2)
    ref = model(x2)
    assert isinstance(got, tuple) and len(got) == 2
    for g, r in zip(got, ref):
        assert isinstance(g, torch.Tensor)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    v = cm.report["verification"]
    assert v["passed"] and v["max_rel_err"] < 1e-4 and v["rtol"] == 1e-4
    assert v["ran_on"].startswith("llvm")


def test_numpy_in_numpy_out():
    model = TwoOutputs().eval()
    x = torch.randn(3, 16)
    cm = attnforge.compile_model(model, (x,))
    got = cm(x.numpy())
    assert isinstance(got[0], np.ndarray)
    np.testing.assert_allclose(got[0], model(x)[0].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_hf_model_output_structure_and_report(tiny_gpt2, compiled_gpt2):
    model, (ids,) = tiny_gpt2
    out = compiled_gpt2(ids)
    with torch.no_grad():
        ref = model(ids)
    assert type(out).__name__ == type(ref).__name__
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    rep = compiled_gpt2.report
    assert rep["verification"]["passed"]
    assert len(rep["attention"]) == 2
    for site in rep["attention"]:
        assert site["lowered_to"] == "attnforge.fused_attention_cpu"
        assert "causal" in site["mask"]
        assert site["source"] and "h." in site["source"]
        assert 0.4 < site["visited_fraction"] < 0.8


def test_call_time_input_errors(compiled_gpt2):
    with pytest.raises(InputError, match="shape"):
        compiled_gpt2(torch.zeros(1, 160, dtype=torch.int64))
    with pytest.raises(InputError, match="dtype"):
        compiled_gpt2(torch.zeros(2, 160, dtype=torch.int32))
    with pytest.raises(InputError, match="expected 1 input"):
        compiled_gpt2()
    with pytest.raises(InputError, match="torch.Tensor or numpy"):
        compiled_gpt2([[1, 2]])


def test_verification_failure_raises_with_numbers(tiny_gpt2):
    model, inputs = tiny_gpt2
    with pytest.raises(VerificationError, match=r"max rel\. error .* \(tolerance 1e-15\)") as e:
        attnforge.compile_model(model, inputs, rtol=1e-15)
    assert e.value.verification["first_mismatch"] == "logits"


def test_unsupported_op_names_the_aten_op():
    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x) + 1

    with pytest.raises(attnforge.UnsupportedOpError, match="bessel_j0"):
        attnforge.compile_model(Bessel(), (torch.randn(4),))


def test_cuda_target_without_gpu_verifies_cpu_twin_and_says_so():
    from attnforge.target import gpu_arch

    model = TwoOutputs().eval()
    cm = attnforge.compile_model(model, (torch.randn(3, 16),), target="cuda:sm_90")
    v = cm.report["verification"]
    assert v["passed"]
    if gpu_arch() is None:
        assert v["gpu_kernels_run"] is False
        assert "NOT run" in v["note"] and v["ran_on"].startswith("llvm")
        with pytest.raises(RuntimeError, match="no GPU"):
            cm(torch.randn(3, 16))


def test_near_miss_is_left_alone_and_reported():
    class WrongAxis(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-2)  # over queries: not attention
            return p @ v

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    cm = attnforge.compile_model(WrongAxis(), (q, k, v))
    (entry,) = cm.report["attention"]
    assert entry["fused"] is False and "axis" in entry["reason"], entry
    torch.testing.assert_close(cm(q, k, v), WrongAxis()(q, k, v), rtol=1e-4, atol=1e-5)


def test_dynamic_sequence_length_runs_other_lengths():
    from torch.export import Dim

    from attnforge.models import build_hf_model

    model, inputs = build_hf_model("bert", batch=1, seq_len=64)
    cm = attnforge.compile_model(
        model, inputs, dynamic_shapes={"input_ids": {1: Dim("seq", min=3, max=128)}})
    assert cm.input_specs[0]["shape"] == [1, "seq"]
    for n in (37, 100):
        ids = torch.randint(0, 1000, (1, n))
        with torch.no_grad():
            ref = model(ids).last_hidden_state
        torch.testing.assert_close(cm(ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="dim 0 must be 1"):
        cm(torch.randint(0, 1000, (2, 40)))
