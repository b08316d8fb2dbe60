"""A whole HF model compiled once for a symbolic sequence length vs per-length static builds.

Llama config (hidden 512, 2 layers, 8 heads / 4 kv heads, fp32, batch 1), random weights.
``compile_model(..., dynamic_shapes=...)`` with ``seq`` in [2, 2048] is compiled ONCE and run
at N = 100, 256, 512; each N is also compiled statically, and eager PyTorch runs the same
inputs. Every output is checked against eager (rel. error). Min and median of ``--repeat``
runs per variant, variants one after another (no interleaving of TVM and torch thread pools).

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/dynamic_model_cpu.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

import attnforge
from attnforge.models import build_hf_model


def timed(fn, repeat: int) -> dict:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"min_ms": round(min(ts) * 1e3, 2), "median_ms": round(float(np.median(ts)) * 1e3, 2)}


def rel_err(out, ref) -> float:
    out, ref = out.logits.double(), ref.logits.double()
    return float((out - ref).abs().max() / ref.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    load_before = os.getloadavg()
    model, inputs = build_hf_model("llama", batch=1, seq_len=256, hidden=512, heads=8, layers=2)
    seq = Dim("seq", min=2, max=2048)
    t0 = time.perf_counter()
    dyn = attnforge.compile_model(model, inputs, target="llvm", tuning_logs=False,
                                  dynamic_shapes=tuple({1: seq} for _ in inputs))
    rows = {"dynamic_compile_s": round(time.perf_counter() - t0, 1),
            "dynamic_schedules": dyn.report["schedules"], "lengths": {}}
    gen = torch.Generator().manual_seed(7)
    for n in (100, 256, 512):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
        xs = (ids,) + tuple(torch.ones(1, n, dtype=x.dtype) for x in inputs[1:])
        static = attnforge.compile_model(model, xs, target="llvm", tuning_logs=False)
        with torch.no_grad():
            ref = model(*xs)
            row = {"static": timed(lambda: static(*xs), args.repeat),
                   "dynamic": timed(lambda: dyn(*xs), args.repeat),
                   "eager": timed(lambda: model(*xs), args.repeat),
                   "rel_err_dynamic": rel_err(dyn(*xs), ref),
                   "rel_err_static": rel_err(static(*xs), ref)}
        rows["lengths"][n] = row
        print(n, row, flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "TVM_NUM_THREADS=2 .venv/bin/python benchmarks/dynamic_model_cpu.py",
              "model": "Llama hidden 512, 2 layers, 8/4 heads, fp32, batch 1",
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), **rows}
    out = Path(args.out) / "dynamic_model_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
