"""Helpers for the pass tests: import a tiny HF model, run the attention pipeline, compare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from attnforge.passes import attention_pipeline, attention_rejections, attention_report
from tvm import relax

from attnforge.models import build_hf_model

LLVM = tvm.target.Target({"kind": "llvm"})


def _import(model, inputs, kwargs=None):
    """Relax module of ``model`` through attnforge.frontends."""
    from attnforge.frontends import import_torch_model

    return import_torch_model(model, inputs, example_kwargs=kwargs).mod


def run_model(name: str, impl: str, *, padding: bool = False, **kw):
    """Pipeline + build + run on llvm; returns (report, rejections, rel_err)."""
    model, inputs = build_hf_model(name, batch=2, attn_implementation=impl, hidden=64,
                                   layers=2, **kw)
    kwargs = None
    if padding:
        am = torch.ones_like(inputs[0])
        am[0, :5] = 0  # left padding of the first sequence
        kwargs = {"attention_mask": am}
    mod = _import(model, inputs, kwargs)
    lowered = attention_pipeline(LLVM)(mod)
    vm = relax.VirtualMachine(tvm.compile(lowered, LLVM), tvm.cpu())
    args = list(inputs) + list((kwargs or {}).values())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    while not hasattr(out, "numpy"):
        out = out[0]
    with torch.no_grad():
        ref = model(*inputs, **(kwargs or {}))[0].numpy()
    got = out.numpy()
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    return attention_report(lowered), attention_rejections(lowered), err


@pytest.fixture
def run_attention_model():
    """The :func:`run_model` helper (conftest modules are not importable by name)."""
    return run_model
