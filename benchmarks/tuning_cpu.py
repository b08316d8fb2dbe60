"""Benchmark of attnforge's tuning on this CPU (llvm): what tuning buys, and what it costs.

1. Fused attention kernel, causal N=2048, B1 H8 D64 fp32: the compile_model default blocks
   (64/64, rows 4) vs the best of the block-size search (``tuning_attention``; 27 variants).
2. Llama (hidden 512, 2 layers, 8 heads / 4 kv heads, seq 512, batch 1): attnforge untuned
   (compile_model as it is), attnforge with the CPU default schedules
   (``schedules.cpu_schedule``), attnforge tuned (MetaSchedule, ``--trials`` trials on the
   matmul tasks by default (``--only``), logs applied where a record beat the task's default
   schedule as measured by ``tune``, other functions default-scheduled),
   eager PyTorch and ``torch.compile``; plus the tuning wall time.  Times are min / median ms
   over interleaved runs (shared host); TVM and torch variants are timed in separate groups
   so one runtime's spinning thread pool does not starve the other.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/tuning_cpu.py [--trials 80] [--only matmul]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=80, help="MetaSchedule trials for Llama")
    p.add_argument("--per-iter", type=int, default=16, help="trials per task per round")
    p.add_argument("--only", action="append", default=None,
                   help="tune only tasks containing this (default: matmul; 'all' for every task)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small sizes, few trials (smoke)")
    p.add_argument("--previous", default=None, help="earlier result JSON to embed")
    p.add_argument("--work-dir", default=None, help="tuning log dir (default tuning_logs/...)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tuning_cpu.json"))
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import numpy as np
import torch
import tvm


def interleaved(fns: dict, repeat: int, warmup: int = 1) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(1e3 * (time.perf_counter() - t0))
    return {k: {"min_ms": round(min(v), 3), "median_ms": round(statistics.median(v), 3),
                "runs": len(v)} for k, v in samples.items()}


def _bind(fn, q, k, v, arrs, out):
    return lambda: fn(q, k, v, *arrs, out)


def attention_case(quick: bool) -> dict:
    from attnforge.schedules.attention_cpu import fused_attention_cpu
    from attnforge.schedules.block_mask import MaskSpec

    from attnforge.target import parse_target
    from attnforge.tuning_attention import tune_attention_blocks
    from attnforge.tuning_db import default_log_dir

    n = 512 if quick else 2048
    tgt = parse_target("llvm")
    t0 = time.time()
    res = tune_attention_blocks(batch=1, q_heads=8, q_len=n, head_dim=64, causal=True,
                                work_dir=default_log_dir(tgt, "attention-causal"), repeat=3)
    search_s = time.time() - t0
    best = res["best"]
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    fns, outs = {}, {}
    for label, (bq, bk, rows) in {"default 64/64/4": (64, 64, 4),
                                  f"tuned {best['block_q']}/{best['block_kv']}/{best['rows']}":
                                  (best["block_q"], best["block_kv"], best["rows"])}.items():
        f, bm = fused_attention_cpu(1, 8, 8, n, n, 64, mask=MaskSpec.causal(), block_q=bq,
                                    block_kv=bk, rows=rows)
        lib = tvm.compile(tvm.IRModule({"main": f}), target=tgt)
        arrs = [torch.from_numpy(a) for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
        out = torch.empty(1, 8, n, 64)
        outs[label] = out
        fns[label] = _bind(lib["main"], q, k, v, arrs, out)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    fns["torch SDPA eager (is_causal)"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True)
    times = interleaved(fns, ARGS.repeat)
    err = {k_: float((o - ref).abs().max() / ref.abs().max()) for k_, o in outs.items()}
    return {"case": f"fused attention causal B1 H8 N{n} D64 fp32", "search_wall_s":
            round(search_s, 1), "variants": len(res["results"]), "search_best": best,
            "search_default_ms": res["default_ms"], "times": times, "max_rel_err_vs_sdpa": err}


def llama_case(quick: bool) -> dict:
    import attnforge
    from attnforge.compiler import _build
    from attnforge.models import build_hf_model
    from attnforge.target import parse_target
    from attnforge.tuning import apply_tuning_logs, import_and_lower, tune
    from attnforge.tuning_db import default_log_dir

    hidden, seq = (128, 128) if quick else (512, 512)
    trials = 24 if quick else ARGS.trials
    model, inputs = build_hf_model("llama", hidden=hidden, layers=2, heads=8, seq_len=seq)
    tgt = parse_target("llvm")
    name = f"llama-h{hidden}-l2-s{seq}"
    wdir = Path(ARGS.work_dir) if ARGS.work_dir else default_log_dir(tgt, name)
    with torch.no_grad():
        ref = model(*inputs).logits.numpy()
    rows = {}

    def vm_fn(ex):
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
        return lambda: vm["main"](*args)

    def out0(r):
        while not hasattr(r, "numpy"):
            r = r[0]
        return r.numpy()

    t0 = time.time()
    cm = attnforge.compile_model(model, inputs, target="llvm", verify=False)
    rows["compile_untuned_s"] = round(time.time() - t0, 1)
    fns = {"attnforge untuned (compile_model)": lambda: cm.run_flat(
        *[x.numpy() for x in inputs])}
    mod, how = import_and_lower(model, inputs, tgt)
    try:
        from attnforge.schedules.cpu_schedule import cpu_build_pipeline, cpu_schedule_pass
    except ImportError:
        cpu_build_pipeline = cpu_schedule_pass = None
    if cpu_build_pipeline is not None:
        try:
            ex = _build(cpu_build_pipeline(tgt)(mod), tgt)
            fns["attnforge default CPU schedules"] = vm_fn(ex)
        except Exception as e:  # noqa: BLE001 - schedules/ is work in progress: record it
            rows["default_schedules_error"] = str(e).strip().splitlines()[-1][:300]
            cpu_schedule_pass = None
    t0 = time.time()
    only = None if ARGS.only == ["all"] else (ARGS.only or ["matmul"])
    res = tune(model, inputs, tgt, trials=trials, work_dir=wdir, workload=name,
               num_trials_per_iter=ARGS.per_iter, progress=True, seed=0, only=only)
    tune_s = time.time() - t0
    applied, report = apply_tuning_logs(mod, tgt, wdir)
    if cpu_schedule_pass is not None:  # default schedules for what the log does not cover
        try:
            applied = cpu_schedule_pass(tgt)(applied)
            rows["tuned_rest"] = "schedules.cpu_schedule defaults"
        except Exception as e:  # noqa: BLE001
            rows["tuned_rest_error"] = str(e).strip().splitlines()[-1][:300]
    rows.setdefault("tuned_rest", "unscheduled (tvm.compile default)")
    ex = _build(applied, tgt)
    fns["attnforge tuned"] = vm_fn(ex)
    err = float(np.abs(out0(fns["attnforge tuned"]()) - ref).max() / np.abs(ref).max())
    times = interleaved(fns, ARGS.repeat)  # TVM variants among themselves (thread pools)
    tc = torch.compile(model)
    with torch.no_grad():
        tc(*inputs)
        times.update(interleaved({"torch eager": lambda: model(*inputs),
                                  "torch.compile": lambda: tc(*inputs)}, ARGS.repeat))
    return {"case": f"Llama hidden {hidden}, 2 layers, 8 heads / 4 kv, seq {seq}, batch 1",
            "frontend": how, "trials": trials, "trials_per_iter": ARGS.per_iter,
            "tuned_tasks_filter": only,
            "trials_in_db": res.trials_in_db, "trials_run_now": res.trials_run,
            "tuning_wall_s": round(tune_s, 1), "tasks": len(res.tasks),
            "tuned_functions": len(report["tuned"]),
            "default_functions": len(report["default_scheduled"]),
            "tuning_tasks": [{k: t.get(k) for k in ("name", "weight", "trials", "best_us",
                                                    "default_us", "default_rule")}
                             for t in res.tasks],
            "rejected_slower_than_default": report.get("slower_than_default", []),
            "default_comparison": report.get("default_comparison"),
            "log_dir": str(wdir.relative_to(ROOT)) if wdir.is_relative_to(ROOT) else str(wdir),
            "max_rel_err_tuned_vs_eager": err, "times": times, **rows}


def main() -> int:
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "tvm": tvm.__version__, "torch": torch.__version__,
           "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
           "command": "TVM_NUM_THREADS=2 python benchmarks/tuning_cpu.py " + " ".join(
               sys.argv[1:]), "loadavg_before": os.getloadavg(), "quick": ARGS.quick}
    torch.set_num_threads(ARGS.threads)
    t0 = time.time()
    out["attention"] = attention_case(ARGS.quick)
    print(json.dumps(out["attention"], indent=1), flush=True)
    out["llama"] = llama_case(ARGS.quick)
    print(json.dumps(out["llama"], indent=1), flush=True)
    out["loadavg_after"] = os.getloadavg()
    prev = Path(ARGS.previous) if ARGS.previous else None
    if prev and prev.exists():
        out["previous_run"] = json.loads(prev.read_text())
    out["total_wall_s"] = round(time.time() - t0, 1)
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {ARGS.out} ({out['total_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
