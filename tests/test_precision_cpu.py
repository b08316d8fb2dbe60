"""precision="bfloat16" on llvm: Linear weights in bf16 (half the bytes), bf16 x bf16 -> fp32
matmuls on vdpbf16ps where the CPU has AVX-512 BF16."""

import math

import attnforge
import numpy as np
import tvm
from attnforge.models import build_hf_model
from attnforge.passes.lower_bf16_matmul import register_tile
from attnforge.schedules.matmul_bf16_cpu import packed_shape
from attnforge.target import host_target


def test_bf16_halves_linear_weights_and_stays_accurate():
    model, inputs = build_hf_model("llama", hidden=64, seq_len=48)  # batch 2: see the note
    fp32 = attnforge.compile_model(model, inputs, verify=False)
    bf16 = attnforge.compile_model(model, inputs, precision="bfloat16")
    linears = [m.weight for m in model.modules() if isinstance(m, __import__("torch").nn.Linear)]
    linear = sum(w.numel() for w in linears)
    # 2 bytes saved per Linear weight element, less the zero padding of the packed vdpbf16ps
    # weights (N up to 16 nb columns, K even; here the LM head's 1000 -> 1024); everything else
    # unchanged (at batch > 1 the importer broadcasts o_proj's weight to [B, K, N]; bf16 then
    # stores one [K, N] copy)
    padding = 0
    has_bf16 = tvm.target.codegen.target_has_features("avx512bf16", host_target())
    assert bf16.report["bf16_matmuls"] == (len(linears) if has_bf16 else 0)  # 48 rows >= 16
    # both layers share one fused attention kernel, on vdpbf16ps too
    assert bf16.report["bf16_attention_kernels"] == (1 if has_bf16 else 0)
    if has_bf16:
        for w in linears:
            n, k = w.shape
            padding += math.prod(packed_shape(n, k, register_tile(n)["nb"])) - n * k
    assert fp32.report["weight_bytes"] - bf16.report["weight_bytes"] == 2 * linear - 2 * padding
    assert bf16.report["verification"]["passed"]
    (logits,) = bf16.report["accuracy"]["outputs"]
    assert logits["cosine"] > 0.9999 and logits["top1_agreement"] >= 0.9
    x = inputs[0].numpy()
    np.testing.assert_allclose(bf16.run_flat(x)[0], fp32.run_flat(x)[0], rtol=0,
                               atol=0.05 * np.abs(fp32.run_flat(x)[0]).max())


def test_bf16_without_avx512_bf16_keeps_fp32_math():
    """A target without AVX-512 BF16 gets the weights-only form (bf16 weights, fp32 math)."""
    from attnforge.compiler import _cpu_bfloat16
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((32, 16), "float32"), w: R.Tensor((16, 8), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    mod = relax.transform.BindParams("main", {"w": np.ones((16, 8), np.float32)})(Mod)
    old_cpu = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    text = _cpu_bfloat16(mod, old_cpu).script(show_meta=False)
    assert 'R.matmul(x, metadata["ir.GenericConst"][0], out_dtype="float32")' in text
    assert "call_tir" not in text
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert "R.call_tir(cls.bf16_matmul_cpu" in _cpu_bfloat16(mod, zen4).script(show_meta=False)


def test_int8_embedding_bytes_are_counted_exactly():
    """weight_bytes counts every constant: the int8 embedding (1000 x 64 int8 + one fp32 scale
    per 32 values) replaces the 1000 x 64 fp32 table, nothing else changes."""
    import pathlib

    import pytest

    if "avx512_vnni" not in pathlib.Path("/proc/cpuinfo").read_text():
        pytest.skip("no avx512_vnni in /proc/cpuinfo")
    model, inputs = build_hf_model("llama", hidden=64, seq_len=48)
    kw = dict(precision="int8", verify=False, calibration_data=[inputs])
    fp32_table = attnforge.compile_model(
        model, inputs, int8_options={"embeddings": "float32"}, **kw)
    int8_table = attnforge.compile_model(model, inputs, **kw)
    assert int8_table.report["quantization"]["embeddings"]["tables"] == [[1000, 64]]
    saved = fp32_table.report["weight_bytes"] - int8_table.report["weight_bytes"]
    assert saved == 1000 * 64 * 4 - (1000 * 64 + 1000 * (64 // 32) * 4)
    x = inputs[0].numpy()
    a, b = fp32_table.run_flat(x)[0], int8_table.run_flat(x)[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # same model up to the table's rounding
