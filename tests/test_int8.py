"""INT8 post-training quantisation: qparams, calibration edge cases, tiny Llama end to end."""

import pathlib
import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from attnforge.target import host_target
from attnforge.quantization import (
    calibrate,
    check_int8_target,
    qparams_from_range,
    quantize_int8,
    site_names,
)

TARGET = host_target()


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@I.ir_module
class TwoLayers:
    @R.function
    def main(tokens: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32"),
             w2: R.Tensor((16, 8), "float32")):
        with R.dataflow():
            y = R.matmul(tokens, w)
            h = R.nn.relu(y)
            z = R.matmul(h, w2)
            R.output(z)
        return z


def _mod(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((8, 16)).astype(np.float32),
              "w2": rng.standard_normal((16, 8)).astype(np.float32)}
    return relax.transform.BindParams("main", params)(TwoLayers), params


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (0.0, 0.0, (1.0, 0)),             # all zeros: any scale works, 1.0 chosen
    (3.0, 3.0, (3.0 / 255, 0)),       # constant positive: range widened to contain 0
    (-2.0, -2.0, (2.0 / 255, 255)),   # constant negative
    (-1.0, 3.0, (4.0 / 255, 64)),
])
def test_qparams_from_range(lo, hi, expected):
    scale, zp = qparams_from_range(lo, hi)
    assert scale == pytest.approx(expected[0]) and zp == expected[1]
    if hi - lo > 0:  # both ends representable within one step
        for v in (lo, hi, 0.0):
            assert abs((np.clip(np.round(v / scale) + zp, 0, 255) - zp) * scale - v) <= scale


def test_calibrate_minmax_and_percentile():
    mod, p = _mod()
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((4, 8)).astype(np.float32),) for _ in range(3)]
    ranges = calibrate(mod, batches, TARGET)
    xs = np.stack([b[0] for b in batches])
    h = np.maximum(xs @ p["w"], 0)
    assert ranges[0] == pytest.approx((xs.min(), xs.max()), rel=1e-6)
    assert ranges[1] == pytest.approx((h.min(), h.max()), rel=1e-5)
    pct = calibrate(mod, batches, TARGET, method="percentile", percentile=90.0)
    assert ranges[0][0] < pct[0][0] < pct[0][1] < ranges[0][1]


def test_calibrate_degenerate_activations():
    mod, _ = _mod()
    zeros = calibrate(mod, [(np.zeros((4, 8), np.float32),)], TARGET)
    assert zeros == {0: (0.0, 0.0), 1: (0.0, 0.0)}
    assert qparams_from_range(*zeros[0]) == (1.0, 0)
    const = calibrate(mod, [(np.full((4, 8), 2.5, np.float32),)], TARGET)
    assert const[0] == (2.5, 2.5) and qparams_from_range(*const[0])[0] > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibrate_rejects_nan_inf_naming_input(bad):
    mod, _ = _mod()
    x = np.zeros((4, 8), np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"batch 1, input 'tokens': contains NaN or inf"):
        calibrate(mod, [(np.zeros((4, 8), np.float32),), (x,)], TARGET)


def test_calibrate_argument_errors():
    mod, _ = _mod()
    with pytest.raises(ValueError, match="empty"):
        calibrate(mod, [], TARGET)
    with pytest.raises(ValueError, match="method"):
        calibrate(mod, [(np.zeros((4, 8), np.float32),)], TARGET, method="kl")
    with pytest.raises(ValueError, match="has 2 inputs"):
        calibrate(mod, [(np.zeros((4, 8)), np.zeros(1))], TARGET)


def test_check_int8_target():
    from attnforge.errors import TargetError

    check_int8_target(TARGET, cpuinfo="flags: avx512f avx512_vnni")
    with pytest.raises(TargetError, match="VNNI"):
        check_int8_target(TARGET, cpuinfo="flags: avx2")
    check_int8_target(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))  # int8 WMMA
    with pytest.raises(TargetError, match="sm_75"):
        check_int8_target(tvm.target.Target({"kind": "cuda", "arch": "sm_70"}))


@pytest.fixture(scope="module")
def tiny_llama():
    from attnforge.frontends import import_torch_model
    from attnforge.passes import attention_pipeline

    from attnforge.models import build_hf_model

    model, inputs = build_hf_model("llama", hidden=128)
    mod = attention_pipeline(TARGET)(import_torch_model(model, inputs).mod)
    return model, inputs, relax.transform.FoldConstant()(mod)


def _vm(mod):
    from attnforge.schedules.cpu_schedule import cpu_build_pipeline

    mod = cpu_build_pipeline(TARGET)(mod)
    with tvm.transform.PassContext(opt_level=3):
        return relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())


@pytest.mark.skipif(not _has_vnni(), reason="no avx512_vnni in /proc/cpuinfo")
@pytest.mark.parametrize("options", [
    {"activations": "per_tensor"}, {},  # default: per token
    pytest.param({"activations": "per_tensor", "smooth_alpha": 0.5}, marks=pytest.mark.slow)])
def test_tiny_llama_end_to_end(tiny_llama, options):
    import torch

    from attnforge.accuracy import accuracy_metrics, held_out_inputs

    model, inputs, mod = tiny_llama
    names = site_names(model, mod)
    assert names[len(names) - 1] == "lm_head" and len(names) == 15
    calib = [held_out_inputs(inputs, seed=s) for s in range(4)]
    summary = {}
    qmod = quantize_int8(mod, calib, TARGET, exclude=["lm_head"], model=model, summary=summary,
                         **options)
    text = qmod.script(show_meta=False)
    assert text.count("R.call_tir(cls.int8_matmul_cpu") == 14  # every Linear but lm_head
    assert text.count("R.matmul(") == 1
    assert summary["embeddings"]["tables"] == [[1000, 128]]  # the token embedding, int8
    assert re.search(r'R.Tensor\(\(64, 128\), dtype="int8"\) = R.take\(', text)  # 64 ids
    rounding = [s["weight"]["rounding"] for s in summary["sites"] if "weight" in s]
    # 4 batches x 64 tokens: the fitting half has 128 rows, so K = 256 (down_proj) cannot
    # use GPTQ; a chosen GPTQ setting lowered the held-back batches' output error
    assert all(r["rounding"] == "nearest" for r in rounding[6::7])
    assert "K = 256" in rounding[6]["reason"]
    assert any(r["rounding"] == "gptq" for r in rounding)
    assert all(r["validation_error_vs_nearest"] < 1 for r in rounding if r["rounding"] == "gptq")
    vm = _vm(qmod)
    ref, got = [], []
    for s in range(100, 104):  # held out: not the calibration seeds
        xs = held_out_inputs(inputs, seed=s)
        with torch.no_grad():
            ref.append(model(*xs).logits.numpy())
        out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in xs])
        got.append((out[0] if not hasattr(out, "numpy") else out).numpy())
    metrics = accuracy_metrics([np.concatenate(ref)], [np.concatenate(got)], ["logits"])
    logits = metrics["outputs"][0]
    # measured on 8 held-out batches (GPTQ rounding + int8 embeddings, the defaults): cosine
    # 0.99990 / 0.99970 and top-1 0.969 / 0.959 (per token / per tensor)
    assert logits["cosine"] > 0.9995, metrics
    assert logits["top1_agreement"] > 0.93, metrics


def test_compile_model_int8_export_load(tmp_path):
    """compile_model(int8): report + manifest list the quantisation; a loaded artifact gives
    the same outputs as the model before export (bit for bit: same library)."""
    import json

    import attnforge
    from attnforge import compiler
    from attnforge.accuracy import held_out_inputs
    from attnforge.models import build_hf_model

    if not _has_vnni():
        pytest.skip("no avx512_vnni in /proc/cpuinfo")
    model, inputs = build_hf_model("llama", hidden=128)
    with pytest.raises(ValueError, match="calibration_data"):
        compiler.compile_model(model, inputs, precision="int8")
    calib = [held_out_inputs(inputs, seed=s) for s in range(4)]
    cm = compiler.compile_model(model, inputs, precision="int8", calibration_data=calib,
                                int8_options={"activations": "per_tensor"})
    assert cm.report["verification"]["passed"]
    assert cm.report["accuracy"]["min_cosine"] > 0.999
    q = cm.report["quantization"]
    assert q["calibration"] == {"method": "minmax", "batches": 4}
    assert q["excluded"] == [{"site": 14, "name": "lm_head"}]
    quantized = [s for s in q["sites"] if not s.get("excluded")]
    assert len(quantized) == 14 and quantized[0]["name"] == "model.layers.0.self_attn.q_proj"
    assert q["vnni_matmuls"] == 14
    assert q["embeddings"]["dtype"] == "int8" and q["weight_rounding"]["method"] == "gptq"
    act = quantized[0]["activation"]
    lo, hi = act["range"]
    assert act["scale"] == pytest.approx((hi - min(lo, 0)) / 255) and 0 <= act["zero_point"] <= 255
    w = quantized[0]["weight"]
    assert 0 < w["scale_min"] <= w["scale_mean"] <= w["scale_max"]

    path = cm.export(str(tmp_path / "llama_int8.afm"))
    manifest = json.loads((tmp_path / "llama_int8.afm" / "manifest.json").read_text())
    assert manifest["quantization"] == json.loads(json.dumps(q))
    loaded = attnforge.load(path)
    x = held_out_inputs(inputs, seed=77)[0].numpy()
    before, after = cm.run_flat(x), loaded.run_flat(x)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_compile_model_int8_bert_per_token():
    """BERT: biases after every Linear (the kernel must not be fused with them), no LM head
    (nothing excluded by default), per-token activations (the default)."""
    from attnforge import compiler
    from attnforge.accuracy import held_out_inputs
    from attnforge.models import build_hf_model

    if not _has_vnni():
        pytest.skip("no avx512_vnni in /proc/cpuinfo")
    model, inputs = build_hf_model("bert", hidden=64, seq_len=40, batch=2)
    calib = [held_out_inputs(inputs, seed=s) for s in range(2)]
    cm = compiler.compile_model(model, inputs, precision="int8", calibration_data=calib)
    q = cm.report["quantization"]
    assert q["excluded"] == [] and len(q["sites"]) == 12 and q["vnni_matmuls"] == 12
    assert {s["activation"]["scheme"] for s in q["sites"]} == {"asymmetric per token (dynamic)"}
    assert cm.report["verification"]["passed"]
    assert cm.report["accuracy"]["min_cosine"] > 0.999


def test_smooth_scales_formula_groups_and_zero_channels():
    from attnforge.passes.smooth_quant import SmoothQuant
    from attnforge.quantization import smooth_scales

    mod, p = _mod()
    absmax = {0: np.linspace(0.0, 7.0, 8).astype(np.float32), 1: np.full(16, 2.0, np.float32)}
    s = smooth_scales(mod, absmax, alpha=0.5)
    w0 = np.abs(p["w"]).max(axis=1)
    assert s[0][0] == 1.0  # a zero activation channel keeps s = 1
    np.testing.assert_allclose(s[0][1:], np.sqrt(absmax[0][1:]) / np.sqrt(w0[1:]), rtol=1e-6)
    assert set(smooth_scales(mod, absmax, sites={1})) == {1}
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(mod, absmax, alpha=1.5)
    # the smoothed module computes the same function in fp32
    rng = np.random.default_rng(5)
    xs = [(rng.standard_normal((4, 8)).astype(np.float32),) for _ in range(2)]
    smoothed = SmoothQuant({0: s[0]})(mod)
    r0, r1 = calibrate(mod, xs, TARGET), calibrate(smoothed, xs, TARGET)
    assert r0[1] == pytest.approx(r1[1], rel=1e-5)  # the next site's input is unchanged
    x_s = np.stack([b[0] for b in xs]) / s[0]
    assert r1[0] == pytest.approx((x_s.min(), x_s.max()), rel=1e-5)  # site 0 sees x / s


def test_weight_only_diagnostic_keeps_fp32_activations():
    mod, _ = _mod()
    rng = np.random.default_rng(4)
    calib = [(rng.standard_normal((4, 8)).astype(np.float32),)]
    summary = {}
    q = quantize_int8(mod, calib, TARGET, activations="none", summary=summary)
    text = q.script(show_meta=False)
    assert "R.quantize" not in text and text.count("R.dequantize") == 2 and "call_tir" not in text
    assert summary["sites"][0]["activation"]["dtype"] == "float32"
    assert summary["vnni_matmuls"] == 0
    with pytest.raises(ValueError, match="activations="):
        quantize_int8(mod, calib, TARGET, activations="dynamic")


def test_gptq_and_embedding_options_and_degenerate_calibration():
    """GPTQ with all-zero calibration (a zero Hessian) keeps round-to-nearest; one batch cannot
    validate GPTQ; NaN in a batch and bad option values are clear errors."""
    mod, _ = _mod()
    zeros = [(np.zeros((4, 8), np.float32),)] * 2
    summary = {}
    q = quantize_int8(mod, zeros, TARGET, summary=summary)
    assert summary["weight_rounding"]["method"] == "gptq"
    assert [s["weight"]["rounding"]["rounding"] for s in summary["sites"]] == ["nearest"] * 2
    assert "call_tir" in q.script(show_meta=False)
    one = {}
    quantize_int8(mod, zeros[:1], TARGET, summary=one)
    assert one["weight_rounding"]["method"].startswith("nearest (GPTQ needs >= 2")
    bad = np.ones((4, 8), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="calibration batch 1, input 'tokens': contains NaN"):
        quantize_int8(mod, [zeros[0], (bad,)], TARGET)
    with pytest.raises(ValueError, match="weight_rounding='awq'"):
        quantize_int8(mod, zeros, TARGET, weight_rounding="awq")
    with pytest.raises(ValueError, match="embeddings='int4'"):
        quantize_int8(mod, zeros, TARGET, embeddings="int4")
