"""Stage (d) of ``benchmarks/gpu_check.py``: bounded CUDA tuning jobs on the GPU machine.

Each job (``TUNE_JOBS``) runs ``attnforge.tune`` in its own process (``gpu_check.py
--tune-job NAME``) with a soft deadline checked after every measured batch (records kept) and
a hard kill ``TUNE_HARD_S`` later; the MetaSchedule database and ``meta.json`` land in
``OUT/tuning_logs/cuda-<arch>/<workload>/``, to be copied into ``tuning_logs/`` and committed.
A failed job is recorded in the results, never fatal. ``tuning_dry_run`` extracts the jobs'
tasks for cuda without a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

T0 = time.time()
# (d) tuning jobs: workload dir name, trials, trials per measured batch, tasks, budget share
TUNE_JOBS = {
    "attention": {"workload": "attention-causal-n2048-float16", "trials": 16, "per_iter": 4,
                  "only": ["attention"], "share": 0.4},
    "llama": {"workload": "llama-h512-l2-s512-float16", "trials": 48, "per_iter": 8,
              "only": ["matmul"], "share": 0.6},
}
TUNE_HARD_S = 15.0  # a job is killed this long after its soft deadline


def _tune_model(name: str):
    """(model, example inputs) of a tuning job (random weights, fixed seed)."""
    import torch

    torch.manual_seed(0)
    if name == "attention":
        class CausalSDPA(torch.nn.Module):
            def forward(self, q, k, v):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        return CausalSDPA(), tuple(torch.randn(1, 8, 2048, 64) for _ in range(3))
    from attnforge.models import build_hf_model

    return build_hf_model("llama", hidden=512, layers=2, heads=8, seq_len=512)


def tune_job(name: str, out: Path, arch: str, budget_s: float) -> int:
    """One tuning job in this process (``--tune-job``); prints ``TUNE_RESULT {json}``."""
    from attnforge.tuning import tune

    job = TUNE_JOBS[name]
    deadline = T0 + budget_s
    wdir = out / "tuning_logs" / f"cuda-{arch}" / job["workload"]
    row = {"job": name, "workload": job["workload"], "trials": job["trials"],
           "budget_s": round(budget_s, 1), "work_dir": str(wdir)}

    def stop_at_deadline(_progress):
        if time.time() > deadline:
            raise KeyboardInterrupt("time budget of the tuning job")

    try:
        model, inputs = _tune_model(name)
        res = tune(model, inputs, f"cuda:{arch}", trials=job["trials"], work_dir=wdir,
                   workload=job["workload"], num_trials_per_iter=job["per_iter"],
                   progress=False, seed=0, only=job["only"], precision="float16",
                   callbacks=[stop_at_deadline], confirm_rounds=2)
        row.update(status="complete", trials_run=res.trials_run, tasks=res.tasks)
    except KeyboardInterrupt:
        row["status"] = "stopped at its time budget (records so far kept)"
    except Exception as e:  # noqa: BLE001 - recorded by the parent, never fatal
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                   trace=traceback.format_exc()[-2000:])
    row["job_wall_s"] = round(time.time() - T0, 1)
    print("TUNE_RESULT " + json.dumps(row, default=str), flush=True)
    return 0 if row["status"] != "failed" else 1


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and MetaSchedule's popen workers
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_tuning(out: Path, arch: str, tune_s: float, results: dict) -> None:
    """(d): each job in a subprocess with a soft and a hard deadline; summary into results."""
    rows = results.setdefault("tuning", [])
    usable = max(tune_s - len(TUNE_JOBS) * TUNE_HARD_S, 0.0)
    for name, job in TUNE_JOBS.items():
        soft = usable * job["share"]
        row = {"job": name, "workload": job["workload"], "trials": job["trials"],
               "soft_budget_s": round(soft, 1), "hard_budget_s": round(soft + TUNE_HARD_S, 1)}
        rows.append(row)
        if soft < 20:
            row["status"] = "skipped: --tune-s too small"
            continue
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "gpu_check.py"), str(out), "--tune-job", name,
               "--job-budget-s", str(soft), "--arch", arch]
        t = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=soft + TUNE_HARD_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            text, _ = proc.communicate()
            row["status"] = "killed at the hard deadline (records of finished batches kept)"
        row["wall_s"] = round(time.time() - t, 1)
        row["rc"] = proc.returncode
        got = [ln for ln in (text or "").splitlines() if ln.startswith("TUNE_RESULT ")]
        if got:
            row.update(json.loads(got[-1][len("TUNE_RESULT "):]))
        elif "status" not in row:
            row["status"] = "failed"
        row["output_tail"] = (text or "")[-1500:]
        wdir = out / "tuning_logs" / f"cuda-{arch}" / job["workload"]
        (wdir / ".tune.lock").unlink(missing_ok=True)  # left by a killed job: not shipped
        row["log_files"] = sorted(p.name for p in wdir.iterdir()) if wdir.exists() else []
        print("tuning", {k: v for k, v in row.items() if k not in ("output_tail", "trace")})


def tuning_dry_run(out: Path, arch: str) -> dict:
    """The tuning jobs' task extraction for cuda (no GPU): what (d) would tune."""
    from attnforge.target import parse_target
    from attnforge.tuning import _extract, import_and_lower
    from attnforge.tuning_space import is_attention_space

    tgt = parse_target(f"cuda:{arch}")
    rows = []
    for name, job in TUNE_JOBS.items():
        t = time.time()
        model, inputs = _tune_model(name)
        mod, _ = import_and_lower(model, inputs, tgt, precision="float16")
        tasks = _extract(mod, tgt, job["workload"], f"cuda-{arch}", job["only"])
        rows.append({"job": name, "workload": job["workload"], "s": round(time.time() - t, 1),
                     "tasks": [t.task_name for t in tasks],
                     "attention_spaces": sum(is_attention_space(t.dispatched[0]["main"])
                                             for t in tasks)})
        print("tuning dry run", rows[-1])
    res = {"dry_run": True, "arch": arch, "tuning": rows}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res
