"""The default schedule of each tuning task, measured like a candidate and seeded into the log.

MetaSchedule at small budgets often finds kernels slower than attnforge's own default schedules
(``schedules.cpu_schedule`` rules on llvm, dlight on CUDA).  :func:`measure_and_seed` schedules
every task's PrimFunc with those rules, builds and runs it with the tuning job's own builder and
runner, and commits the result to the work dir's ``JSONDatabase`` as a ``TuningRecord`` (the
rule's ``Schedule.trace``, which replays on the workload).  So the search sees the default as a
measured candidate, ``meta.json`` stores ``default_us`` per task, and
:func:`~attnforge.tuning_apply.apply_tuning_logs` applies a tuned record only when it beats it.

Seed records are recognised by the sha256 of their trace JSON (``default_trace_sha256`` in
``meta.json``): they do not count against the trial budget and are never applied as "tuned".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .tuning_db import RECORD_FILE, read_log

FAILED_SECS = 1e9  # MetaSchedule stores 1e10 s for a candidate that failed to build or run


def default_schedule(func, target):
    """``(Schedule, rule name)`` of a PrimFunc's default schedule; ``(None, None)``: no rule."""
    from .tuning_space import space_of

    space = space_of(func)
    if space is not None:  # our attention kernel (CPU or CUDA) at the generator's own knobs
        return space.default_space_schedule(func), "attnforge attention kernel (generator knobs)"
    if target.kind.name == "llvm":
        from attnforge.schedules.cpu_schedule import cpu_rules, is_schedulable

        if not is_schedulable(func):
            return None, None
        rules = cpu_rules()
    else:
        from tvm.s_tir import dlight as dl

        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                 dl.gpu.GeneralReduction(), dl.gpu.Fallback()]  # TVM's CUDA pipeline
    with target:
        for rule in rules:
            try:
                sch = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001 - a rule that cannot handle the func declines
                sch = None
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return sch, type(rule).__name__
    return None, None


def trace_sha(trace_json) -> str:
    """sha256 of a record's trace JSON (as stored in ``database_tuning_record.json``)."""
    return hashlib.sha256(json.dumps(trace_json, sort_keys=True).encode()).hexdigest()


def record_us(rec: list) -> float | None:
    """Mean run time (us) of a JSON tuning record; ``None`` for a failed candidate."""
    secs = rec[1] if len(rec) > 1 else None
    if not isinstance(secs, list) or not secs:
        return None
    try:
        secs = [float(s) for s in secs]
    except (TypeError, ValueError):
        return None
    if any(s >= FAILED_SECS or s <= 0 for s in secs):
        return None
    return 1e6 * sum(secs) / len(secs)


def _device_type(target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"


def measure_and_seed(work_dir, tasks, hashes, target, builder, runner, known=None) -> dict:
    """Measure each task's default schedule; commit it to ``work_dir``'s database as a record.

    Args:
        tasks: MetaSchedule ``ExtractedTask`` list; ``hashes``: their workload hashes.
        target: the tuning target (``num-cores`` set); builder, runner: the job's own.
        known: ``{workload hash: entry}`` of earlier runs; those are not measured again.

    Returns:
        ``{workload hash: {"default_us", "default_rule", "default_trace_sha256",
        "default_error"}}`` (``default_us`` ``None`` when no rule applies or it failed).
    """
    from tvm.s_tir import meta_schedule as ms

    known = known or {}
    out, todo = {}, []
    for task, h in zip(tasks, hashes):
        if h in known and known[h].get("default_us") is not None:
            out[h] = known[h]
            continue
        wmod = task.dispatched[0]
        sch, rule = default_schedule(wmod["main"], target)
        if sch is None:
            out[h] = {"default_us": None, "default_rule": None, "default_trace_sha256": None,
                      "default_error": "no default schedule rule applies"}
            continue
        todo.append((h, wmod, sch, rule))
    if not todo:
        return out
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch, _ in todo])
    inputs, pending = [], []
    for (h, wmod, sch, rule), b in zip(todo, built):
        if b.error_msg:
            out[h] = _failed(f"build failed: {_last_line(b.error_msg)}")
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(wmod["main"])
        inputs.append(ms.runner.RunnerInput(b.artifact_path, _device_type(target), args))
        pending.append((h, wmod, sch, rule, args))
    results = [f.result() for f in runner.run(inputs)] if inputs else []
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    for (h, wmod, sch, rule, args), r in zip(pending, results):
        if r.error_msg or not r.run_secs:
            out[h] = _failed(f"run failed: {_last_line(r.error_msg or 'no result')}")
            continue
        secs = [float(s) for s in r.run_secs]
        wl = db.commit_workload(wmod)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, wl, secs, target, args))
        out[h] = {"default_us": round(1e6 * sum(secs) / len(secs), 3),
                  "default_rule": rule,
                  "default_trace_sha256": _last_record_sha(work_dir),
                  "default_error": None}
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    for b in built:
        if b.artifact_path:
            remove_build_dir(b.artifact_path)
    return out


def _failed(msg: str) -> dict:
    return {"default_us": None, "default_rule": None, "default_trace_sha256": None,
            "default_error": msg}


def _last_line(msg: str) -> str:
    lines = [ln for ln in str(msg).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else str(msg))[:300]


def _last_record_sha(work_dir) -> str:
    """sha of the trace of the record just appended (read back: the file is the truth)."""
    text = (Path(work_dir) / RECORD_FILE).read_text().rstrip("\n")
    return trace_sha(json.loads(text.rpartition("\n")[2])[1][0])


def seed_shas(meta: dict) -> set[str]:
    """Trace hashes of the default-schedule seed records listed in a ``meta.json``."""
    return {t["default_trace_sha256"] for t in meta.get("tasks", [])
            if t.get("default_trace_sha256")}


def count_records(work_dir, tag: str, seeds: set[str]) -> dict[str, int]:
    """Tuning records per workload hash for target ``tag``, seed records left out."""
    from .tuning_apply import record_target_tag

    if not (Path(work_dir) / "database_workload.json").exists():
        return {}
    log = read_log(work_dir)
    counts: dict[str, int] = {}
    for idx, rec in log.records:
        if record_target_tag(log.record_target(rec)) != tag or trace_sha(rec[0]) in seeds:
            continue
        h = log.workloads[idx][0]
        counts[h] = counts.get(h, 0) + 1
    return counts


def confirm_best(work_dir, tasks, hashes, target, builder, runner, seeds: set[str],
                 rounds: int = 3) -> dict:
    """Re-measure each task's best tuned record against its default schedule, interleaved.

    The default is measured once before the search and the candidates over minutes after it;
    on a shared host the load changes in between, so the two stored numbers are not a fair
    comparison.  Here both are built again and run alternately ``rounds`` times with the same
    runner; the minimum of each is kept.  Returns ``{workload hash: {"best_us",
    "default_us", "rounds", "trace_sha256"}}`` (or ``{"error": ...}``) for tasks that have a
    tuned record and a default schedule.
    """
    from tvm.s_tir import meta_schedule as ms

    from .target import target_tag
    from .tuning_apply import record_target_tag

    tag = target_tag(target)
    log = read_log(work_dir)  # the file's JSON: trace hashes as the gate computes them
    best: dict = {}  # workload hash -> (us, record json, workload json)
    for idx, rec in log.records:
        us, h = record_us(rec), log.workloads[idx][0]
        if record_target_tag(log.record_target(rec)) != tag:
            continue
        if us is not None and trace_sha(rec[0]) not in seeds and (h not in best
                                                                 or us < best[h][0]):
            best[h] = (us, rec, log.workloads[idx])
    todo = []
    for task, h in zip(tasks, hashes):
        wmod = task.dispatched[0]
        dsch, _ = default_schedule(wmod["main"], target)
        if h not in best or dsch is None:
            continue
        _, rec, wl_json = best[h]
        record = ms.database.TuningRecord.from_json(rec, ms.database.Workload.from_json(wl_json))
        sch = tvm_schedule(wmod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        todo.append((h, wmod, sch, dsch, trace_sha(rec[0])))
    out: dict = {}
    if not todo:
        return out
    mods = [m for _, _, sch, dsch, _ in todo for m in (sch.mod, dsch.mod)]
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs = []
    for i, (h, wmod, *_rest) in enumerate(todo):
        b_best, b_def = built[2 * i], built[2 * i + 1]
        if b_best.error_msg or b_def.error_msg:
            out[h] = {"error": _last_line(b_best.error_msg or b_def.error_msg)}
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(wmod["main"])
        dev = _device_type(target)
        inputs.append((h, ms.runner.RunnerInput(b_best.artifact_path, dev, args),
                       ms.runner.RunnerInput(b_def.artifact_path, dev, args)))
    times: dict = {h: {"best": [], "default": []} for h, _, _ in inputs}
    for _ in range(rounds):
        flat = [x for _, a, b in inputs for x in (a, b)]
        results = [f.result() for f in runner.run(flat)] if flat else []
        for j, (h, _, _) in enumerate(inputs):
            for key, r in (("best", results[2 * j]), ("default", results[2 * j + 1])):
                if not r.error_msg and r.run_secs:
                    secs = [float(s) for s in r.run_secs]
                    times[h][key].append(1e6 * sum(secs) / len(secs))
    shas = {h: sha for h, _, _, _, sha in todo}
    for h, t in times.items():
        if t["best"] and t["default"]:
            out[h] = {"best_us": round(min(t["best"]), 3),
                      "default_us": round(min(t["default"]), 3), "rounds": rounds,
                      "trace_sha256": shas[h]}
        else:
            out[h] = {"error": "re-measurement failed to run"}
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    for b in built:
        if b.artifact_path:
            remove_build_dir(b.artifact_path)
    return out


def tvm_schedule(wmod):
    """A fresh ``tvm.s_tir.Schedule`` of a workload module."""
    import tvm

    return tvm.s_tir.Schedule(wmod)
