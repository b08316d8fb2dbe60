"""Model table on this CPU: every built-in HF architecture compiled by attnforge vs eager PyTorch.

For each model x attention implementation x batch: max rel./abs. error against eager fp32 on
fresh inputs, attention sites fused, and (for the timing configs) latency of attnforge vs
eager and ``torch.compile``.  Writes ``benchmarks/results/models_cpu.json``.

    TVM_NUM_THREADS=2 python benchmarks/models_cpu.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import attnforge
from attnforge.models import BUILTIN_MODELS, build_hf_model


def median_ms(fn, repeat=5, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def accuracy_table(batches=(1, 2)) -> list[dict]:
    rows = []
    for name in BUILTIN_MODELS:
        for impl in ("eager", "sdpa"):
            for batch in batches:
                seq = 128 if name == "mistral" else 64
                model, inputs = build_hf_model(name, batch=batch, seq_len=seq,
                                               attn_implementation=impl)
                t0 = time.perf_counter()
                cm = attnforge.compile_model(model, inputs)
                compile_s = time.perf_counter() - t0
                g = torch.Generator().manual_seed(123)
                fresh = tuple(torch.randint(0, 1000, x.shape, generator=g)
                              if x.dtype == torch.int64 else torch.randn(x.shape, generator=g)
                              for x in inputs)
                with torch.no_grad():
                    ref = model(*fresh)[0]
                got = cm(*fresh)[0]
                abs_err = float((got - ref).abs().max())
                sites = cm.report["attention"]
                rows.append({
                    "model": name, "attn_implementation": impl, "batch": batch, "seq_len": seq,
                    "max_abs_err": abs_err, "max_rel_err": abs_err / float(ref.abs().max()),
                    "attention_sites": len(sites),
                    "fused": sum(s.get("lowered_to") is not None for s in sites),
                    "masks": sorted({s.get("mask") for s in sites}),
                    "compile_s": compile_s,
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def timing(name: str, seq_len: int, hidden: int, layers: int, heads: int) -> dict:
    model, inputs = build_hf_model(name, seq_len=seq_len, hidden=hidden, layers=layers,
                                   heads=heads)
    cm = attnforge.compile_model(model, inputs)
    np_in = [x.numpy() for x in inputs]
    with torch.no_grad():
        eager = median_ms(lambda: model(*inputs))
        compiled = torch.compile(model)
        compiled(*inputs)
        tc = median_ms(lambda: compiled(*inputs))
    ours = median_ms(lambda: cm.run_flat(*np_in))
    return {"model": name, "seq_len": seq_len, "hidden": hidden, "layers": layers,
            "heads": heads, "eager_ms": eager, "torch_compile_ms": tc, "attnforge_ms": ours,
            "speedup_vs_eager": eager / ours, "speedup_vs_torch_compile": tc / ours,
            "visited_fraction": [s.get("visited_fraction") for s in cm.report["attention"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 2 only, small timing config")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
        "threads": threads, "torch": torch.__version__, "tvm": __import__("tvm").__version__,
        "accuracy": accuracy_table((2,) if args.quick else (1, 2)),
        "timing": [timing("llama", 256 if args.quick else 1024, 512, 2, 8)]
        + ([] if args.quick else [timing("gpt2", 256, 256, 4, 4)]),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "models_cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("| model | impl | batch | max rel err | sites fused | masks |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["accuracy"]:
        print(f"| {r['model']} | {r['attn_implementation']} | {r['batch']} | "
              f"{r['max_rel_err']:.1e} | {r['fused']}/{r['attention_sites']} | "
              f"{', '.join(r['masks'])} |")
    print("\n| model | seq | eager ms | torch.compile ms | attnforge ms | vs eager | vs compile |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["timing"]:
        print(f"| {r['model']} h{r['hidden']} L{r['layers']} | {r['seq_len']} | "
              f"{r['eager_ms']:.1f} | {r['torch_compile_ms']:.1f} | {r['attnforge_ms']:.1f} | "
              f"{r['speedup_vs_eager']:.2f}x | {r['speedup_vs_torch_compile']:.2f}x |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
