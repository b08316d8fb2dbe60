"""INT8 post-training quantisation: qparams, calibration edge cases, tiny Llama end to end."""

import pathlib

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
    with pytest.raises(TargetError, match="llvm"):
        check_int8_target(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))


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
def test_tiny_llama_end_to_end(tiny_llama):
    import torch

    from attnforge.accuracy import accuracy_metrics, held_out_inputs

    model, inputs, mod = tiny_llama
    names = site_names(model, mod)
    assert names[len(names) - 1] == "lm_head" and len(names) == 15
    calib = [held_out_inputs(inputs, seed=s) for s in range(4)]
    qmod = quantize_int8(mod, calib, TARGET, exclude=["lm_head"], model=model)
    text = qmod.script(show_meta=False)
    assert text.count("R.call_tir(cls.int8_matmul_cpu") == 14  # every Linear but lm_head
    assert text.count("R.matmul(") == 1
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
    assert logits["cosine"] > 0.999, metrics
    assert logits["top1_agreement"] > 0.9, metrics


def test_compile_model_int8_when_wired():
    from attnforge import compiler
    from attnforge.accuracy import held_out_inputs
    from attnforge.models import build_hf_model

    if "int8" not in compiler.PRECISIONS:
        pytest.skip("compile_model(precision='int8') is not wired yet")
    if not _has_vnni():
        pytest.skip("no avx512_vnni in /proc/cpuinfo")
    model, inputs = build_hf_model("llama", hidden=128)
    with pytest.raises(ValueError, match="calibration_data"):
        compiler.compile_model(model, inputs, precision="int8")
    calib = [held_out_inputs(inputs, seed=s) for s in range(4)]
    cm = compiler.compile_model(model, inputs, precision="int8", calibration_data=calib)
    assert cm.report["verification"]["passed"]
    assert cm.report["accuracy"]["min_cosine"] > 0.999
