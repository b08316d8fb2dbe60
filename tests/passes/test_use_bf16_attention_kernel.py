"""UseBF16AttentionKernel: Before/Expected (the bf16 fused kernel swapped for its vdpbf16ps
version under the same GlobalVar), no-op cases, and a built module against float64."""

import pathlib

import numpy as np
import pytest
import torch
import tvm
from attnforge.passes.use_bf16_attention_kernel import (
    UseBF16AttentionKernel, count_bf16_attention,
)
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.attention_cpu_bf16 import fused_attention_cpu_bf16
from attnforge.schedules.attention_cpu_space import ARGS_KEY
from attnforge.schedules.block_mask import MaskSpec
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

KW = dict(batch=1, q_heads=4, kv_heads=2, q_len=80, kv_len=80, head_dim=32,
          mask=MaskSpec.causal(), scale=32 ** -0.5)


def _has_bf16() -> bool:
    try:
        return "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@I.ir_module
class Before:  # what LowerAttentionToTIR leaves (kernel swapped in by _module)
    @T.prim_func
    def fused_attention_cpu(q: T.handle, k: T.handle, v: T.handle, nb: T.handle, idx: T.handle,
                            full: T.handle, o: T.handle):
        T.evaluate(0)

    @R.function
    def main(q: R.Tensor((1, 4, 80, 32), "bfloat16"), k: R.Tensor((1, 2, 80, 32), "bfloat16"),
             v: R.Tensor((1, 2, 80, 32), "bfloat16"), nb: R.Tensor((1, 2), "int32"),
             idx: R.Tensor((1, 2, 2), "int32"), full: R.Tensor((1, 2, 2), "int32")):
        cls = Before
        with R.dataflow():
            o = R.call_tir(cls.fused_attention_cpu, (q, k, v, nb, idx, full),
                           out_ty=R.Tensor((1, 4, 80, 32), "bfloat16"))
            R.output(o)
        return o


def _module(generator, dtype="bfloat16", **extra):
    kernel, bm = generator(**KW, dtype=dtype, global_symbol="fused_attention_cpu", **extra)
    mod = Before.clone()
    mod["fused_attention_cpu"] = kernel
    relax.analysis.well_formed(mod)  # raises on a malformed module
    return mod, bm


def test_before_expected():
    before, _ = _module(fused_attention_cpu)
    assert ARGS_KEY in before["fused_attention_cpu"].attrs
    expected, _ = _module(fused_attention_cpu_bf16)
    expected["fused_attention_cpu"] = expected["fused_attention_cpu"].with_attr(
        "tir.noalias", True)
    got = UseBF16AttentionKernel(before)
    tvm.ir.assert_structural_equal(got, expected)
    assert count_bf16_attention(got) == 1 and count_bf16_attention(before) == 0
    assert ARGS_KEY not in got["fused_attention_cpu"].attrs  # no longer a design space


def test_noop_fp32_kernel_and_refused_tiles():
    fp32, _ = _module(fused_attention_cpu, dtype="float32")
    tvm.ir.assert_structural_equal(UseBF16AttentionKernel(fp32), fp32)
    odd, _ = _module(fused_attention_cpu, block_q=24, block_kv=24)  # 24 % 16: bf16 refuses
    tvm.ir.assert_structural_equal(UseBF16AttentionKernel(odd), odd)


@pytest.mark.skipif(not _has_bf16(), reason="no avx512_bf16 in /proc/cpuinfo")
def test_built_module_matches_float64():
    mod, bm = _module(fused_attention_cpu)
    mod = UseBF16AttentionKernel(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=default_cpu_target()), tvm.cpu())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 80, 32).bfloat16() for h in (4, 2, 2))
    layout = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype="int32"))
              for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    out = vm["main"](*(tvm.runtime.from_dlpack(x) for x in (q, k, v)), *layout)
    got = torch.from_dlpack(out).float().numpy()
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.double() for x in (q, k, v)), is_causal=True, enable_gqa=True).numpy()
    assert np.abs(got - ref).max() <= 4e-3 * np.abs(ref).max()
