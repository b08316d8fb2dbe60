"""MatmulTensorCoreBF16: which matmuls it takes, and the WMMA bf16 code it produces."""

import re

import pytest
import tvm
from attnforge import cuda_aot
from attnforge.schedules.matmul_bf16_cuda import MatmulTensorCoreBF16, is_bf16_matmul
from tvm import te

SM80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _matmul(m, n, k, dtype="bfloat16", acc="float32", batch=None):
    lead = () if batch is None else (batch,)
    a = te.placeholder((*lead, m, k), dtype, name="A")
    b = te.placeholder((n, k), dtype, name="B")  # nn.Linear layout: [out, in]
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((*lead, m, n), lambda *ix: te.sum(
        a[(*ix[:-1], r)].astype(acc) * b[ix[-1], r].astype(acc), axis=r), name="C")
    return te.create_prim_func([a, b, c])


@pytest.mark.parametrize("shape,batch", [((200, 320, 272), None), ((128, 96, 80), 3)])
def test_takes_bf16_matmuls_with_ragged_sizes(shape, batch):
    func = _matmul(*shape, batch=batch)
    assert is_bf16_matmul(func)
    from tvm.s_tir.tensor_intrin import cuda as intrin_mod

    before = intrin_mod.get_wmma_intrin_group
    with SM80:
        sch = MatmulTensorCoreBF16().apply(func, SM80, False)
    assert intrin_mod.get_wmma_intrin_group is before  # the name switch is undone
    assert sch is not None
    text = sch.mod.script()
    assert "tvm_mma_sync" in text and "wmma.matrix_a" in text
    assert re.search(r'wmma\.matrix_a[^\n]*bfloat16|bfloat16[^\n]*wmma\.matrix_a', text)


@pytest.mark.parametrize("why,func,target", [
    ("fp16 is dlight's", _matmul(256, 256, 256, "float16"), SM80),
    ("bf16 accumulation", _matmul(256, 256, 256, acc="bfloat16"), SM80),
    ("M <= 64", _matmul(64, 256, 256), SM80),
    ("pre-Ampere", _matmul(256, 256, 256), tvm.target.Target({"kind": "cuda", "arch": "sm_75"})),
    ("not CUDA", _matmul(256, 256, 256), tvm.target.Target("llvm")),
])
def test_declines(why, func, target):
    with target:
        assert MatmulTensorCoreBF16().apply(func, target, False) is None, why


@pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_has_bf16_wmma_and_fits(arch):
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    with target:
        sch = MatmulTensorCoreBF16().apply(_matmul(512, 384, 320), target, False)
        lib = tvm.compile(sch.mod, target=target)
        (src,) = cuda_aot.cuda_sources(lib)
        ptx = cuda_aot.compile_source(src, arch, "ptx").decode()
        cubin, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    assert re.search(r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.f32\.bf16\.bf16\.f32", ptx)
    for name, r in cuda_aot.ptxas_report(log).items():
        assert r["spill_stores"] == 0 and r["registers"] <= 255, (name, r)
    sass = cuda_aot.sass(cubin)
    if sass is not None:
        assert "HMMA" in sass
