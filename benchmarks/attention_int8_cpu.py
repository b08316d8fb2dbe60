"""INT8 QKᵀ fused attention (schedules/attention_cpu_int8qk.py) vs our fp32 kernel vs SDPA.

Speed: B=1, H=8, D=64, causal N=2048 and non-causal N=1024, interleaved medians (wall and
process CPU time).  Accuracy: max |O - O_ref| / max |O_ref| against float64 SDPA on fresh
N(0, 1) inputs, and on inputs whose K has a per-channel offset (8 x N(0, 1) per channel,
as trained LLM keys have) with and without K smoothing.  ``--e2e``: the random-weight HF Llama
(``attnforge.models.build_hf_model``: hidden 512, 2 layers, 8 heads, 4 kv heads,
sequence 512) compiled at precision="int8" with and without
``int8_options={"attention_qk": "int8"}``: latency and logits cosine / next-token top-1 vs
eager fp32 on 4 held-out batches.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/attention_int8_cpu.py [--quick] [--e2e]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from attention_cpu import bench_interleaved, cpu_model  # benchmarks/attention_cpu.py
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.attention_cpu_int8qk import fused_attention_cpu_int8qk
from attnforge.schedules.block_mask import MaskSpec

B, H, D = 1, 8, 64


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--e2e", action="store_true", help="also the HF Llama int8 model")
    p.add_argument("--repeat", type=int, default=9, help="timed runs per implementation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args()


def _kernel(gen, n, spec, target, **kw):
    f, bm = gen(batch=B, q_heads=H, kv_heads=H, q_len=n, kv_len=n, head_dim=D, mask=spec, **kw)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
    layout = [torch.from_numpy(a) for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    fn = lib["main"]

    def run(q, k, v, out):
        fn(q, k, v, *layout, out)
        return out

    return run, bm


def _sdpa64(q, k, v, causal):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


def _rel(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max())


def _cos(a, ref):
    return float(F.cosine_similarity(a.double().flatten(), ref.flatten(), dim=0))


def run_case(name, n, causal, target, repeat):
    spec = MaskSpec.causal() if causal else MaskSpec.full()
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    out8, out32 = torch.empty(B, H, n, D), torch.empty(B, H, n, D)
    int8, bm = _kernel(fused_attention_cpu_int8qk, n, spec, target)
    int8_raw, _ = _kernel(fused_attention_cpu_int8qk, n, spec, target, smooth_k=False)
    fp32, _ = _kernel(fused_attention_cpu, n, spec, target)
    fns = {"attnforge int8 QK^T (smoothed K), fp32 PV": lambda: int8(q, k, v, out8),
           "attnforge fp32": lambda: fp32(q, k, v, out32)}
    # TVM's and torch's thread pools each spin after a call: the run right after a switch pays
    # for the other pool, so ours are interleaved with each other and SDPA is timed apart.
    times = bench_interleaved(fns, repeat)
    times["SDPA eager fp32"] = bench_interleaved(
        {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)},
        repeat)["sdpa"]
    rows = [dict(impl=i, case=name, **t) for i, t in times.items()]
    gflop = 4.0 * bm.visited_elements() * H * B * D / 1e9
    for r in rows:
        r.update(time_over_int8=r["ms"] / rows[0]["ms"], cpu_over_int8=r["cpu_ms"] /
                 rows[0]["cpu_ms"], gflops_visited=gflop / (r["ms"] / 1e3))
    acc = {}
    for label, kk in (("N(0,1) inputs", k),
                      ("K + 8 x N(0,1) per-channel offset", k + 8 * torch.randn(D))):
        ref = _sdpa64(q, kk, v, causal)
        acc[label] = {"int8 QK smoothed": _rel(int8(q, kk, v, out8), ref),
                      "int8 QK smoothed, cosine": _cos(out8, ref),
                      "int8 QK not smoothed": _rel(int8_raw(q, kk, v, torch.empty_like(out8)),
                                                   ref),
                      "fp32": _rel(fp32(q, kk, v, out32), ref),
                      "SDPA fp32": _rel(F.scaled_dot_product_attention(q, kk, v,
                                                                       is_causal=causal), ref)}
    print(f"  {name}: int8 {rows[0]['ms']:.1f} ms, fp32 {rows[1]['ms']:.1f} ms, "
          f"SDPA {rows[2]['ms']:.1f} ms; errors {json.dumps(acc)}", flush=True)
    return rows, {"case": name, "n": n, "mask": spec.describe(), "visited_gflop": gflop,
                  "max_rel_err_vs_float64": acc}


def run_e2e(quick, repeat):
    """HF Llama at precision int8, attention QK^T fp32 vs int8: latency and accuracy."""
    from attnforge import compiler
    from attnforge.accuracy import accuracy_metrics, held_out_inputs
    from attnforge.models import build_hf_model

    hidden, seq = (128, 128) if quick else (512, 512)
    model, inputs = build_hf_model("llama", hidden=hidden, heads=8, seq_len=seq)
    calib = [held_out_inputs(inputs, seed=s) for s in range(4)]
    evals = [held_out_inputs(inputs, seed=s) for s in range(100, 104)]
    with torch.no_grad():
        ref = np.concatenate([model(*xs).logits.numpy() for xs in evals])
    rows, fns = [], {}
    for qk in ("float32", "int8"):
        t0 = time.perf_counter()
        cm = compiler.compile_model(model, inputs, precision="int8", calibration_data=calib,
                                    int8_options={"attention_qk": qk}, verify=False)
        build_s = time.perf_counter() - t0
        got = np.concatenate([cm.run_flat(xs[0].numpy())[0] for xs in evals])
        m = accuracy_metrics([ref], [got], ["logits"])["outputs"][0]
        x = inputs[0].numpy()
        fns[qk] = (lambda c: lambda: c.run_flat(x))(cm)
        rows.append({"attention_qk": qk, "compile_s": build_s, "cosine": m["cosine"],
                     "top1_agreement": m.get("top1_agreement"), "kl": m.get("kl_divergence"),
                     "int8_sites": cm.report["quantization"]["attention_qk"]["int8_sites"]})
    times = bench_interleaved(fns, repeat)
    for r in rows:
        r.update(times[r["attention_qk"]])
    print(f"  llama h{hidden} s{seq}: {json.dumps(rows)}", flush=True)
    return {"model": f"llama hidden {hidden}, 2 layers, 8 heads, seq {seq}, batch 1",
            "rows": rows}


def main(args):
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    target = default_cpu_target()
    load_before = os.getloadavg()
    cases = [("causal N=256", 256, True)] if args.quick else [
        ("causal N=2048", 2048, True), ("full N=1024", 1024, False)]
    rows, metas = [], []
    for name, n, causal in cases:
        r, m = run_case(name, n, causal, target, args.repeat)
        rows += r
        metas.append(m)
    e2e = run_e2e(args.quick, args.repeat) if args.e2e else None
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "target": str(target), "threads": args.threads,
        "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
        "command": " ".join([f"TVM_NUM_THREADS={args.threads}", "python"] + sys.argv),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "quick": args.quick,
        "config": {"batch": B, "heads": H, "head_dim": D, "block_q": 64, "block_kv": 64},
        "cases": metas, "results": rows, "e2e": e2e}
    load = max(load_before[0], result["loadavg_after"][0])
    if load > 1.5 * (os.cpu_count() or 1):
        result["note"] = (f"shared host under load (1-min load average up to {load:.1f}): "
                          "compare cpu_ms (process CPU time) rather than wall ms")
        print(result["note"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "attention_int8_cpu_quick.json" if args.quick else "attention_int8_cpu.json"
    (out / name).write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main(_parse())
