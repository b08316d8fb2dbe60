"""Benchmark of attnforge's tuning on this CPU (llvm): what tuning buys, and what it costs.

1. Fused attention, causal N=2048, B1 H8 D64 fp32 (an SDPA module through compile_model):
   untuned (``tuning_logs=False``: block 64/64, rows 4) vs tuned by MetaSchedule over the
   attention design space (``schedules.attention_cpu_space``: block_q x block_kv x rows,
   evolutionary search + XGBoost, ``--attn-trials`` trials) and applied through the gate;
   plus, as a reference, the direct grid search of the same 27 points
   (``tuning_attention``) and torch SDPA.
2. Llama (hidden 512, 2 layers, 8 heads / 4 kv heads, seq 512, batch 1): attnforge untuned
   (``tuning_logs=False``), attnforge tuned (the log dir: the matmul records of the earlier
   ``--trials``-trial job plus ``--attn-trials`` trials on the attention task; a record is
   applied only where it beat the task's default schedule measured by ``tune``), the same
   through ``compile_model``'s default (shipped logs), eager PyTorch and ``torch.compile``;
   plus the tuning wall time.  Times are min / median ms over interleaved runs (shared
   host); TVM and torch variants are timed in separate groups so one runtime's spinning thread
   pool does not starve the other.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/tuning_cpu.py [--attn-trials 24]
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
    p.add_argument("--trials", type=int, default=80,
                   help="MetaSchedule trial budget of the Llama matmul tasks (records already "
                   "in the log count: a finished log is not re-tuned)")
    p.add_argument("--attn-trials", type=int, default=24,
                   help="MetaSchedule trials on each attention task (design space: 27 points)")
    p.add_argument("--per-iter", type=int, default=16, help="trials per task per round")
    p.add_argument("--only", action="append", default=None,
                   help="Llama matmul job: tune only tasks containing this (default: matmul)")
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


class CausalSDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _knobs(report: dict) -> dict | None:
    for f in report["tuning"].get("functions", []):
        if "attention" in f["name"]:
            return {"status": f["status"], "reason": f.get("reason"),
                    "knobs": f.get("attention_knobs"), "tuned_us": f.get("tuned_us"),
                    "default_us": f.get("default_us")}
    return None


def attention_case(quick: bool) -> dict:
    import attnforge
    from attnforge.target import parse_target
    from attnforge.tuning import tune
    from attnforge.tuning_attention import tune_attention_blocks
    from attnforge.tuning_db import default_log_dir

    n = 512 if quick else 2048
    tgt = parse_target("llvm")
    name = f"attention-causal-n{n}"
    wdir = default_log_dir(tgt, name)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    model = CausalSDPA()
    t0 = time.time()
    res = tune(model, (q, k, v), tgt, trials=ARGS.attn_trials, work_dir=wdir, workload=name,
               num_trials_per_iter=8, progress=True, seed=0, only=["attention"])
    tune_s = time.time() - t0
    untuned = attnforge.compile_model(model, (q, k, v), tuning_logs=False)
    tuned = attnforge.compile_model(model, (q, k, v), tuning_logs=str(wdir))
    t0 = time.time()
    try:
        grid = tune_attention_blocks(batch=1, q_heads=8, q_len=n, head_dim=64, causal=True,
                                     work_dir=default_log_dir(tgt, "attention-causal"),
                                     repeat=3)
    except Exception as e:  # noqa: BLE001 - a reference only: record the failure
        grid = {"results": [], "best": None, "default_ms": None, "error": str(e)[-300:]}
    grid_s = time.time() - t0
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    fns = {"untuned (tuning_logs=False, 64/64/4)": lambda: untuned(q, k, v),
           "tuned (MetaSchedule record, gated)": lambda: tuned(q, k, v)}
    times = interleaved(fns, ARGS.repeat)
    times.update(interleaved({"torch SDPA eager (is_causal)": lambda: torch.nn.functional
                              .scaled_dot_product_attention(q, k, v, is_causal=True)},
                             ARGS.repeat))
    err = {lbl: float((cm(q, k, v) - ref).abs().max() / ref.abs().max())
           for lbl, cm in (("untuned", untuned), ("tuned", tuned))}
    speedup = (times["untuned (tuning_logs=False, 64/64/4)"]["min_ms"]
               / times["tuned (MetaSchedule record, gated)"]["min_ms"])
    return {"case": f"fused attention causal B1 H8 N{n} D64 fp32 (SDPA module)",
            "metaschedule": {"trials": ARGS.attn_trials, "trials_in_db": res.trials_in_db,
                             "tuning_wall_s": round(tune_s, 1), "task": res.tasks,
                             "log_dir": str(wdir.relative_to(ROOT)),
                             "applied": _knobs(tuned.report)},
            "grid_search_reference": {"variants": len(grid["results"]),
                                      "wall_s": round(grid_s, 1), "best": grid["best"],
                                      "default_ms": grid["default_ms"],
                                      "error": grid.get("error")},
            "times": times, "max_rel_err_vs_sdpa": err,
            "speedup_tuned_vs_untuned_min": round(speedup, 3),
            "target_1_3x_met": speedup >= 1.3}


def llama_case(quick: bool) -> dict:
    import attnforge
    from attnforge.compiler import _build
    from attnforge.schedules.cpu_schedule import cpu_schedule_pass
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
    cm = attnforge.compile_model(model, inputs, target="llvm", verify=False, tuning_logs=False)
    rows["compile_untuned_s"] = round(time.time() - t0, 1)
    fns = {"attnforge untuned (tuning_logs=False)": lambda: cm.run_flat(
        *[x.numpy() for x in inputs])}
    mod, how = import_and_lower(model, inputs, tgt)
    t0 = time.time()
    only = ARGS.only or ["matmul"]
    res = tune(model, inputs, tgt, trials=trials, work_dir=wdir, workload=name,
               num_trials_per_iter=ARGS.per_iter, progress=True, seed=0, only=only)
    matmul_s = time.time() - t0
    t0 = time.time()
    res_attn = tune(model, inputs, tgt, trials=ARGS.attn_trials, work_dir=wdir, workload=name,
                    num_trials_per_iter=8, progress=True, seed=0, only=["attention"])
    attn_s = time.time() - t0
    applied, report = apply_tuning_logs(mod, tgt, wdir)
    applied = cpu_schedule_pass(tgt)(applied)  # default schedules for what the log lacks
    ex = _build(applied, tgt)
    fns["attnforge tuned (log applied, gated)"] = vm_fn(ex)
    t0 = time.time()
    shipped = attnforge.compile_model(model, inputs, target="llvm")  # default: shipped logs
    rows["compile_shipped_s"] = round(time.time() - t0, 1)
    fns["attnforge compile_model default (shipped logs)"] = lambda: shipped.run_flat(
        *[x.numpy() for x in inputs])
    err = float(np.abs(out0(fns["attnforge tuned (log applied, gated)"]()) - ref).max()
                / np.abs(ref).max())
    times = interleaved(fns, ARGS.repeat)  # TVM variants among themselves (thread pools)
    tc = torch.compile(model)
    with torch.no_grad():
        tc(*inputs)
        times.update(interleaved({"torch eager": lambda: model(*inputs),
                                  "torch.compile": lambda: tc(*inputs)}, ARGS.repeat))
    tuned_ms = times["attnforge tuned (log applied, gated)"]["min_ms"]
    return {"case": f"Llama hidden {hidden}, 2 layers, 8 heads / 4 kv, seq {seq}, batch 1",
            "frontend": how, "matmul_trials": trials, "trials_per_iter": ARGS.per_iter,
            "matmul_tasks_filter": only, "attention_trials": ARGS.attn_trials,
            "trials_in_db": res.trials_in_db + res_attn.trials_in_db,
            "trials_run_now": res.trials_run + res_attn.trials_run,
            "tuning_wall_s_this_run": {"matmul": round(matmul_s, 1),
                                       "attention": round(attn_s, 1)},
            "tuning_wall_s_recorded": _recorded_wall(wdir),
            "tuned_functions": report["tuned"],
            "default_functions": len(report["default_scheduled"]),
            "tuning_tasks": [{k: t.get(k) for k in ("name", "weight", "trials", "best_us",
                                                    "default_us", "default_rule")}
                             for t in res.tasks + res_attn.tasks],
            "attention": _knobs({"tuning": report}),
            "rejected_slower_than_default": report.get("slower_than_default", []),
            "default_comparison": report.get("default_comparison"),
            "shipped_logs_report": {k: shipped.report["tuning"].get(k) for k in
                                    ("auto", "applied", "tuned", "reason")},
            "log_dir": str(wdir.relative_to(ROOT)) if wdir.is_relative_to(ROOT) else str(wdir),
            "max_rel_err_tuned_vs_eager": err, "times": times,
            "tuned_faster_than_torch_compile_min": tuned_ms < times["torch.compile"]["min_ms"],
            **rows}


def _recorded_wall(wdir: Path) -> list:
    """Wall time of every job recorded in the log's meta.json (earlier runs included)."""
    meta = json.loads((wdir / "meta.json").read_text())
    return [{k: r.get(k) for k in ("date", "status", "trials_run", "wall_time_s")}
            for r in meta.get("runs", [])]


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
