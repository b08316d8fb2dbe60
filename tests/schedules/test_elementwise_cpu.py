"""ElementwiseCPU + cpu_schedule_pass: structure, skip rules, numerics, and an HF model e2e."""

from collections import Counter

import numpy as np
import pytest
import tvm
from attnforge.schedules.cpu_schedule import cpu_build_pipeline, cpu_schedule_pass
from attnforge.schedules.elementwise_cpu import ElementwiseCPU
from tvm import relax, s_tir, te, tirx, topi
from tvm.script import ir as I
from tvm.script import tirx as T

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})


def _kinds(func: tirx.PrimFunc, block: str) -> list[str]:
    sch = s_tir.Schedule(func)
    return [
        tirx.ForKind(int(sch.get(lp).kind)).name.lower()
        for lp in sch.get_loops(sch.get_sblock(block))
    ]


def _run(func, inputs, out_shape, out_dtype="float32"):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype), dev)
    lib["main"](*[tvm.runtime.tensor(x, dev) for x in inputs], out)
    return out.numpy()


def test_broadcast_chain_is_one_parallel_vectorised_nest():
    x = te.placeholder((128, 256), name="x")
    b = te.placeholder((256,), name="b")
    y = topi.transpose(topi.reshape(topi.multiply(topi.add(x, b), 0.5), (256, 128)), (1, 0))
    sch = ElementwiseCPU().apply(te.create_prim_func([x, b, y]), TARGET, False)
    assert sch is not None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    assert len(blocks) == 1  # add, multiply, reshape inlined into the transpose
    name = sch.get(blocks[0]).name_hint
    assert _kinds(sch.mod["main"], name) == ["parallel", "vectorized"]
    xs, bs = np.random.rand(128, 256).astype("float32"), np.random.rand(256).astype("float32")
    ref = ((xs + bs) * 0.5).reshape(256, 128).T
    np.testing.assert_allclose(_run(sch.mod["main"], [xs, bs], (128, 256)), ref, rtol=1e-6)


def test_small_op_is_vectorised_but_not_parallel():
    x = te.placeholder((4, 48), name="x")
    sch = ElementwiseCPU().apply(te.create_prim_func([x, topi.exp(x)]), TARGET, False)
    assert _kinds(sch.mod["main"], "compute") == ["serial", "serial", "vectorized"]


def test_reduction_and_take():
    x = te.placeholder((300, 77), name="x")
    s = topi.sum(x, axis=1)
    sch = ElementwiseCPU().apply(te.create_prim_func([x, s]), TARGET, False)
    assert _kinds(sch.mod["main"], "x_red")[0] == "parallel"
    xs = np.random.rand(300, 77).astype("float32")
    np.testing.assert_allclose(_run(sch.mod["main"], [xs], (300,)), xs.sum(1), rtol=1e-5)

    table = te.placeholder((1000, 64), name="table")
    idx = te.placeholder((300,), name="idx", dtype="int32")
    sch = ElementwiseCPU().apply(
        te.create_prim_func([table, idx, topi.take(table, idx, axis=0)]), TARGET, False
    )
    ts, ids = np.random.rand(1000, 64).astype("float32"), np.random.randint(0, 1000, 300)
    out = _run(sch.mod["main"], [ts, ids.astype("int32")], (300, 64))
    np.testing.assert_array_equal(out, ts[ids])


@I.ir_module
class Skipped:
    @T.prim_func(s_tir=True)
    def ours(x: T.Buffer((64, 64), "float32"), y: T.Buffer((64, 64), "float32")):
        T.func_attr({"attnforge.kernel": "attention", "op_pattern": 8})
        for i, j in T.grid(64, 64):
            with T.sblock("copy"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj]

    @T.prim_func(s_tir=True)
    def done(x: T.Buffer((64, 64), "float32"), y: T.Buffer((64, 64), "float32")):
        for i in T.parallel(64):
            for j in range(64):
                with T.sblock("copy"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x[vi, vj]

    @T.prim_func(s_tir=True)
    def opaque(x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")):
        for i in range(64):
            y[i] = x[i] * T.float32(2)


def test_pass_leaves_ours_scheduled_and_opaque_funcs_alone():
    stats = Counter()
    out = cpu_schedule_pass(TARGET, stats)(Skipped)
    tvm.ir.assert_structural_equal(out, Skipped)
    assert stats["skipped"] == 2 and stats["left alone"] == 1, stats
    assert ElementwiseCPU().apply(Skipped["opaque"], TARGET, False) is None


def _hf_model(name: str):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from attnforge.models import build_hf_model

    model, inputs = build_hf_model(name, hidden=64, layers=1, seq_len=64)
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    ep = torch.export.export(model, inputs)
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(ep, keep_params_as_input=False)
    with torch.no_grad():
        ref = model(*inputs)[0].numpy()
    return mod, [x.numpy() for x in inputs], ref


@pytest.mark.parametrize("name", ["bert"])
def test_hf_model_end_to_end(name):
    mod, inputs, ref = _hf_model(name)
    stats = Counter()
    mod = cpu_build_pipeline(TARGET, stats)(mod)
    assert stats["left alone"] == 0 and stats["MatmulCPU"] >= 3, stats
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x, tvm.cpu()) for x in inputs])
    out = out[0] if not hasattr(out, "numpy") else out
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
