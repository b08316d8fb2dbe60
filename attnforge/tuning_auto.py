"""The tuning logs shipped in ``tuning_logs/<target-tag>/``, used by default by ``compile_model``.

``compile_model(tuning_logs=None)`` (the default) calls :func:`apply_shipped_logs`: when the
repository holds logs for the target's tag and at least one of their workloads (``meta.json``
task hashes) is a kernel of this model, the logs are applied exactly as with an explicit
``tuning_logs=path`` (same gate: a record is used only when it beat the default schedule);
otherwise nothing changes and the report says why.  ``tuning_logs=False`` opts out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import tvm

from .tuning_db import META_FILE, TuningLogError, find_log_dirs, read_meta, repo_log_root


def shipped_log_root(target) -> Path:
    """``tuning_logs/<target-tag>/`` of this checkout (``ATTNFORGE_TUNING_LOGS`` overrides)."""
    from .target import parse_target, target_tag

    return repo_log_root() / target_tag(parse_target(target))


def _logged_hashes(dirs: list[Path]) -> set[str]:
    out = set()
    for d in dirs:
        if (d / META_FILE).exists():
            out |= {t["workload_hash"] for t in read_meta(d).get("tasks", [])
                    if t.get("workload_hash")}
    return out


def apply_shipped_logs(mod: tvm.IRModule, target) -> tuple[tvm.IRModule | None, dict]:
    """``(module, report)``: the module legalized + fused (``prepare_module``) with matching
    shipped records applied (none may match: the report says so), or ``(None, report)`` when
    no logs are shipped for the target (build as without logs).  A log problem is reported,
    never raised."""
    from .target import target_tag
    from .tuning_apply import apply_tuning_logs, prepare_module, workload_hash

    root = shipped_log_root(target)
    base = {"applied": False, "auto": True, "logs_root": str(root)}
    if not root.exists():
        return None, {**base, "reason": f"no tuning logs shipped for {target_tag(target)} "
                      f"({root}): default schedules"}
    try:
        dirs = find_log_dirs(root)
        logged = _logged_hashes(dirs)
    except TuningLogError as e:
        return None, {**base, "reason": f"shipped tuning logs unusable ({e}): default schedules"}
    from .tuning_space import materialize_attention

    prepared = prepare_module(mod, target)  # legalized + fused once, used either way
    ours = {workload_hash(f) for _, f in prepared.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc)}
    if not ours & logged:
        return materialize_attention(prepared)[0], {
            **base, "reason": f"no shipped tuning record matches this model's kernels "
            f"({len(dirs)} log dir(s) under {root} checked): default schedules"}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, report = apply_tuning_logs(mod, target, root, prepared=prepared)
    except TuningLogError as e:
        return materialize_attention(prepared)[0], {
            **base, "reason": f"shipped tuning logs unusable ({e}): default schedules"}
    report.update(auto=True, logs_root=str(root), applied=bool(report["tuned"]),
                  warnings=[str(w.message) for w in caught])
    return out, report
