"""LowerAttentionToTIR + attention_report: structure, unlowered targets, exact semantics.

Numerics compare the lowered module against the *original* module, both built on llvm, so
every mask/empty-row rule is checked against what the graph computed before fusion.
"""

import math

import numpy as np
import pytest
import tvm
from attnforge.passes import (
    AnalyzeAttentionMask,
    FuseAttention,
    LowerAttentionToTIR,
    attention_pipeline,
    attention_report,
)
from attnforge.schedules.block_mask import MaskSpec
from tvm import relax

LLVM = tvm.target.Target({"kind": "llvm"})
FMIN = float(np.finfo(np.float32).min)


def _module(nq=24, nk=24, h=4, hkv=4, d=8, mask=None, fill=-math.inf, invert=False,
            additive=False, safe=False, fold3d=False, mask_param=None):
    """Hand-written attention; ``mask``: constant array, or None; ``mask_param``: a shape."""
    bb = relax.BlockBuilder()
    lead = [2 * h] if fold3d else [2, h]
    lead_kv = [2 * hkv] if fold3d else [2, hkv]
    q = relax.Var("q", relax.TensorType(lead + [nq, d], "float32"))
    k = relax.Var("k", relax.TensorType(lead_kv + [nk, d], "float32"))
    v = relax.Var("v", relax.TensorType(lead_kv + [nk, d], "float32"))
    params = [q, k, v]
    if mask_param is not None:
        params.append(relax.Var("m", relax.TensorType(mask_param[0], mask_param[1])))
    with bb.function("main", params):
        with bb.dataflow():
            kk, vv = k, v
            if hkv != h:
                g = h // hkv
                kk, vv = (bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(
                    bb.emit(relax.op.expand_dims(t, [2])), [2, hkv, g, nk, d])),
                    [2, h, nk, d])) for t in (k, v))
            axes = [0, 2, 1] if fold3d else [0, 1, 3, 2]
            s = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(kk, axes))))
            s = bb.emit(relax.op.divide(s, relax.const(math.sqrt(d), "float32")))
            m = params[3] if mask_param is not None else (
                None if mask is None else relax.const(mask))
            if m is not None and additive:
                s = bb.emit(relax.op.add(s, m))
            elif m is not None:
                f = relax.const(fill, "float32")
                s = bb.emit(relax.op.where(m, f, s) if invert else relax.op.where(m, s, f))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            if safe:
                e = bb.emit(relax.op.equal(s, relax.const(-math.inf, "float32")))
                x = bb.emit(relax.op.astype(bb.emit(relax.op.logical_not(e)), "int8"))
                x = bb.emit(relax.op.max(x, axis=[-1], keepdims=True))
                x = bb.emit(relax.op.logical_not(bb.emit(relax.op.astype(x, "bool"))))
                z = bb.emit(relax.op.full_like(p, relax.const(0.0, "float32")))
                p = bb.emit(relax.op.where(x, z, p))
            out = bb.emit_output(relax.op.matmul(p, vv))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, args):
    vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _inputs(mod, rng, extra=None):
    ps = mod["main"].params
    args = [rng.standard_normal([int(s) for s in p.ty.shape.values]).astype("float32")
            for p in ps[:3]]
    return args + ([extra] if extra is not None else [])


def _check_same(mod, extra=None, block=8, spec_kind=None):
    rng = np.random.default_rng(0)
    args = _inputs(mod, rng, extra)
    want = _run(mod, args)
    lowered = attention_pipeline(LLVM, block_q=block, block_kv=block)(mod)
    rep = attention_report(lowered)
    assert len(rep) == 1 and rep[0]["lowered_to"] == "attnforge.fused_attention_cpu", rep
    if spec_kind is not None:
        assert rep[0]["mask"].startswith(spec_kind), rep[0]
    got = _run(lowered, args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    return rep[0]


def test_lowered_structure_and_report():
    mod = _module(mask=MaskSpec.causal().dense(24, 24)[0])
    lowered = attention_pipeline(LLVM, block_q=8, block_kv=8)(mod)
    names = sorted(gv.name_hint for gv, _ in lowered.functions_items())
    assert names == ["fused_attention_cpu", "main"]
    ops = [b.value.op.name for b in lowered["main"].body.blocks[0].bindings
           if isinstance(b.value.op, tvm.ir.Op)]
    assert ops == ["relax.call_tir"]
    (e,) = attention_report(lowered)
    assert e["mask"] == "causal" and e["block"] == [8, 8] and e["gqa_groups"] == 1
    assert e["shape"]["q_len"] == 24 and abs(e["scale"] - 1 / math.sqrt(8)) < 1e-7
    assert e["visited_fraction"] == pytest.approx(6 / 9)


def test_cuda_target_stays_fused_with_reason():
    mod = AnalyzeAttentionMask()(FuseAttention()(_module()))
    out = LowerAttentionToTIR(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))(mod)
    tvm.ir.assert_structural_equal(out.without_attr("attnforge.attention_sites"), mod)
    (e,) = attention_report(out)
    assert e["lowered_to"] is None and "cuda" in e["reason"]


def test_report_before_lowering():
    (e,) = attention_report(FuseAttention()(_module()))
    assert e["lowered_to"] is None and e["reason"] == "not lowered yet"


@pytest.mark.parametrize("kw,kind", [
    ({}, "full"),
    ({"mask": MaskSpec.sliding_window(5).dense(24, 24)[0]}, "sliding_window"),
    ({"nq": 16, "mask": MaskSpec.causal(q_offset=8).dense(16, 24)[0]}, "causal (bottom-right)"),
    ({"mask": MaskSpec.chunked(8).dense(24, 24)[0]}, "chunked"),
    ({"hkv": 2, "mask": MaskSpec.causal().dense(24, 24)[0], "invert": False}, "causal"),
    ({"hkv": 1, "mask": ~MaskSpec.causal().dense(24, 24)[0], "invert": True}, "causal"),
    ({"fold3d": True, "mask": MaskSpec.causal().dense(24, 24)[0]}, "causal"),
])
def test_structured_numerics(kw, kind):
    _check_same(_module(**kw), spec_kind=kind)


def test_static_block_sparse_numerics():
    keep = np.kron(np.random.default_rng(1).random((3, 3)) < 0.5, np.ones((8, 8), bool))
    keep[np.arange(24), np.arange(24)] = True
    e = _check_same(_module(mask=keep), spec_kind="static")
    assert e["visited_fraction"] < 1.0


def test_fully_masked_rows_keep_their_semantics():
    keep = MaskSpec.causal().dense(24, 24)[0].copy()
    keep[5] = False
    _check_same(_module(mask=keep))  # -inf: NaN row
    _check_same(_module(mask=keep, safe=True))  # SDPA safe softmax: zero row
    e = _check_same(_module(mask=keep, fill=FMIN))  # finfo.min: uniform row
    assert e["mask_input"] == "additive"
    add = np.where(keep, 0.0, FMIN).astype("float32")
    _check_same(_module(mask=add, additive=True))


def test_dynamic_masks_numerics():
    rng = np.random.default_rng(2)
    pad = rng.random((2, 1, 1, 24)) < 0.8
    e = _check_same(_module(mask_param=([2, 1, 1, 24], "bool")), extra=pad)
    assert e["mask"] == "dense data-dependent" and e["mask_input"] == "bool"
    _check_same(_module(mask_param=([2, 1, 1, 24], "bool"), invert=True, fill=FMIN),
                extra=~pad)
    add = np.where(pad, 0.0, FMIN).astype("float32")
    e = _check_same(_module(mask_param=([2, 1, 1, 24], "float32"), additive=True), extra=add)
    assert e["mask_input"] == "additive"
    _check_same(_module(fold3d=True, mask_param=([8, 24, 24], "bool")),
                extra=rng.random((8, 24, 24)) < 0.7)


def test_two_kernel_variants_build_together():
    """Different masks -> two kernels with distinct symbols, one module."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([1, 2, 24, 8], "float32"))
    with bb.function("main", [q]):
        with bb.dataflow():
            outs = []
            for spec in (MaskSpec.causal(), MaskSpec.sliding_window(3)):
                s = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(q, [0, 1, 3, 2]))))
                s = bb.emit(relax.op.where(relax.const(spec.dense(24, 24)[0]), s,
                                           relax.const(-math.inf, "float32")))
                outs.append(bb.emit(relax.op.matmul(bb.emit(relax.op.nn.softmax(s)), q)))
            out = bb.emit_output(relax.op.add(*outs))
        bb.emit_func_output(out)
    mod = bb.get()
    lowered = attention_pipeline(LLVM, block_q=8, block_kv=8)(mod)
    kernels = [gv for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 2
    x = np.random.default_rng(0).standard_normal((1, 2, 24, 8)).astype("float32")
    np.testing.assert_allclose(_run(lowered, [x]), _run(mod, [x]), rtol=1e-5, atol=1e-5)


def test_kernel_rejection_leaves_site_fused_with_reason():
    mod = _module()
    out = attention_pipeline(LLVM, block_q=8, block_kv=6)(mod)  # kv block not a multiple of 4
    (e,) = attention_report(out)
    assert e["lowered_to"] is None and "block_kv" in e["reason"]
    assert [gv.name_hint for gv, _ in out.functions_items() if gv.name_hint != "main"] == [
        "attention"]
    x = _inputs(mod, np.random.default_rng(0))
    np.testing.assert_allclose(_run(out, x), _run(mod, x), rtol=1e-6)  # still runs as before
