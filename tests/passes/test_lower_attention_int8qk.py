"""LowerAttentionToTIR(attention_qk="int8"): the int8-QKᵀ kernel as the callee.

Before: a hand-written causal attention after FuseAttention + AnalyzeAttentionMask.
Expected (built by hand): ``main`` calling ``fused_attention_cpu_int8qk`` with the same
operands and block-layout constants as the fp32 lowering.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from attnforge.passes import AnalyzeAttentionMask, FuseAttention, LowerAttentionToTIR
from attnforge.passes._attention_ir import M_SITES
from attnforge.passes._attention_qk import split_attention_qk
from attnforge.schedules.attention_cpu import default_cpu_target
from attnforge.schedules.attention_cpu_int8qk import QK_ATTR, fused_attention_cpu_int8qk
from attnforge.schedules.block_mask import MaskSpec
from tvm import relax

VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})  # kernels are only built here


def _before(h=4, hkv=4, n=24, d=8, causal=True, fold3d=False):
    """softmax(q kᵀ / sqrt(d) [+ causal]) v, GQA by broadcast, then the attention passes."""
    bb = relax.BlockBuilder()
    lead, lead_kv = ([2 * h], [2 * hkv]) if fold3d else ([2, h], [2, hkv])
    q = relax.Var("q", relax.TensorType(lead + [n, d], "float32"))
    k = relax.Var("k", relax.TensorType(lead_kv + [n, d], "float32"))
    v = relax.Var("v", relax.TensorType(lead_kv + [n, d], "float32"))
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            kk, vv = k, v
            if hkv != h:
                kk, vv = (bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(
                    bb.emit(relax.op.expand_dims(t, [2])), [2, hkv, h // hkv, n, d])),
                    [2, h, n, d])) for t in (k, v))
            axes = [0, 2, 1] if fold3d else [0, 1, 3, 2]
            s = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(kk, axes))))
            s = bb.emit(relax.op.divide(s, relax.const(math.sqrt(d), "float32")))
            if causal:
                m = relax.const(np.tril(np.ones((n, n), bool)))
                s = bb.emit(relax.op.where(m, s, relax.const(-math.inf, "float32")))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            out = bb.emit_output(relax.op.matmul(p, vv))
        bb.emit_func_output(out)
    return AnalyzeAttentionMask()(FuseAttention()(bb.get()))


def _expected(before, n=24, d=8):
    ps = before["main"].params
    scale = float(before["attention"].attrs["attnforge.scale"])  # 1 / fp32(sqrt(d))
    prim, bm = fused_attention_cpu_int8qk(2, 4, 4, n, n, d, scale=scale,
                                          mask=MaskSpec.causal(), empty_rows="nan")
    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(p.name, p.ty) for p in ps)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            gv = bb.add_func(prim, "fused_attention_cpu_int8qk")
            consts = [relax.const(np.ascontiguousarray(a, dtype="int32"))
                      for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
            out = bb.emit_output(relax.call_tir(gv, relax.Tuple([q, k, v, *consts]),
                                                out_ty=relax.TensorType([2, 4, n, d], "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _strip(mod):
    return tvm.IRModule({gv: f for gv, f in mod.functions_items()})


def test_before_expected_int8_kernel_is_the_callee():
    before = _before()
    after = LowerAttentionToTIR(VNNI, attention_qk="int8")(before)
    tvm.ir.assert_structural_equal(_strip(after), _expected(before))
    (site,) = after.attrs[M_SITES]
    assert str(site["attention_qk"]) == "int8" and site["attention_qk_note"] is None


def test_default_float32_is_a_no_op():
    before = _before()
    default = LowerAttentionToTIR(VNNI)(before)
    same = LowerAttentionToTIR(VNNI, attention_qk="float32")(before)
    tvm.ir.assert_structural_equal(default, same)
    assert "attention_qk" not in dict(default.attrs[M_SITES][0])  # default report unchanged
    assert not any(QK_ATTR in (f.attrs or {}) for _, f in default.functions_items())


def test_rejected_site_keeps_fp32_kernel_with_reason():
    after = LowerAttentionToTIR(VNNI, block_q=40, attention_qk="int8")(_before())
    (site,) = after.attrs[M_SITES]
    assert str(site["attention_qk"]) == "float32" and "multiple of 16" in str(
        site["attention_qk_note"])
    assert str(site["lowered_to"]) == "attnforge.fused_attention_cpu"
    assert [gv.name_hint for gv in after.get_global_vars()] == ["fused_attention_cpu", "main"]


def test_bad_option_and_targets_raise_naming_the_argument():
    with pytest.raises(ValueError, match="attention_qk='fp8'"):
        LowerAttentionToTIR(VNNI, attention_qk="fp8")(_before())
    with pytest.raises(ValueError, match="VNNI"):  # generic llvm: LLVM would abort on vpdpbusd
        LowerAttentionToTIR(tvm.target.Target({"kind": "llvm"}), attention_qk="int8")(_before())
    with pytest.raises(ValueError, match="llvm"):
        LowerAttentionToTIR(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}),
                            attention_qk="int8")(_before())
    assert split_attention_qk("int8", VNNI, {"attention_qk": "int8", "activations": "x"}) == (
        {"activations": "x"}, "int8")
    assert split_attention_qk("float32", VNNI, None) == ({}, "float32")
    with pytest.raises(ValueError, match="precision='int8' only"):
        split_attention_qk("bfloat16", VNNI, {"attention_qk": "int8"})
    with pytest.raises(ValueError, match=r"int8_options\['attention_qk'\]"):
        split_attention_qk("int8", VNNI, {"attention_qk": "int4"})


@pytest.mark.skipif("avx512_vnni" not in open("/proc/cpuinfo").read(), reason="no VNNI here")
@pytest.mark.parametrize("kw", [{}, {"h": 4, "hkv": 2, "n": 90, "d": 64},
                                {"fold3d": True, "causal": False, "n": 70, "d": 32}],
                         ids=["causal", "gqa-90", "bnd-full-70"])
def test_lowered_numerics_vs_unlowered_graph(kw):
    """The int8-QK module against the original graph (both built for this CPU)."""
    before = _before(**kw)
    after = LowerAttentionToTIR(default_cpu_target(), attention_qk="int8")(before)
    assert str(after.attrs[M_SITES][0]["attention_qk"]) == "int8"
    rng = np.random.default_rng(7)
    args = [rng.standard_normal([int(s) for s in p.ty.shape.values]).astype("float32")
            for p in before["main"].params]

    def run(mod):
        ex = tvm.compile(mod, default_cpu_target())
        vm = relax.VirtualMachine(ex, tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()

    ref, got = run(before), run(after)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-5 < err < 3e-2, err  # int8 rounding is visible but bounded


def test_attention_qk_summary_counts_sites_and_says_when_none_got_it():
    from attnforge.passes._attention_qk import attention_qk_summary

    sites = [{"site": 0, "lowered_to": "k", "attention_qk": "int8", "attention_qk_note": None},
             {"site": 1, "lowered_to": "k", "attention_qk": "float32",
              "attention_qk_note": "score_mod"},
             {"site": 2, "lowered_to": None, "fused": False}]
    out = attention_qk_summary(sites, "int8")
    assert (out["int8_sites"], out["float32_sites"], out["notes"]) == ([0], [1], {1: "score_mod"})
    assert "note" not in out
    assert "no attention site" in attention_qk_summary(sites[1:], "int8")["note"]
    assert attention_qk_summary(sites, "float32") == {"mode": "float32", "int8_sites": [0],
                                                      "float32_sites": [1]}
