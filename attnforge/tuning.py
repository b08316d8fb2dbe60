"""MetaSchedule tuning of attnforge models: ``tune`` and ``apply_tuning_logs``.

``tune`` imports the model and runs attnforge's passes as ``compile_model`` does, prepares the
module like TVM's legalize phase (:func:`~attnforge.tuning_apply.prepare_module`), extracts
the fused PrimFuncs as tasks (attnforge's CPU attention kernels as their design space,
:mod:`attnforge.schedules.attention_cpu_space`) and tunes them (evolutionary search, XGBoost
cost model, :mod:`attnforge.tuning_build`'s builder, a local or RPC runner) into a
``JSONDatabase`` plus ``meta.json``.  ``trials`` is the total budget of the work dir: a
rerun counts the records already there, so an interrupted job resumes where it stopped and a
finished one only re-measures its best records against the defaults (raise ``trials`` to
tune further).  See :mod:`attnforge.tuning_db` for the lock and layout.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm

from . import __version__
from .target import parse_target, target_tag
from .tuning_apply import apply_tuning_logs, prepare_module, workload_hash
from .tuning_db import (
    TuningError,
    TuningLockError,
    TuningLogError,
    TuningLogWarning,
    WorkDirLock,
    default_log_dir,
    read_log,
    read_meta,
    repair_tail,
    write_meta,
)
from .tuning_default import count_records, measure_and_seed, record_us, seed_shas, trace_sha
from .tuning_progress import catch_sigint, make_progress, quiet_tvm_console
from .tuning_space import local_run_evaluator, tune_contexts

__all__ = [
    "TuneResult",
    "TuningError",
    "TuningLockError",
    "TuningLogError",
    "TuningLogWarning",
    "apply_tuning_logs",
    "default_log_dir",
    "import_and_lower",
    "tune",
]


@dataclass
class TuneResult:
    """What a tuning job did; ``tasks`` holds per-task best latency (us) and trial counts."""

    work_dir: str
    workload: str
    target_tag: str
    trials_requested: int
    trials_run: int
    trials_in_db: int
    tasks: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    interrupted: bool = False
    frontend: str = ""
    runner: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _positive_int(name: str, v, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise TuningError(f"{name} must be a positive integer, got {v!r}")
    return v


def default_workload_name(model, example_inputs) -> str:
    """``<model class>-<shape of input 0>``, e.g. ``llamaforcausallm-1x512``."""
    shape = getattr(example_inputs[0], "shape", ()) if example_inputs else ()
    dims = "x".join(str(int(d)) for d in shape) or "scalar"
    return f"{type(model).__name__.lower()}-{dims}"


TUNE_PRECISIONS = {"llvm": ("float32",), "cuda": ("float32", "float16", "bfloat16")}


def import_and_lower(model, example_inputs, target, *, fuse_attention=True, block_q=None,
                     block_kv=64, precision: str = "float32") -> tuple[tvm.IRModule, str]:
    """Torch model -> lowered Relax module exactly as ``compile_model`` does; ``(mod, how)``.
    ``precision``: as ``compile_model``'s (the CUDA attention kernel needs fp16 or bf16)."""
    from attnforge.frontends import import_torch_model

    from .compiler import _lower

    kind = str(parse_target(target).kind.name)
    ok = TUNE_PRECISIONS.get(kind, ("float32",))
    if precision not in ok:
        raise TuningError(f"precision={precision!r}: tuning on {kind} supports "
                          f"{ok} (the build of other precisions adds passes tune does not run)")
    model.eval()
    mod = import_torch_model(model, tuple(example_inputs)).mod
    mod, _ = _lower(mod, target, fuse_attention, block_q, block_kv, precision=precision)
    return mod, "attnforge.frontends" + ("+attnforge.passes" if fuse_attention else "")


def _resolve_runner(runner, rpc, device_key, evaluator_config):
    from tvm.s_tir import meta_schedule as ms

    if rpc is not None:
        from .tuning_rpc import make_rpc_runner

        return make_rpc_runner(rpc, device_key, evaluator_config=evaluator_config)
    if isinstance(runner, ms.runner.RPCConfig):
        from .tuning_rpc import make_rpc_runner

        return make_rpc_runner((runner.tracker_host, runner.tracker_port), runner.tracker_key,
                               session_timeout_sec=runner.session_timeout_sec,
                               evaluator_config=evaluator_config)
    if isinstance(runner, ms.runner.Runner):
        return runner, {"kind": type(runner).__name__}
    if runner == "local":  # created later (it spawns a worker): after the lock is taken
        return None, {"kind": "local"}
    raise TuningError(f"runner={runner!r}: use 'local', an ms.runner.RPCConfig, an "
                      "ms.runner.Runner, or rpc=(host, port) with device_key=")


def tune(model, example_inputs, target="llvm", *, trials: int, work_dir=None,
         runner="local", rpc=None, device_key: str | None = None,
         max_trials_per_task: int | None = None, progress: bool = True,
         workload: str | None = None, num_trials_per_iter: int = 64,
         seed: int | None = None, callbacks: Sequence[Callable[[dict], None]] = (),
         fuse_attention: bool = True, block_q: int | None = None, block_kv: int = 64,
         mod: tvm.IRModule | None = None, only: Sequence[str] | None = None,
         measure_defaults: bool = True, confirm_rounds: int = 3,
         precision: str = "float32") -> TuneResult:
    """Tune a PyTorch model's kernels with MetaSchedule and record them in a log directory.

    Args:
        model, example_inputs: as for ``compile_model`` (``model`` unused when ``mod`` given).
        target: a target spec (``"llvm"``, ``"cuda:sm_90"``, dict, Target).
        trials: total trial budget of the work dir (records already there count).
        work_dir: log directory; default ``tuning_logs/<target-tag>/<workload>/``.
        runner: ``"local"``, an ``ms.runner.RPCConfig`` or an ``ms.runner.Runner``.
        rpc, device_key: ``("host", port)`` of an RPC tracker and the servers' key.
        max_trials_per_task: per-task cap (default: no cap beyond ``trials``).
        progress: tqdm bar (tasks, trials, best latency); TVM's logs go to work_dir/logs.
        workload: directory name of the default work dir (default: model class + shape).
        callbacks: called with a progress dict after each measured batch; raising
            ``KeyboardInterrupt`` stops the job like Ctrl-C (records kept, rerun resumes).
        mod: an already lowered Relax module to tune instead of importing ``model``.
        only: tune only tasks whose name contains one of these strings (e.g. ``["matmul"]``:
            spend the budget on the GEMMs, leave the rest to the default schedules).
        measure_defaults: first build and run each task's default schedule (our CPU rules on
            llvm, dlight on CUDA) with the same builder and runner; its latency goes to
            ``meta.json`` (``tasks[i]["default_us"]``) and its trace into the database as a
            seed record (not counted as a trial), so ``apply_tuning_logs`` applies a tuned
            record only when it beats the default.  Measured once per work dir and workload.
        confirm_rounds: at the end of every job, each task's best record and its default are
            built again and run alternately this many times (min kept; ``meta.json``
            ``default_confirm``); the gate then compares those two numbers (the first ones
            were measured minutes apart, under whatever load the host had).  0: skip.
        precision: ``compile_model``'s ``precision`` the log is for (``"float16"`` or
            ``"bfloat16"`` on CUDA: the fused attention kernel exists only in those).

    Raises:
        TuningError (ValueError): bad ``trials``/``max_trials_per_task``/``runner``/``rpc``/
            ``device_key``, no tunable task, the work dir locked by another job, or a CUDA
            target with the local runner on a machine without a CUDA device.
        TargetError: unknown ``target``.
        KeyboardInterrupt: re-raised after ``meta.json`` is written (``status: interrupted``).
    """
    from tvm.s_tir import meta_schedule as ms
    from .tuning_build import make_builder

    _positive_int("trials", trials)
    _positive_int("max_trials_per_task", max_trials_per_task, allow_none=True)
    _positive_int("num_trials_per_iter", num_trials_per_iter)
    if isinstance(only, str):
        only = [only]
    tgt = parse_target(target)
    tag = target_tag(tgt)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40)
    ms_runner, runner_info = _resolve_runner(runner, rpc, device_key, evaluator)
    if ms_runner is None:  # the local runner measures on this machine's device
        _check_local_device(tgt)
    if mod is None:
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) \
            else (example_inputs,)
        workload = workload or default_workload_name(model, example_inputs)
    else:
        workload = workload or "module"
    wdir = Path(work_dir) if work_dir else default_log_dir(tgt, workload)
    wdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lock = WorkDirLock(wdir)
    lock.acquire()  # before the slow steps: a second job fails fast
    try:
        old_meta = read_meta(wdir)
    except TuningLogError:
        old_meta = {}
    runs = list(old_meta.get("runs", []))  # history of earlier jobs in this dir
    seeds = seed_shas(old_meta)
    defaults = {t["workload_hash"]: {k: v for k, v in t.items() if k.startswith("default_")}
                for t in old_meta.get("tasks", []) if t.get("workload_hash")}
    status, trials_run, bar, tasks, names, hashes, how = "running", 0, None, [], [], [], ""
    state: dict = {}
    try:
        if mod is None:
            mod, how = import_and_lower(model, example_inputs, tgt,
                                        fuse_attention=fuse_attention, block_q=block_q,
                                        block_kv=block_kv, precision=precision)
        else:
            how = "given IRModule"
        tasks = _extract(mod, tgt, workload, tag, only)
        hashes = [workload_hash(t.dispatched[0]["main"]) for t in tasks]
        names = [t.task_name for t in tasks]
        repair_tail(wdir)
        if ms_runner is None:
            ms_runner = ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=60,
                                              f_run_evaluator=local_run_evaluator)
        write_meta(wdir, _keep_tasks(_meta(tgt, tag, workload, how, trials, runner_info, status,
                                           names, hashes, tasks, defaults), old_meta, hashes))
        if measure_defaults:
            defaults.update(_measure_defaults(wdir, tasks, hashes, tgt, ms_runner, defaults))
            seeds |= {d["default_trace_sha256"] for d in defaults.values()
                      if d.get("default_trace_sha256")}
            write_meta(wdir, _keep_tasks(_meta(tgt, tag, workload, how, trials, runner_info,
                                               status, names, hashes, tasks, defaults),
                                         old_meta, hashes))
        before = count_records(wdir, tag, seeds)
        remaining = trials - sum(before.get(h, 0) for h in hashes)
        if remaining <= 0:
            status = "complete"
        else:
            cb, bar, _ = make_progress(remaining, names, progress, callbacks, state)
            # extracted_tasks_to_tune_contexts, with our design space for attention kernels
            contexts, weights = tune_contexts(tasks, str(wdir), seed=seed)
            quiet_tvm_console()
            old_sigint = catch_sigint(state)
            try:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(wdir),
                    max_trials_global=remaining, max_trials_per_task=max_trials_per_task,
                    num_trials_per_iter=min(num_trials_per_iter, remaining),
                    builder=make_builder(), runner=ms_runner, database="json",
                    cost_model="xgb", measure_callbacks=ms.measure_callback.MeasureCallback
                    .create("default") + [cb], task_scheduler="gradient")
                status = "complete"
            except BaseException as e:
                if not (state.get("interrupted") or isinstance(e, KeyboardInterrupt)):
                    raise
                status = "interrupted"
                raise KeyboardInterrupt("tuning interrupted; records so far are kept in "
                                        f"{wdir}; rerun to resume") from e
            finally:
                trials_run = state["done"]
                if old_sigint is not None:
                    signal.signal(signal.SIGINT, old_sigint)
        if measure_defaults and confirm_rounds and status == "complete":
            for h, c in _confirm(wdir, tasks, hashes, tgt, ms_runner, seeds,
                                 confirm_rounds).items():
                defaults.setdefault(h, {})["default_confirm"] = c
    finally:
        if bar is not None:
            bar.close()
        pool = getattr(ms_runner, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
        status = "failed" if status == "running" else status
        after = count_records(wdir, tag, seeds)
        tasks_out = _task_summary(wdir, tag, tasks, names, hashes, after, seeds, defaults)
        meta = _meta(tgt, tag, workload, how, trials, runner_info, status, names, hashes, tasks,
                     defaults)
        meta.update(tasks=tasks_out, trials_in_db=sum(after.get(h, 0) for h in hashes),
                    wall_time_s=round(time.time() - t0, 2), trials_run_last=trials_run)
        meta["runs"] = runs + [{"date": meta["date"], "status": status, "trials_run": trials_run,
                                "wall_time_s": meta["wall_time_s"], "runner": runner_info}]
        write_meta(wdir, _keep_tasks(meta, old_meta, hashes))
        lock.release()
    return TuneResult(str(wdir), workload, tag, trials, trials_run, meta["trials_in_db"],
                      tasks_out, time.time() - t0, status == "interrupted", how, runner_info)


def _check_local_device(tgt) -> None:
    """A CUDA target measured by the local runner needs a CUDA device here (fail fast)."""
    if tgt.kind.name == "cuda" and not tvm.cuda(0).exist:
        raise TuningError(f"target {target_tag(tgt)}: measuring candidates needs a CUDA device "
                          "and none is visible on this machine; run on a machine with a GPU, "
                          "or pass rpc=HOST:PORT and device_key= of an RPC tracker with a GPU "
                          "server registered (`attnforge tune ... --rpc HOST:PORT "
                          "--device-key KEY`)")


def _keep_tasks(meta: dict, old_meta: dict, hashes) -> dict:
    """Keep the ``meta.json`` entries of tasks an earlier job in this dir tuned and this one
    did not (e.g. another ``only=``): their default latencies gate their records."""
    meta["tasks"] = list(meta["tasks"]) + [t for t in old_meta.get("tasks", [])
                                           if t.get("workload_hash") not in set(hashes)]
    return meta


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _extract(mod, tgt, workload: str, tag: str, only=None) -> list:
    """Tunable MetaSchedule tasks of a lowered module (hand-written kernels left out)."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    from .tuning_apply import _has_blocks
    from .tuning_build import ensure_cpu_intrinsics, tuning_target

    prepared = prepare_module(mod, tgt)
    if tgt.kind.name == "llvm":
        ensure_cpu_intrinsics()
    from .tuning_space import is_attention_space as is_space

    tasks = [t for t in extract_tasks(prepared, tuning_target(tgt))
             if (_has_blocks(t.dispatched[0]["main"]) or is_space(t.dispatched[0]["main"]))
             and not _is_scheduled(t.dispatched[0]["main"])]
    if only:
        tasks = [t for t in tasks if any(s in t.task_name for s in only)]
    if not tasks:
        raise TuningError(f"no tunable task in {workload!r} for {tag}" +
                          (f" matching only={list(only)}" if only else
                           ": every kernel is hand-written or already scheduled"))
    return tasks


def _measure_defaults(wdir, tasks, hashes, tgt, runner, known) -> dict:
    """:func:`~attnforge.tuning_default.measure_and_seed`; a failure is recorded, not raised."""
    from .tuning_build import make_builder, tuning_target

    try:
        return measure_and_seed(wdir, tasks, hashes, tuning_target(tgt), make_builder(), runner,
                                known)
    except Exception as e:  # noqa: BLE001 - tuning still works; apply cannot compare then
        msg = str(e).strip().splitlines()
        err = f"measuring the default schedule failed: {msg[-1] if msg else repr(e)}"[:300]
        return {h: {"default_us": None, "default_error": err} for h in hashes
                if known.get(h, {}).get("default_us") is None}


def _confirm(wdir, tasks, hashes, tgt, runner, seeds, rounds) -> dict:
    """:func:`~attnforge.tuning_default.confirm_best`; a failure is recorded, not raised."""
    from .tuning_build import make_builder, tuning_target
    from .tuning_default import confirm_best

    try:
        return confirm_best(wdir, tasks, hashes, tuning_target(tgt), make_builder(), runner,
                            seeds, rounds)
    except Exception as e:  # noqa: BLE001 - the job's records stand; the gate uses them
        msg = str(e).strip().splitlines()
        return {h: {"error": (msg[-1] if msg else repr(e))[:300]} for h in hashes}


def _meta(tgt, tag, workload, how, trials, runner_info, status, names, hashes, tasks,
          defaults=None) -> dict:
    defaults = defaults or {}
    return {
        "attnforge_version": __version__,
        "tvm_version": tvm.__version__,
        "target": _plain(tgt.export()),
        "target_tag": tag,
        "workload": workload,
        "frontend": how,
        "trials_requested": trials,
        "status": status,
        "runner": runner_info,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": [{"name": n, "workload_hash": h, "weight": int(t.weight),
                   **defaults.get(h, {})} for n, h, t in zip(names, hashes, tasks)],
    }


def _plain(obj):
    """TVM Map/Array/Target attrs -> JSON-able Python values."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "Array":
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    return str(obj)


def _task_summary(wdir, tag, tasks, names, hashes, counts, seeds, defaults) -> list[dict]:
    """Per task: trials, best tuned latency (seed records left out) and the default's."""
    from .tuning_apply import record_target_tag

    best: dict[str, float] = {}
    if (wdir / "database_workload.json").exists():
        log = read_log(wdir)
        for idx, rec in log.records:
            if record_target_tag(log.record_target(rec)) != tag or trace_sha(rec[0]) in seeds:
                continue
            h, us = log.workloads[idx][0], record_us(rec)
            if us is not None and (h not in best or us < best[h]):
                best[h] = us
    out = []
    for t, name, h in zip(tasks, names, hashes):
        b = round(best[h], 3) if h in best else None
        out.append({"name": name, "weight": int(t.weight), "workload_hash": h,
                    "trials": counts.get(h, 0), "best_us": b, **defaults.get(h, {})})
    return out
