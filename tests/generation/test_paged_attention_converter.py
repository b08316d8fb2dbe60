"""The frontend converter for ``attnforge::paged_decode_attention``: one shared PrimFunc for all
layers (the layer is a scalar argument), structurally equal to the kernel built directly."""

import os

import numpy as np
import torch
import tvm
from tvm import relax

import attnforge.generation.hf_attention  # noqa: F401  (defines the custom op)
from attnforge.frontends import import_torch_model
from attnforge.frontends.paged_attention import OP_KEY, convert_paged_decode_attention
from attnforge.schedules.attention_decode_paged import (
    default_num_splits,
    paged_decode_attention_cpu,
)

B, H, KVH, D, L, P, S, MP = 2, 4, 2, 8, 3, 6, 16, 3


class TwoLayers(torch.nn.Module):
    def forward(self, q, kn, vn, kp, vp, pt, cl):
        a = torch.ops.attnforge.paged_decode_attention(q, kn, vn, kp, vp, pt, cl, 0, 0.5, 0)
        b = torch.ops.attnforge.paged_decode_attention(a, kn, vn, kp, vp, pt, cl, 2, 0.5, 0)
        return b


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, H, D, generator=g), torch.randn(B, KVH, D, generator=g),
            torch.randn(B, KVH, D, generator=g), torch.randn(L, P, KVH, D, S, generator=g),
            torch.randn(L, P, KVH, S, D, generator=g),
            torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32),
            torch.tensor([17, 40], dtype=torch.int32))


def test_converter_emits_one_shared_kernel_with_layer_scalar():
    imp = import_torch_model(TwoLayers(), _inputs(),
                             custom_convert_map={OP_KEY: convert_paged_decode_attention})
    prims = {gv.name_hint: f for gv, f in imp.mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert list(prims) == ["paged_decode_attention"]
    threads = int(os.environ.get("TVM_NUM_THREADS", 0)) or os.cpu_count()
    expected = paged_decode_attention_cpu(
        batch=B, q_heads=H, kv_heads=KVH, head_dim=D, num_layers=L, num_pages=P, page_size=S,
        max_pages=MP, scale=0.5, window=0, num_splits=default_num_splits(B, KVH, MP, threads))
    tvm.ir.assert_structural_equal(prims["paged_decode_attention"].without_attr("global_symbol"),
                                   expected)
    calls = [b.value for blk in imp.mod["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]
    assert [c.args[0].name_hint for c in calls] == ["paged_decode_attention"] * 2
    layers = [c.args[1].fields[-1] for c in calls]
    assert [int(x.value) for x in layers] == [0, 2]  # R.prim_value(layer), pools passed whole
    assert all(c.args[1].fields[3].same_as(imp.mod["main"].params[3]) for c in calls)


def test_converted_program_runs_and_matches_eager():
    from attnforge.compiler import _build, _schedule
    from attnforge.target import parse_target

    xs = _inputs()
    imp = import_torch_model(TwoLayers(), xs,
                             custom_convert_map={OP_KEY: convert_paged_decode_attention})
    tgt = parse_target("llvm")
    mod, _, _ = _schedule(imp.mod, tgt)
    vm = relax.VirtualMachine(_build(mod, tgt), tvm.cpu())
    out = vm["main"](*[tvm.runtime.from_dlpack(x) for x in xs])
    out = out[0] if not isinstance(out, tvm.runtime.Tensor) else out
    np.testing.assert_allclose(out.numpy(), TwoLayers()(*xs).numpy(), rtol=0, atol=1e-5)
