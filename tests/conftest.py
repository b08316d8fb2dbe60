"""Shared fixtures: deterministic seeds, tiny models, two TVM threads at most."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_gpt2():
    from attnforge.models import build_hf_model

    return build_hf_model("gpt2", batch=2, seq_len=160, hidden=32, layers=2, heads=2)


@pytest.fixture(scope="session")
def compiled_gpt2(tiny_gpt2):
    import attnforge

    model, inputs = tiny_gpt2
    return attnforge.compile_model(model, inputs, target="llvm")
