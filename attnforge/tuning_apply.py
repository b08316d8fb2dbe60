"""Apply tuning logs to a lowered Relax module: ``apply_tuning_logs(mod, target, path)``.

The module is prepared exactly as for task extraction (:func:`prepare_module`: library
dispatch, ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``
in the target scope), so workload hashes match, then ``MetaScheduleApplyDatabase`` replaces
each fused PrimFunc that has a record for this target.  The records are loaded, validated and
filtered by target into an in-memory database first: MetaSchedule itself would apply a record
measured on another target without a word.  A workload's records are dropped when the best of
them is not faster than its default schedule as measured by ``tune`` (``meta.json``
``default_us``, same builder and runner; see :mod:`attnforge.tuning_default`): MetaSchedule at
small budgets often loses to our own rules, and the default pass then schedules that function.
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
        mod = tvm.transform.Sequential(passes)(mod)
    from .tuning_space import mark_attention_spaces

    return mark_attention_spaces(mod, target)  # our attention kernels as design spaces


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
    """In-memory database of this target's records that beat the default schedule.

    Returns ``(db, other, n_used, tuned_names, cmp)``: ``other`` counts other targets' records
    per workload hash, ``n_used`` this target's records (default-schedule seeds left out),
    ``cmp`` maps a workload hash to ``{"tuned_us", "default_us", "rejected"}``
    (``default_us`` ``None`` when no ``meta.json`` measured it).
    """
    from tvm.s_tir import meta_schedule as ms

    from .tuning_default import record_us, seed_shas, trace_sha

    db = ms.database.MemoryDatabase()
    other: dict[str, dict[str, int]] = {}  # workload hash -> {target tag: n}
    n_used, tuned_names = 0, {}
    found: dict[str, list] = {}  # workload hash -> [(dir, workload, record json, us)]
    defaults: dict[str, float] = {}
    confirms: dict[str, dict] = {}  # interleaved re-measurement of best vs default (tune)
    for d in dirs:
        log = read_log(d)
        meta = read_meta(d)
        seeds = seed_shas(meta)
        for t in meta.get("tasks", []):
            h, us = t.get("workload_hash"), t.get("default_us")
            if h:
                tuned_names.setdefault(t["name"], set()).add(h)
            if h and isinstance(us, (int, float)) and us > 0:  # slowest default: strictest
                defaults[h] = max(defaults.get(h, 0.0), float(us))
            if h and isinstance(t.get("default_confirm"), dict) and \
                    "best_us" in t["default_confirm"]:
                confirms[h] = t["default_confirm"]
        wls = []
        for i, w in enumerate(log.workloads):
            try:
                wls.append(ms.database.Workload.from_json(w))
            except Exception as e:
                raise TuningLogError(f"tuning log {str(d / 'database_workload.json')!r}: "
                                     f"workload #{i} does not load ({e}); it was written by "
                                     "another TVM version or is corrupt") from e
        for idx, rec in log.records:
            if trace_sha(rec[0]) in seeds:  # the default schedule itself: never "tuned"
                continue
            rtag = record_target_tag(log.record_target(rec))
            shash = log.workloads[idx][0]
            if rtag != tag:
                other.setdefault(shash, {}).setdefault(rtag, 0)
                other[shash][rtag] += 1
                continue
            found.setdefault(shash, []).append((d, wls[idx], rec, record_us(rec),
                                                trace_sha(rec[0])))
            n_used += 1
    cmp: dict[str, dict] = {}
    for shash, recs in found.items():
        timed = [(us, sha) for *_, us, sha in recs if us is not None]
        best, best_sha = min(timed) if timed else (None, None)
        default = defaults.get(shash)
        conf = confirms.get(shash)
        confirmed = bool(conf and conf.get("trace_sha256") == best_sha)
        if confirmed:  # same record, re-measured alternately with the default: fairer
            best, default = conf["best_us"], conf["default_us"]
        rejected = best is not None and default is not None and best >= default
        cmp[shash] = {"tuned_us": None if best is None else round(best, 3),
                      "default_us": default, "rejected": rejected, "confirmed": confirmed}
        if rejected:
            continue
        for d, wl, rec, *_ in recs:
            try:
                db.commit_workload(wl.mod)
                db.commit_tuning_record(ms.database.TuningRecord.from_json(rec, wl))
            except Exception as e:
                raise TuningLogError(f"tuning log {str(d / 'database_tuning_record.json')!r}: "
                                     f"a record of workload {shash} does not load ({e})") from e
    return db, other, n_used, tuned_names, cmp


def _comparison_note(funcs: list[dict]) -> str:
    tuned = [f for f in funcs if f["status"] == "tuned"]
    blind = [f["name"] for f in tuned if not f.get("compared_to_default")]
    if not blind:
        return ("every applied record beat the default schedule's measured latency"
                if tuned else "no record applied")
    return (f"no comparison possible for {', '.join(blind)}: the log has no default-schedule "
            "latency (meta.json default_us; re-run `attnforge tune` on it to measure); "
            "applied without comparison")


def apply_tuning_logs(mod: tvm.IRModule, target, path=None, *,
                      prepared: tvm.IRModule | None = None) -> tuple[tvm.IRModule, dict]:
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
        A record is applied only when it beats the default schedule's latency measured by
        ``tune`` (``meta.json`` ``default_us``); otherwise the function is ``default`` with
        reason "tuned record slower than default schedule (X us vs Y us)".  Logs without
        that latency are applied as before; ``report["default_comparison"]`` says so.

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
    db, other, n_used, tuned_names, cmp = _load(dirs, tag)
    if prepared is None:  # given by a caller that already legalized + fused (same passes)
        prepared = prepare_module(mod, tgt)
    with tgt, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(prepared)
    from .tuning_space import is_attention_space as is_space
    from .tuning_space import materialize_attention

    final, knobs = materialize_attention(applied)  # attention decisions -> real kernels

    ours = {str(r.workload.as_json()[0]) for r in db.get_all_tuning_records()}
    ours |= {h for h, c in cmp.items() if c["rejected"]}
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
        c = cmp.get(shash, {})
        entry["tuned_us"], entry["default_us"] = c.get("tuned_us"), c.get("default_us")
        entry["remeasured"] = c.get("confirmed", False)
        if name in knobs:
            entry["attention_knobs"] = knobs[name]
        if scheduled or not tvm_ffi.structural_equal(new, func):
            entry["status"], entry["reason"] = "tuned", None
            entry["compared_to_default"] = c.get("default_us") is not None
            matched.add(shash)
        else:
            entry["status"] = "default"
            if c.get("rejected"):
                entry["reason"] = (f"tuned record slower than default schedule "
                                   f"({c['tuned_us']:.1f} us vs {c['default_us']:.1f} us)")
                matched.add(shash)
            elif not _has_blocks(func) and not is_space(func):
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
        "slower_than_default": [f["name"] for f in funcs if f["reason"]
                                and f["reason"].startswith("tuned record slower")],
        "default_comparison": _comparison_note(funcs),
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
    return final, report
