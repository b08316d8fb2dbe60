"""fp32 vs bf16 vs int8 on the CPU: latency, weight / activation memory and accuracy, one run.

Models: random-weight HF Llama (GQA, LM head) and BERT built from configs
(``attnforge.models.build_hf_model``; default hidden 512, 2 layers, 8 heads, sequence 512,
batch 1). For each precision the model goes through ``attnforge.compile_model`` (llvm, this
CPU; int8 calibrated on 8 random-token batches, LM head kept fp32) and is compared with eager
fp32 PyTorch on 4 *other* random-token batches (held out). Measured:

* latency: median of interleaved rounds (each round 3 calls) of our compiled module per
  precision and of eager fp32 PyTorch (``torch.no_grad``), same inputs, same thread count;
* weight memory: bytes of ALL tensor constants in the module handed to ``tvm.compile``
  (``cm.report["weight_bytes"]``: int8 weights with their scale / offset vectors, int8
  embedding rows with their scales, fp32 norms, the RoPE tables folded at compile time,
  attention layouts), and for eager the bytes of the model's parameters; ``weight_memory``
  gives fp32 / int8 over all constants and over parameters only (the non-parameter constants,
  the same at every precision, subtracted); for int8 also the quantised linears alone;
* activation memory: peak RSS increase while running 3 inferences, measured in a fresh
  subprocess that first loads the exported artifact (``attnforge.load``) or builds the eager
  model, then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs, and reads
  ``VmHWM - VmRSS(before)``: inputs, outputs, intermediates and kernel workspaces;
* accuracy vs eager fp32: max / mean abs error, cosine; for Llama logits next-token top-1
  agreement and KL(eager || ours) (``attnforge.accuracy.accuracy_metrics``).

The "int8" row is the default (GPTQ rounding validated per layer, int8 embeddings, LM head
fp32, per-token activations). Extra int8 rows (accuracy, latency, weight memory): the LM head
int8 too; the previous default (round-to-nearest, fp32 embeddings); on that previous default,
per-tensor min-max, per-tensor percentile and per-token + SmoothQuant activations.
``int8_error_sources`` (Llama, :mod:`int8_error_sources`): the accuracy with one part quantised
at a time (weights only, activations only, each layer type, LM head, embedding), eager fake
quantisation with our quantisers, same held-out batches.

Linears part: the linear layers alone (one Llama layer's q/k/v/o/gate/up/down shapes,
M = sequence) compiled at fp32 and int8 through the same pipeline (int8 includes the
activation quantize op), plus torch fp32 ``nn.Linear``; the issue's ">= 2x" target is int8 vs
our fp32.

Run: ``TVM_NUM_THREADS=2 python benchmarks/precision_cpu.py [--rounds 5]``; writes
``benchmarks/results/precision_cpu.json`` (``--quick``: sequence 128, 1 round, no extra rows,
``precision_cpu_quick.json``). The machine is shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM uses ONE thread unless this is set
THREADS = int(os.environ["TVM_NUM_THREADS"])

import numpy as np  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "int8")
_PREVIOUS = {"weight_rounding": "nearest", "embeddings": "float32"}
# extra int8 configurations (accuracy and latency; weight memory): label -> compile_model kwargs
INT8_VARIANTS = {
    "int8 + LM head int8": {"int8_exclude": ()},
    "int8 round-to-nearest, fp32 embeddings (previous default)": {"int8_options": _PREVIOUS},
    # activation schemes, each against the row above (same weights: round-to-nearest, fp32
    # embeddings; also keeps GPTQ's compile time out of these three)
    "int8 per-tensor minmax (nearest, fp32 emb.)": {"int8_options": {
        "activations": "per_tensor", "method": "minmax", **_PREVIOUS}},
    "int8 per-tensor percentile 99.99 (nearest, fp32 emb.)": {"int8_options": {
        "activations": "per_tensor", "method": "percentile", **_PREVIOUS}},
    "int8 per-token + SmoothQuant 0.5 (nearest, fp32 emb.)": {"int8_options": {
        "activations": "per_token", "smooth_alpha": 0.5, **_PREVIOUS}},
}
BERT_VARIANTS = ("int8 round-to-nearest, fp32 embeddings (previous default)",)
CALIB_SEEDS = range(8)
HELD_OUT_SEEDS = range(100, 104)
TARGETS = {"linears_speedup": 2.0, "model_speedup": 1.5, "top1": 0.98, "cosine": 0.99,
           "weight_ratio": 4.0}


# ----------------------------------------------------------------------------- models
def build(name: str, hidden: int, seq: int, layers: int, init_range: float | None):
    from attnforge.models import build_hf_model

    model, inputs = build_hf_model(name, hidden=hidden, seq_len=seq, layers=layers,
                                   heads=max(hidden // 64, 1))
    if init_range is not None:  # sanity config: less flat logits than HF's default 0.02
        import torch

        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * init_range)
    return model, inputs


def linears_model(hidden: int, kv: int, inter: int):
    import torch

    class Linears(torch.nn.Module):
        """The seven projections of one Llama layer, each on its own input shape."""

        def __init__(self):
            super().__init__()
            shapes = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv),
                      "o": (hidden, hidden), "gate": (hidden, inter), "up": (hidden, inter),
                      "down": (inter, hidden)}
            self.names = list(shapes)
            for n, (i, o) in shapes.items():
                setattr(self, n, torch.nn.Linear(i, o, bias=False))

        def forward(self, x, y):
            return tuple(getattr(self, n)(y if n == "down" else x) for n in self.names)

    torch.manual_seed(0)
    return Linears().eval()


# ----------------------------------------------------------------------------- measuring
def eager_flat(model, xs) -> list[np.ndarray]:
    import torch
    from torch.utils import _pytree

    with torch.no_grad():
        out = model(*xs)
    return [t.numpy() for t in _pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def accuracy(model, cm, inputs, names) -> dict:
    from attnforge.accuracy import accuracy_metrics, held_out_inputs

    ref, got = [], []
    for s in HELD_OUT_SEEDS:
        xs = held_out_inputs(inputs, seed=s)
        ref.append(eager_flat(model, xs))
        got.append([np.asarray(o) for o in cm.run_flat(*[x.numpy() for x in xs])])
    cat = [np.concatenate([r[i] for r in ref]) for i in range(len(names))]
    cat_got = [np.concatenate([g[i] for g in got]) for i in range(len(names))]
    return accuracy_metrics(cat, cat_got, names)


def time_interleaved(fns: dict, rounds: int) -> dict:
    samples = {k: [] for k in fns}
    for fn in fns.values():  # warm up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            samples[k].append((time.perf_counter() - t0) / 3 * 1e3)
    return {k: round(float(np.median(v)), 3) for k, v in samples.items()}


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(spec: dict) -> dict:
    """In a fresh process: load / build, reset the peak-RSS counter, run 3 times, report."""
    inputs = [np.load(p) for p in spec["inputs"]]
    if spec["kind"] == "artifact":
        import attnforge

        cm = attnforge.load(spec["path"])
        run = lambda: cm.run_flat(*inputs)  # noqa: E731
    else:
        import torch

        torch.set_num_threads(THREADS)
        model, _ = build(spec["name"], spec["hidden"], spec["seq"], spec["layers"],
                         spec["init_range"])
        xs = [torch.from_numpy(x) for x in inputs]
        run = lambda: eager_flat(model, xs)  # noqa: E731
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    for _ in range(3):
        run()
    return {"peak_rss_delta_bytes": (_status_kib("VmHWM") - before) * 1024,
            "rss_before_bytes": before * 1024}


def measure_rss(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def quantized_weight_bytes(report: dict) -> dict:
    """fp32 vs int8 bytes of the quantised layers (int8 weight + fp32 scale + offset per N)."""
    sites = [s for s in report["quantization"]["sites"] if not s.get("excluded")]
    kn = [(s["weight_shape"][0], s["weight_shape"][1]) for s in sites]
    fp32 = sum(4 * k * n for k, n in kn)
    int8 = sum(k * n + 8 * n for k, n in kn)
    return {"layers": len(sites), "fp32_bytes": fp32, "int8_bytes": int8,
            "ratio": round(fp32 / int8, 3)}


def weight_memory(row: dict) -> dict:
    """All tensor constants of each built module (int8 weights, their scale / offset vectors,
    int8 embedding rows and scales, fp32 norms, RoPE tables, attention layouts) vs fp32, and
    the same without the constants that are not parameters (present at every precision)."""
    fp32 = row["precisions"]["float32"]["weight_bytes"]
    params = row["eager_fp32"]["weight_bytes"]
    extra = fp32 - params  # RoPE cos/sin folded at compile time, attention block layouts
    out = {"fp32_module_bytes": fp32, "eager_parameter_bytes": params,
           "non_parameter_constant_bytes": extra, "ratios": {}}
    for label, entry in row["precisions"].items():
        if label == "float32":
            continue
        b = entry["weight_bytes"]
        out["ratios"][label] = {"module_bytes": b,
                                "fp32_over_this_all_constants": round(fp32 / b, 3),
                                "fp32_over_this_parameters_only": round(params / (b - extra), 3)}
    return out


# ----------------------------------------------------------------------------- parts
def run_model(name: str, args, tmp: pathlib.Path) -> dict:
    import torch

    import attnforge
    from attnforge.accuracy import held_out_inputs

    model, inputs = build(name, args.hidden, args.seq, args.layers, args.init_range)
    calib = [held_out_inputs(inputs, seed=s) for s in CALIB_SEEDS]
    names = ["logits"] if name == "llama" else ["last_hidden_state"]
    row: dict = {"model": name, "hidden": args.hidden, "layers": args.layers, "seq": args.seq,
                 "batch": 1, "init_range": args.init_range or "HF default (0.02)",
                 "precisions": {}}
    cms = {}
    configs = [(p, p, {}) for p in PRECISIONS]
    configs += [(label, "int8", kw) for label, kw in INT8_VARIANTS.items()
                if not args.no_variants and (name == "llama" or label in BERT_VARIANTS)]
    for prec, precision, kw in configs:
        t0 = time.perf_counter()
        kw = {"calibration_data": calib, **kw} if precision == "int8" else {}
        cm = attnforge.compile_model(model, inputs, precision=precision, verify=False, **kw)
        entry = {"compile_s": round(time.perf_counter() - t0, 1),
                 "weight_bytes": cm.report["weight_bytes"],
                 "tuning_records_applied": bool(cm.report["tuning"].get("applied")),
                 "accuracy": accuracy(model, cm, inputs, names)["outputs"][0]}
        if precision == "int8":
            q = cm.report["quantization"]
            entry["activations"] = kw.get("int8_options", {}).get("activations", "per_token")
            entry["quantized_layers"] = quantized_weight_bytes(cm.report)
            entry["embeddings"] = q["embeddings"]
            entry["excluded"] = [e["name"] for e in q["excluded"]]
            entry["weight_rounding"] = {
                "method": q["weight_rounding"]["method"],
                "sites": {s["name"]: s["weight"]["rounding"] for s in q["sites"]
                          if "weight" in s}}
            entry["calibration"] = q["calibration"]
            entry["compile_timings_s"] = {k: round(v, 1) for k, v in
                                          cm.report["timings_s"].items()}
        cms[prec] = cm
        row["precisions"][prec] = entry
        print(name, prec, entry, flush=True)
    np_in = [x.numpy() for x in inputs]
    in_paths = []
    for i, x in enumerate(np_in):
        in_paths.append(str(tmp / f"{name}_in{i}.npy"))
        np.save(in_paths[-1], x)
    torch.set_num_threads(THREADS)
    fns = {prec: (lambda cm=cm: cm.run_flat(*np_in)) for prec, cm in cms.items()}
    fns["eager fp32"] = lambda: eager_flat(model, inputs)
    row["latency_ms"] = time_interleaved(fns, args.rounds)
    row["load_average"] = os.getloadavg()
    for prec, cm in cms.items():
        if prec not in PRECISIONS:
            continue
        path = cm.export(str(tmp / f"{name}_{prec}.afm"))
        row["precisions"][prec]["activation_memory"] = measure_rss(
            {"kind": "artifact", "path": path, "inputs": in_paths})
    row["eager_fp32"] = {
        "weight_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters())),
        "activation_memory": measure_rss(
            {"kind": "eager", "name": name, "hidden": args.hidden, "seq": args.seq,
             "layers": args.layers, "init_range": args.init_range, "inputs": in_paths})}
    row["weight_memory"] = weight_memory(row)
    if name == "llama" and not args.no_breakdown:
        from int8_error_sources import error_sources

        t0 = time.perf_counter()
        held = [held_out_inputs(inputs, seed=s) for s in HELD_OUT_SEEDS]
        row["int8_error_sources"] = error_sources(model, calib, held)
        row["int8_error_sources"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, "error sources", json.dumps(row["int8_error_sources"]), flush=True)
    lat = row["latency_ms"]
    row["int8_speedup_vs_fp32"] = round(lat["float32"] / lat["int8"], 2)
    row["bf16_speedup_vs_fp32"] = round(lat["float32"] / lat["bfloat16"], 2)
    print(name, "latency", lat, flush=True)
    return row


def run_linears(args) -> dict:
    import torch

    import attnforge

    hidden, seq = args.hidden, args.seq
    kv, inter = hidden // 2, hidden * 2  # build_hf_model's Llama: GQA 2:1, MLP 2x
    model = linears_model(hidden, kv, inter)
    g = torch.Generator().manual_seed(0)

    def batch():
        return (torch.randn(1, seq, hidden, generator=g), torch.randn(1, seq, inter, generator=g))

    inputs, calib = batch(), [batch() for _ in range(4)]
    # speed only: GPTQ changes the integer values, not the kernels, so round-to-nearest here
    # saves its compile time
    rtn = {"weight_rounding": "nearest"}
    cms = {"float32": attnforge.compile_model(model, inputs, verify=False),
           "int8": attnforge.compile_model(model, inputs, precision="int8", verify=False,
                                           calibration_data=calib, int8_exclude=(),
                                           int8_options=rtn),
           "int8 per-tensor": attnforge.compile_model(
               model, inputs, precision="int8", verify=False, calibration_data=calib,
               int8_exclude=(), int8_options={"activations": "per_tensor", **rtn})}
    np_in = [x.numpy() for x in inputs]
    fns = {k: (lambda cm=cm: cm.run_flat(*np_in)) for k, cm in cms.items()}
    torch.set_num_threads(THREADS)
    fns["torch fp32"] = lambda: eager_flat(model, inputs)
    lat = time_interleaved(fns, args.rounds)
    xs = batch()
    ref, got = eager_flat(model, xs), cms["int8"].run_flat(*[x.numpy() for x in xs])
    cos = min(float((r * o).sum() / np.linalg.norm(r) / np.linalg.norm(o))
              for r, o in zip(ref, got))
    flops = 2 * seq * (hidden * (2 * hidden + 2 * kv + 2 * inter) + inter * hidden)
    row = {"shapes": {"M": seq, "hidden": hidden, "kv": kv, "intermediate": inter},
           "latency_ms": lat, "gop_s": {k: round(flops / v / 1e6, 1) for k, v in lat.items()},
           "int8_speedup_vs_our_fp32": round(lat["float32"] / lat["int8"], 2),
           "int8_speedup_vs_torch_fp32": round(lat["torch fp32"] / lat["int8"], 2),
           "int8_per_tensor_speedup_vs_our_fp32": round(lat["float32"] / lat["int8 per-tensor"],
                                                        2),
           "int8_min_cosine_vs_fp32": round(cos, 6), "load_average": os.getloadavg()}
    print("linears", row, flush=True)
    return row


def targets(result: dict) -> dict:
    out = {}
    if result.get("linears"):
        v = result["linears"]["int8_speedup_vs_our_fp32"]
        out["int8 linears >= 2x our fp32"] = {"value": v, "met": v >= TARGETS["linears_speedup"]}
    for row in result["models"]:
        if row["model"] != "llama":
            continue
        acc = row["precisions"]["int8"]["accuracy"]
        q = row["precisions"]["int8"]["quantized_layers"]
        mem = row["weight_memory"]["ratios"]
        total = mem["int8"]["fp32_over_this_all_constants"]
        out.update({
            "llama int8 >= 1.5x fp32": {"value": row["int8_speedup_vs_fp32"],
                                        "met": row["int8_speedup_vs_fp32"] >= 1.5},
            "llama int8 top-1 >= 98%": {"value": acc["top1_agreement"],
                                        "met": acc["top1_agreement"] >= TARGETS["top1"]},
            "llama int8 cosine >= 0.99": {"value": acc["cosine"],
                                          "met": acc["cosine"] >= TARGETS["cosine"]},
            "weight memory 4x smaller (quantised layers incl. per-channel vectors, >= 3.9x)": {
                "value": q["ratio"], "met": q["ratio"] >= 3.9},
            "weight memory 4x smaller (whole module, all constants; default: int8 "
            "embeddings, LM head fp32)": {"value": total, "met": total >= 3.9},
        })
        lm8 = mem.get("int8 + LM head int8")
        if lm8:
            out["weight memory 4x smaller (whole module, all constants; LM head int8 too)"] = {
                "value": lm8["fp32_over_this_all_constants"],
                "parameters_only": lm8["fp32_over_this_parameters_only"],
                "met": lm8["fp32_over_this_all_constants"] >= 3.9}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--models", default="llama,bert")
    parser.add_argument("--init-range", type=float, default=None,
                        help="re-draw Linear/Embedding weights with this std (sanity config)")
    parser.add_argument("--no-linears", action="store_true")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the extra int8 configurations (per-tensor, SmoothQuant)")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the int8 error-source breakdown (int8_error_sources.py)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: sequence 128, 1 round, no variants / breakdown")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return
    if args.quick:
        args.seq, args.rounds, args.no_variants, args.no_breakdown = 128, 1, True, True
    import torch
    import tvm

    name = "precision_cpu.json" if args.init_range is None else (
        f"precision_cpu_init{args.init_range}.json")
    if args.quick:
        name = "precision_cpu_quick.json"
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / name)
    result = {"meta": {
        "command": "TVM_NUM_THREADS={} {} {}".format(
            THREADS, "python benchmarks/precision_cpu.py", " ".join(sys.argv[1:])).strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": THREADS, "rounds": args.rounds,
        "statistic": "median of interleaved rounds (3 calls each)",
        "tvm": tvm.__version__, "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "activation_memory": "peak RSS increase (VmHWM after reset - VmRSS) over 3 inferences "
                             "in a fresh process that loaded the artifact / built the model",
        "weight_memory": "bytes of ALL tensor constants in the module given to tvm.compile "
                         "(weights, scales, offsets, embedding scales, norms, RoPE tables, "
                         "attention layouts); eager: parameter bytes; per model "
                         "weight_memory.ratios: fp32 module / this module, and the same with "
                         "the non-parameter constants (fp32 module - eager parameters) "
                         "subtracted from both",
        "note": "latency is meaningful only on a quiet machine (see load averages)"}}
    with tempfile.TemporaryDirectory() as tmp:
        result["models"] = [run_model(m, args, pathlib.Path(tmp))
                            for m in args.models.split(",") if m]
    result["linears"] = None if args.no_linears else run_linears(args)
    result["targets"] = targets(result)
    result["meta"]["load_average_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
