"""BFloat16Matmuls: Before/Expected TVMScript, what it leaves alone, numerics on the CPU."""

import numpy as np
import tvm
from attnforge.passes.bfloat16_matmuls import BFloat16Matmuls
from attnforge.passes.pipeline import mixed_precision_passes
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32"),
             h: R.Tensor((4, 16), "float16"), w16: R.Tensor((16, 2), "float16")):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.gelu(y)
            u = R.matmul(h, w16)  # not fp32: left alone
            R.output(z, u)
        return (z, u)


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32"),
             h: R.Tensor((4, 16), "float16"), w16: R.Tensor((16, 2), "float16")):
        with R.dataflow():
            xb = R.astype(x, "bfloat16")
            wb = R.astype(w, "bfloat16")
            y = R.matmul(xb, wb, out_dtype="float32")
            z = R.nn.gelu(y)
            u = R.matmul(h, w16)
            R.output(z, u)
        return (z, u)


@I.ir_module
class WithComposite:
    @R.function(private=True)
    def attn(q: R.Tensor((2, 8), "float32"), k: R.Tensor((8, 2), "float32")):
        R.func_attr({"Composite": "attnforge.attention"})
        with R.dataflow():
            s = R.matmul(q, k)
            R.output(s)
        return s

    @R.function
    def main(q: R.Tensor((2, 8), "float32"), k: R.Tensor((8, 2), "float32")):
        cls = WithComposite
        with R.dataflow():
            s = cls.attn(q, k)
            R.output(s)
        return s


def test_rewrites_fp32_matmuls_only():
    tvm.ir.assert_structural_equal(BFloat16Matmuls(Before), Expected)


def test_attention_composites_and_no_matmul_modules_unchanged():
    tvm.ir.assert_structural_equal(BFloat16Matmuls(WithComposite), WithComposite)
    tvm.ir.assert_structural_equal(BFloat16Matmuls(Expected), Expected)  # idempotent


def _bf16_round(a: np.ndarray) -> np.ndarray:
    bits = a.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.view(np.float32)


def test_numerics_and_folded_bf16_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 70)).astype(np.float32)
    w = rng.standard_normal((70, 45)).astype(np.float32)

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((37, 70), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.const(w))
                R.output(y)
            return y

    mod = mixed_precision_passes("bfloat16")(Mod)
    (binding,) = [b for b in mod["main"].body.blocks[0].bindings
                  if isinstance(b.value, relax.Call) and b.value.op.name == "relax.matmul"]
    weight = binding.value.args[1]
    assert isinstance(weight, tvm.ir.expr.Constant) and weight.ty.dtype == "bfloat16"  # folded
    assert 'R.astype(x, dtype="bfloat16")' in mod.script(show_meta=False)
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = _bf16_round(x).astype(np.float64) @ _bf16_round(w).astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # exact products, fp32 sums
    assert np.abs(got - x.astype(np.float64) @ w).max() > 1e-4  # it really ran in bf16
