"""Symbolic sequence length: HF models import, build and run at several lengths."""

from __future__ import annotations

import pytest
import torch
from attnforge.frontends import import_torch_model

from attnforge.models import build_hf_model


@pytest.mark.parametrize("name", ["bert"] + [pytest.param(n, marks=pytest.mark.slow)
                                             for n in ("gpt2", "llama")])
def test_hf_model_dynamic_seq_len(fe, name):
    model, inputs = build_hf_model(name, batch=2, seq_len=32, attn_implementation="sdpa",
                                   layers=1)
    seq = torch.export.Dim("seq", min=3, max=64)
    imp = import_torch_model(model, inputs, dynamic_shapes=({1: seq},))
    assert imp.input_specs[0]["shape"] == (2, "seq")  # named after the user's Dim
    assert 'input_ids: R.Tensor((2, seq), dtype="int64")' in imp.mod["main"].script()
    assert imp.mod["main"].attrs["tir_var_upper_bound"]["seq"] == 64
    for n in (32, 7):
        x = torch.randint(0, 1000, (2, n))
        fe.assert_matches(imp.mod, model, x, tol=1e-4)


def test_dynamic_batch_and_seq_dict_spec(fe):
    """dynamic_shapes keyed by argument name; both dims symbolic and named."""
    model, inputs = build_hf_model("gpt2", batch=2, seq_len=16, attn_implementation="eager",
                                   layers=1)
    dims = {"input_ids": {0: torch.export.Dim("batch", max=8),
                          1: torch.export.Dim("seq", min=3, max=64)}}
    imp = import_torch_model(model, inputs, dynamic_shapes=dims)
    assert imp.input_specs[0]["shape"] == ("batch", "seq")
    fe.assert_matches(imp.mod, model, torch.randint(0, 1000, (3, 9)), tol=1e-4)
