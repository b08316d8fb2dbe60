"""Apply tuning logs to a lowered Relax module: ``apply_tuning_logs(mod, target, path)``.

The module is prepared exactly as for task extraction (:func:`prepare_module`: library
dispatch, ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``
in the target scope), so workload hashes match, then ``MetaScheduleApplyDatabase`` replaces
each fused PrimFunc that has a record for this target.  The records are loaded, validated and
filtered by target into an in-memory database first: MetaSchedule itself would apply a record
measured on another target without a word.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import tvm
import tvm_ffi

from .tuning_db import (
    TuningLogError,
    TuningLogWarning,
    find_log_dirs,
    read_log,
    read_meta,
)


def prepare_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse exactly as the build does before scheduling, so workload hashes match:
    ``cpu_legalize_passes`` on llvm, TVM's CUDA dispatch + legalize phases (without dlight)
    on GPUs."""
    if target.kind.name == "llvm":
        from attnforge.schedules.cpu_schedule import cpu_legalize_passes

        passes = cpu_legalize_passes()
    else:
        from tvm.relax.backend.cuda import pipeline as cuda_pipeline

        passes = (cuda_pipeline.library_dispatch_passes(target)
                  + cuda_pipeline.legalize_passes(target)[:-1])  # last one is dlight
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def record_target_tag(t: dict) -> str:
    """attnforge's target tag of a record's target JSON (``llvm-znver4``, ``cuda-sm_90``)."""
    kind = t.get("kind", "unknown")
    if kind == "cuda":
        return f"cuda-{t.get('arch', 'unknown')}"
    return f"{kind}-{t.get('mcpu', 'generic')}"


def workload_hash(func: tvm.tirx.PrimFunc) -> str:
    """Structural hash of a PrimFunc as MetaSchedule's database keys it (hex string)."""
    from tvm.s_tir import meta_schedule as ms

    wmod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return str(ms.database.Workload(wmod).as_json()[0])


def _has_blocks(func) -> bool:
    """Whether a PrimFunc has schedulable blocks (hand-written kernels have none)."""
    try:
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
        return len(sch.get_child_blocks(sch.get_sblock("root"))) > 0
    except Exception:  # noqa: BLE001 - no root block: a hand-written kernel
        return False


def _load(dirs: list[Path], tag: str):
    """In-memory database of this target's records; counts of other targets' records."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    other: dict[str, dict[str, int]] = {}  # workload hash -> {target tag: n}
    n_used, tuned_names = 0, {}
    for d in dirs:
        log = read_log(d)
        wls = []
        for i, w in enumerate(log.workloads):
            try:
                wls.append(ms.database.Workload.from_json(w))
            except Exception as e:
                raise TuningLogError(f"tuning log {str(d / 'database_workload.json')!r}: "
                                     f"workload #{i} does not load ({e}); it was written by "
                                     "another TVM version or is corrupt") from e
        for idx, rec in log.records:
            rtag = record_target_tag(log.record_target(rec))
            shash = log.workloads[idx][0]
            if rtag != tag:
                other.setdefault(shash, {}).setdefault(rtag, 0)
                other[shash][rtag] += 1
                continue
            try:
                db.commit_workload(wls[idx].mod)
                db.commit_tuning_record(ms.database.TuningRecord.from_json(rec, wls[idx]))
            except Exception as e:
                raise TuningLogError(f"tuning log {str(d / 'database_tuning_record.json')!r}: "
                                     f"a record of workload #{idx} does not load ({e})") from e
            n_used += 1
        for t in read_meta(d).get("tasks", []):
            if t.get("workload_hash"):
                tuned_names.setdefault(t["name"], set()).add(t["workload_hash"])
    return db, other, n_used, tuned_names


def apply_tuning_logs(mod: tvm.IRModule, target, path=None) -> tuple[tvm.IRModule, dict]:
    """Apply the MetaSchedule records under ``path`` to ``mod`` (a lowered Relax module).

    Args:
        mod: Relax module after attnforge's passes (``compiler._lower``), before the build.
        target: anything :func:`attnforge.target.parse_target` accepts.
        path: a log directory, or a directory above several (all are merged; records match
            only their own workloads, by hash).  Default: ``tuning_logs/<target-tag>/``.

    Returns:
        ``(module, report)``: the module legalized, fused and with tuned PrimFuncs replaced
        (marked ``tirx.is_scheduled``), ready for ``tvm.compile``; the report lists every
        fused PrimFunc as ``tuned`` or ``default`` with the reason, plus log-level counts.

    Raises:
        TuningLogError: a missing, corrupt or truncated log (names the file and line).
    Warns:
        TuningLogWarning: records for another target, or tuned functions whose IR changed.
    """
    from tvm import relax

    from .target import parse_target, target_tag

    tgt = parse_target(target)
    tag = target_tag(tgt)
    if path is None:
        from .tuning_db import repo_log_root

        path = repo_log_root() / tag
    dirs = find_log_dirs(path)
    db, other, n_used, tuned_names = _load(dirs, tag)
    prepared = prepare_module(mod, tgt)
    with tgt, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(prepared)

    ours = {str(r.workload.as_json()[0]) for r in db.get_all_tuning_records()}
    funcs, matched = [], set()
    for gv, func in prepared.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        new = applied[name] if any(g.name_hint == name for g in applied.get_global_vars()) \
            else func
        shash = workload_hash(func)
        entry = {"name": name, "workload_hash": shash}
        scheduled = new.attrs is not None and bool(new.attrs.get("tirx.is_scheduled", False))
        if scheduled or not tvm_ffi.structural_equal(new, func):
            entry["status"], entry["reason"] = "tuned", None
            matched.add(shash)
        else:
            entry["status"] = "default"
            if not _has_blocks(func):
                entry["reason"] = "hand-written kernel (no schedulable blocks): not tunable"
            elif shash in other:
                tags = ", ".join(sorted(other[shash]))
                entry["reason"] = f"records only for another target ({tags}), not {tag}"
            elif name in tuned_names and shash not in tuned_names[name]:
                was = ", ".join(sorted(tuned_names[name]))
                entry["reason"] = (f"IR changed since tuning (workload hash mismatch: a task "
                                   f"{name!r} was tuned as {was}, now {shash}); re-tune")
            elif shash in ours:
                entry["reason"] = ("records present but none usable: every candidate failed "
                                   "to build/run, or the trace no longer applies")
            else:
                entry["reason"] = "no record for this workload in the log (not tuned)"
        funcs.append(entry)
    other_n = sum(sum(v.values()) for v in other.values())
    other_tags = sorted({t for v in other.values() for t in v})
    changed = [f["name"] for f in funcs if f["reason"] and "IR changed" in f["reason"]]
    report = {
        "logs": [str(d) for d in dirs],
        "target_tag": tag,
        "records_for_target": n_used,
        "records_other_target": other_n,
        "other_targets": other_tags,
        "functions": funcs,
        "tuned": [f["name"] for f in funcs if f["status"] == "tuned"],
        "default_scheduled": [f["name"] for f in funcs if f["status"] == "default"],
        "unused_log_workloads": len(ours - matched),
    }
    if other_n:
        warnings.warn(f"tuning logs {report['logs']}: {other_n} record(s) are for "
                      f"{', '.join(other_tags)}, not {tag}; they were NOT applied",
                      TuningLogWarning, stacklevel=2)
    if changed:
        warnings.warn(f"tuning logs {report['logs']}: the IR of {', '.join(changed)} changed "
                      "since tuning (workload hash mismatch); they use default schedules",
                      TuningLogWarning, stacklevel=2)
    if not n_used and not other_n:
        warnings.warn(f"tuning logs {report['logs']} hold no records", TuningLogWarning,
                      stacklevel=2)
    return applied, report
