"""Unit tests of attnforge's converters and graph fixes on tiny synthetic modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attnforge.frontends import FrontendError, import_torch_model
from tvm import relax


class CumsumMask(torch.nn.Module):
    """HF's position-id pattern: cumsum of a bool/int mask, then arithmetic on it."""

    def __init__(self, dim: int = -1, dtype=None):
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, x):
        mask = x > 0
        pos = torch.cumsum(mask, dim=self.dim, dtype=self.dtype)
        return pos * mask - 1, torch.cumsum(x.long(), self.dim)


@pytest.mark.parametrize("dim, dtype", [(-1, None), (0, None), (1, torch.int32)])
def test_cumsum_bool_and_int_promote_like_torch(fe, dim, dtype):
    model = CumsumMask(dim, dtype)
    x = torch.randn(3, 17) * 5
    imp = import_torch_model(model, (x,))
    want = torch.int64 if dtype is None else dtype
    assert [o.dtype for o in model(x)] == [want, torch.int64]
    fe.assert_matches(imp.mod, model, x, tol=0)


def test_cumsum_float_keeps_dtype(fe):
    model = torch.nn.Module()
    model.forward = lambda x: torch.cumsum(x, 1)
    x = torch.randn(2, 9)
    imp = import_torch_model(model, (x,))
    assert "float32" in imp.mod["main"].script()
    fe.assert_matches(imp.mod, model, x, tol=1e-5)


class SdpaThenView(torch.nn.Module):
    """The GPT-2 Conv1D pattern: ``view`` of ``transpose(sdpa_out)`` (legal in eager)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        y = y.view(-1, 32)  # fails after SDPA decomposition unless rewritten to reshape
        return self.proj(y).view(b, s, 32)


def test_view_after_decomposed_sdpa_batch2(fe):
    model = SdpaThenView().eval()
    x = torch.randn(2, 16, 32)
    imp = import_torch_model(model, (x,))
    fe.assert_matches(imp.mod, model, x)
    assert imp.attention_sources == [""]  # the root module


def test_view_with_inplace_mutation_is_kept(fe):
    class Mut(torch.nn.Module):
        def forward(self, x):
            y = x.clone()
            v = y.view(-1)
            v.add_(1.0)  # writes through the view: must keep its aliasing meaning
            return y * 2

    model = Mut()
    x = torch.randn(3, 4)
    imp = import_torch_model(model, (x,))
    fe.assert_matches(imp.mod, model, x, tol=1e-6)


def test_negative_dims_with_dynamic_shapes(fe):
    class Diff(torch.nn.Module):
        def forward(self, x):
            return torch.diff(x, dim=-1), torch.cat([x, x], dim=-1)[..., 1:]

    model = Diff()
    x = torch.randn(2, 12)
    seq = torch.export.Dim("seq", min=3, max=64)
    imp = import_torch_model(model, (x,), dynamic_shapes=({1: seq},))
    assert imp.input_specs[0]["shape"] == (2, "seq")
    for n in (12, 5):
        x = torch.randn(2, n)
        fe.assert_matches(imp.mod, model, x, tol=1e-6)


def _wrong_dtype_converter(node, importer):
    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.nn.relu(x.astype("float16")))


def test_dtype_guard_catches_wrong_converter(fe):
    model = torch.nn.ReLU()
    x = torch.randn(4, 4)
    with pytest.raises(FrontendError, match=r"aten\.relu\.default.*float16.*float32"):
        import_torch_model(model, (x,), custom_convert_map={"relu.default": _wrong_dtype_converter})
    with pytest.warns(UserWarning, match="casting the result"):
        imp = import_torch_model(model, (x,), strict_dtypes=False,
                                 custom_convert_map={"relu.default": _wrong_dtype_converter})
    fe.assert_matches(imp.mod, model, x, tol=1e-3)


def test_converter_exception_is_wrapped_with_op_and_module():
    def broken(node, importer):
        raise KeyError("boom")

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.Tanh()

        def forward(self, x):
            return self.act(x + 1)

    with pytest.raises(FrontendError, match=r"aten\.tanh\.default at module act \(Tanh\)") as e:
        import_torch_model(Outer(), (torch.randn(3),), custom_convert_map={"tanh.default": broken})
    assert e.value.op == "aten.tanh.default"
    assert "boom" in str(e.value)


class LinearStack(torch.nn.Module):
    """nn.Linear with bias lowers to aten.addmm for 2-D inputs (and after flattening)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(48, 40), torch.nn.Linear(40, 24)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + torch.addmm(x[:, :24], x, self.a.weight.T[:, :24],
                                                           beta=0.5, alpha=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_addmm_keeps_the_model_dtype(dtype):
    import attnforge

    model = LinearStack().to(dtype)
    x = torch.randn(37, 48).to(dtype)
    cm = attnforge.compile_model(model, (x,), target="llvm", fuse_attention=False,
                                 rtol=1e-4 if dtype == torch.float32 else 2e-2)
    out = cm(x)
    assert out.dtype == dtype
    ref = model.float()(x.float()).double()
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
