"""Progress and interruption plumbing of a tuning job.

A MetaSchedule measure callback drives a tqdm bar (tasks, trials, best latency so far, failed
candidates) and the user's callbacks; TVM's own log lines stay in ``work_dir/logs``.  Ctrl-C
(or ``KeyboardInterrupt`` raised by a callback) crosses TVM's FFI as a plain ``RuntimeError``,
so it is flagged in the shared ``state`` dict, which ``tune`` reads.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence


def make_progress(total: int, names: list[str], enabled: bool, callbacks: Sequence[Callable],
                   state: dict):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    state.update(done=0, errors=0, best_us={}, trials=dict.fromkeys(names, 0))
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="trial", desc="tuning", dynamic_ncols=True)

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            name = names[task_id]
            for b, r in zip(builder_results, runner_results):
                secs = [float(s) for s in (r.run_secs or [])]
                if b.error_msg or r.error_msg or not secs:
                    state["errors"] += 1
                    continue
                us = 1e6 * sum(secs) / len(secs)
                state["best_us"][name] = min(state["best_us"].get(name, us), us)
            n = len(runner_results)
            state["done"] += n
            state["trials"][name] += n
            if bar is not None:
                bar.total = max(bar.total, state["done"])  # MS may finish a started round
                bar.update(n)
                best = state["best_us"].get(name)
                bar.set_postfix_str(f"task {task_id + 1}/{len(names)} {name[:28]} best "
                                    + (f"{best:.1f}us" if best else "-")
                                    + f" failed {state['errors']}")
            info = {"task": name, "task_id": task_id, "trials_done": state["done"],
                    "trials_total": total, "best_us": dict(state["best_us"]),
                    "failed": state["errors"]}
            try:
                for cb in callbacks:
                    cb(info)
            except KeyboardInterrupt:  # TVM's FFI turns it into a plain RuntimeError
                state["interrupted"] = True
                raise

    return _Progress(), bar, state


def quiet_tvm_console(before: bool = False) -> None:
    """Keep MetaSchedule's logs in work_dir/logs only (its dictConfig adds a stdout handler).

    ``before=True`` (ahead of its logger setup): its console handler takes the logger's current
    level, so set WARNING; the setup itself then puts the logger back to DEBUG for the files.
    """
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    for h in list(lg.handlers):
        if h.get_name() is None:  # MetaSchedule's dictConfig re-lists handlers by name
            lg.removeHandler(h)
        elif isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
    if before:
        lg.setLevel(logging.WARNING)


def catch_sigint(state: dict):
    """Ctrl-C during tuning: flag it (the FFI re-raises it as RuntimeError) and interrupt."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _handler(signum, frame):
        state["interrupted"] = True
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, _handler)
