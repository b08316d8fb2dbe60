"""MatmulCPU: schedule structure, no-op cases, numerics on odd sizes, zmm FMAs in the asm."""

import pathlib
import re
from collections import Counter

import numpy as np
import pytest
import tvm
from attnforge.schedules.cpu_schedule import cpu_build_pipeline, cpu_schedule_pass
from attnforge.schedules.matmul_cpu import MatmulCPU
from tvm import relax, s_tir, te, tirx, topi
from tvm.script import tirx as T

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})


def _has_avx512() -> bool:
    try:
        return "avx512f" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# Linear + bias as Relax LegalizeOps + FuseTIR produce it (weight already [K, N]).
@T.prim_func(private=True, s_tir=True)
def linear_bias(
    x: T.Buffer((T.int64(64), T.int64(64)), "float32"),
    w: T.Buffer((T.int64(64), T.int64(128)), "float32"),
    b: T.Buffer((T.int64(128),), "float32"),
    out: T.Buffer((T.int64(64), T.int64(128)), "float32"),
):
    T.func_attr({"tirx.noalias": True})
    mm = T.sblock_alloc_buffer((T.int64(64), T.int64(128)))
    for i0, i1, k in T.grid(T.int64(64), T.int64(128), T.int64(64)):
        with T.sblock("matmul"):
            v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
            T.reads(x[v_i0, v_k], w[v_k, v_i1])
            T.writes(mm[v_i0, v_i1])
            with T.init():
                mm[v_i0, v_i1] = T.float32(0.0)
            mm[v_i0, v_i1] = mm[v_i0, v_i1] + x[v_i0, v_k] * w[v_k, v_i1]
    for ax0, ax1 in T.grid(T.int64(64), T.int64(128)):
        with T.sblock("T_add"):
            v_ax0, v_ax1 = T.axis.remap("SS", [ax0, ax1])
            T.reads(b[v_ax1], mm[v_ax0, v_ax1])
            T.writes(out[v_ax0, v_ax1])
            out[v_ax0, v_ax1] = b[v_ax1] + mm[v_ax0, v_ax1]


# Same loops, but a max-product "matmul": not C += A * B, must be left alone.
@T.prim_func(private=True, s_tir=True)
def max_product(
    x: T.Buffer((64, 64), "float32"),
    w: T.Buffer((64, 64), "float32"),
    out: T.Buffer((64, 64), "float32"),
):
    for i0, i1, k in T.grid(64, 64, 64):
        with T.sblock("maxprod"):
            v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
            with T.init():
                out[v_i0, v_i1] = T.float32(-1e30)
            out[v_i0, v_i1] = T.max(out[v_i0, v_i1], x[v_i0, v_k] * w[v_k, v_i1])


def _loop_kinds(sch: s_tir.Schedule, block_name: str) -> list[str]:
    loops = sch.get_loops(sch.get_sblock(block_name))
    return [tirx.ForKind(int(sch.get(lp).kind)).name.lower() for lp in loops]


def test_structure_linear_bias():
    sch = MatmulCPU().apply(linear_bias, TARGET, False)
    assert sch is not None
    func = sch.mod["main"]
    names = {b for b in re.findall(r'T\.sblock\("(\w+)"\)', func.script())}
    update = next(n for n in names if n.endswith("_update"))
    kinds = _loop_kinds(sch, update)
    # (s, jo, io) parallel -> ii -> k -> mr unrolled -> nr vectorised
    assert kinds[0] == "parallel" and kinds[-2:] == ["unrolled", "vectorized"], kinds
    assert sch.get(sch.get_loops(sch.get_sblock(update))[-1]).extent == 32  # 2 zmm of fp32
    reduce_loop = sch.get(sch.get_loops(sch.get_sblock(update))[-3])
    assert reduce_loop.extent == 64  # the whole K loop sits inside the tile
    # The bias add runs on the tile: no root-level T_add block / full-size intermediate left.
    assert "T_add" not in names and "T.sblock_alloc_buffer((T.int64(64), T.int64(128)))" not in (
        func.script()
    )
    # Deterministic: the same trace every time.
    tvm.ir.assert_structural_equal(func, MatmulCPU().apply(linear_bias, TARGET, False).mod["main"])


def test_unrecognised_funcs_are_left_alone():
    rule = MatmulCPU()
    assert rule.apply(max_product, TARGET, False) is None
    x = te.placeholder((64, 64), name="x")
    assert rule.apply(te.create_prim_func([x, topi.exp(x)]), TARGET, False) is None
    # not an llvm target
    assert (
        rule.apply(linear_bias, tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), False) is None
    )


def _te_matmul(m, n, k, batch=0, trans_b=False, epilogue=False):
    a_shape = (batch, m, k) if batch else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    b_shape = (batch, *b_shape) if batch else b_shape
    a = te.placeholder(a_shape, name="A")
    b = te.placeholder(b_shape, name="B")
    if batch:
        c = topi.nn.batch_matmul(a, b, transpose_a=False, transpose_b=trans_b)
    else:
        c = topi.nn.matmul(a, b, transpose_b=trans_b)
    bias = te.placeholder((n,), name="bias")
    if epilogue:  # bias + SiLU + residual multiply
        y = topi.add(c, bias)
        c = topi.multiply(topi.multiply(y, topi.sigmoid(y)), c)
    return te.create_prim_func([a, b, bias, c]), a_shape, b_shape


@pytest.mark.parametrize(
    "m,n,k,batch,trans_b,epilogue",
    [
        (37, 50, 70, 0, False, True),
        (100, 64, 64, 0, True, False),
        (1024, 48, 33, 0, False, True),
        (64, 16, 64, 4, True, False),
        (5, 100, 17, 3, False, True),
    ],
)
def test_numerics_te(m, n, k, batch, trans_b, epilogue):
    func, a_shape, b_shape = _te_matmul(m, n, k, batch, trans_b, epilogue)
    sch = MatmulCPU().apply(func, TARGET, False)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=TARGET)
    rng = np.random.default_rng(0)
    a, b, bias = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape, (n,)))
    ref = a @ (np.swapaxes(b, -1, -2) if trans_b else b)
    if epilogue:
        y = ref + bias
        ref = y / (1 + np.exp(-y)) * ref
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.float32), dev)
    lib["main"](*[tvm.runtime.tensor(v, dev) for v in (a, b, bias)], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


def _relax_linear(batch, m, k, n, seed=0):
    """``gelu(x @ w + b) + x @ w`` with constant [N, K] weight, as torch.export writes Linear."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal((n,), dtype=np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            mm = bb.emit(relax.op.matmul(x, relax.op.permute_dims(relax.const(w))))
            y = bb.emit(relax.op.nn.gelu(relax.op.add(mm, relax.const(bias))))
            out = bb.emit_output(relax.op.add(y, mm))
        bb.emit_func_output(out)
    xs = rng.standard_normal((batch, m, k), dtype=np.float32)
    mm = xs @ w.T
    z = mm + bias
    from math import erf

    gelu = 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    return bb.get(), xs, (gelu + mm).astype(np.float32)


@pytest.mark.parametrize("batch,m", [(1, 1), (1, 37), (2, 50), (1, 1024)])
def test_pipeline_linear_gelu(batch, m):
    mod, x, ref = _relax_linear(batch, m, 40, 72)
    stats = Counter()
    mod = cpu_build_pipeline(TARGET, stats)(mod)
    assert stats["left alone"] == 0, stats
    if m > 1:
        assert stats["MatmulCPU"] == 1, stats
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _has_avx512(), reason="no avx512f in /proc/cpuinfo")
def test_inner_loop_uses_zmm_fma():
    func, _, _ = _te_matmul(256, 256, 256)
    lib = tvm.compile(MatmulCPU().apply(func, TARGET, False).mod, target=TARGET)
    mod = lib.mod if hasattr(lib.mod, "inspect_source") else lib.mod.imports[0]
    asm = mod.inspect_source("asm")
    assert len(re.findall(r"vfmadd\d+ps\s+(?:\(|-?\d*\(|%)[^\n]*%zmm", asm)) >= 12


def test_declined_small_transposed_bmm_still_correct_via_fallback():
    func, a_shape, b_shape = _te_matmul(3, 17, 5, batch=2, trans_b=True)
    assert MatmulCPU().apply(func, TARGET, False) is None  # m <= 4 with a [N, K] operand
    stats = Counter()
    mod = cpu_schedule_pass(TARGET, stats)(tvm.IRModule({"main": func}))
    assert stats["left alone"] == 0, stats
    rng = np.random.default_rng(1)
    a, b, bias = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape, (17,)))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((2, 3, 17), np.float32), dev)
    tvm.compile(mod, target=TARGET)["main"](
        *[tvm.runtime.tensor(v, dev) for v in (a, b, bias)], out
    )
    np.testing.assert_allclose(out.numpy(), a @ np.swapaxes(b, -1, -2), rtol=1e-5, atol=1e-5)


def _relax_linear_symbolic(k, n, seed=0):
    """``gelu(x @ w.T + b)`` with a symbolic token count ``m`` (a dynamic-shape model)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal((n,), dtype=np.float32)
    m = tirx.Var("m", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            mm = bb.emit(relax.op.matmul(x, relax.op.permute_dims(relax.const(w))))
            out = bb.emit_output(relax.op.nn.silu(relax.op.add(mm, relax.const(bias))))
        bb.emit_func_output(out)
    return bb.get(), w, bias


def test_symbolic_token_count_is_scheduled_and_correct():
    mod, w, bias = _relax_linear_symbolic(72, 80)
    stats = Counter()
    mod = cpu_build_pipeline(TARGET, stats)(mod)
    assert stats["MatmulCPU"] == 1 and stats["left alone"] == 0, stats
    (mm,) = [f for gv, f in mod.functions_items() if "matmul" in gv.name_hint]
    assert "T.parallel(" in mm.script() and "T.vectorized(" in mm.script()
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    rng = np.random.default_rng(3)
    for m in (1, 5, 6, 37, 100):  # below, at and off the 6-row register tile
        x = rng.standard_normal((2, m, 72), dtype=np.float32)
        z = x @ w.T + bias
        ref = z / (1 + np.exp(-z))
        out = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
