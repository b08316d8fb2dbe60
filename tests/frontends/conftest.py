"""Helpers for the frontend tests: build an imported module on llvm, run it, compare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch.utils import _pytree
from tvm import relax


def build_and_run(mod: tvm.IRModule, *inputs: torch.Tensor) -> list[np.ndarray]:
    """Compile ``mod`` for llvm, run ``main`` on the relax VM, return its flat outputs."""
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    out = list(out) if isinstance(out, (list, tuple)) or hasattr(out, "__len__") else [out]
    return [o.numpy() for o in out]


def eager_flat(model: torch.nn.Module, *inputs: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        leaves = _pytree.tree_leaves(model(*inputs))
    return [t.numpy() for t in leaves]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype == np.bool_:
        return float((got != want).any())
    want = want.astype(np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def assert_matches(mod, model, *inputs, tol: float = 1e-4) -> None:
    got, want = build_and_run(mod, *inputs), eager_flat(model, *inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= tol


def check_hf_model(name: str, batch: int, impl: str, seq: int) -> None:
    """Import a built-in HF model, check input specs / attention sources, match eager."""
    from attnforge.frontends import import_torch_model

    from attnforge.models import build_hf_model

    model, inputs = build_hf_model(name, batch=batch, seq_len=seq, attn_implementation=impl)
    imp = import_torch_model(model, inputs)
    spec = imp.input_specs[0]
    assert spec["shape"] == tuple(inputs[0].shape)
    assert spec["dtype"] == str(inputs[0].dtype).removeprefix("torch.")
    assert len(imp.attention_sources) == 2  # 2 layers, one softmax each
    assert_matches(imp.mod, model, *inputs, tol=1e-4)


class _Helpers:
    check_hf_model = staticmethod(check_hf_model)
    build_and_run = staticmethod(build_and_run)
    eager_flat = staticmethod(eager_flat)
    rel_err = staticmethod(rel_err)
    assert_matches = staticmethod(assert_matches)


@pytest.fixture
def fe():
    """Helpers: ``fe.build_and_run``, ``fe.eager_flat``, ``fe.rel_err``, ``fe.assert_matches``."""
    return _Helpers
