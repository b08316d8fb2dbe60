"""Tuning attnforge's fused attention kernels through MetaSchedule (Relax side + runner).

The design spaces themselves are :mod:`attnforge.schedules.attention_cpu_space` (llvm) and
:mod:`attnforge.schedules.attention_cuda_space` (cuda); both expose the same functions
(``is_space``, ``as_design_space``, ``materialize``, ``unwrap``, ``info_func``,
``layout_arrays``, ``space_generator``), chosen here by target kind or by the workload's
``schedule_rule``.  This module

* :func:`mark_attention_spaces`: in a prepared Relax module, replaces each generated attention
  kernel of the target (CPU kernels on llvm, tensor-core kernels on cuda) by its design-space
  form (annotated root block), so that task extraction sees it as a workload and
  ``MetaScheduleApplyDatabase`` can replay a record on it;
* :func:`materialize_attention`: after the records are applied, regenerates each decided
  kernel with its block sizes and rewrites the layout constants (``kv_num_blocks``,
  ``kv_indices``, ``kv_is_full``) of its call sites; undecided ones become the default
  kernel again;
* :func:`build_candidate`: the same materialisation for a tuning candidate inside the
  builder, plus an info function the runner reads;
* :func:`local_run_evaluator` / :func:`rpc_run_evaluator`: TVM's evaluator, except that for an
  attention candidate the layout arguments are the real block-sparse layout of the decided
  block sizes (TVM's runner fills every argument with random data: random ``kv_indices``
  would read out of bounds).
"""

from __future__ import annotations

import json

import tvm


def _spaces():
    from attnforge.schedules import attention_cpu_space, attention_cuda_space

    return {"llvm": attention_cpu_space, "cuda": attention_cuda_space}


def space_for_target(target):
    """The design-space module of ``target``'s attention kernel, or None (no space)."""
    return _spaces().get(str(target.kind.name))


def space_of(func):
    """The design-space module ``func`` is a workload of, or None (not an attention space)."""
    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    return next((sp for sp in _spaces().values() if sp.is_space(func)), None)


def is_attention_space(func) -> bool:
    """Whether ``func`` is a fused-attention design-space workload (any target)."""
    return space_of(func) is not None


def mark_attention_spaces(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Attention kernels of ``target`` -> design-space workloads; other functions untouched."""
    sp = space_for_target(target)
    if sp is None:
        return mod
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not sp.is_space(func):
            new = sp.as_design_space(func)
            if new is not None:
                updates[gv] = new
    if not updates:
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(mod.functions,
                                                                                  attrs=mod.attrs)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def materialize_attention(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
    """Decided design-space kernels -> real kernels (call sites' layout constants rewritten);
    undecided ones -> the default kernel.  Returns ``(module, {function name: decisions})``."""
    from tvm import relax

    new_funcs, decided, undecided = {}, {}, {}
    for gv, func in mod.functions.items():
        sp = space_of(func)
        if sp is None:
            continue
        got = sp.materialize(func)
        if got is None:
            undecided[gv] = sp.unwrap(func)  # same signature: replaced in place
            continue
        prim, bm, dec = got
        layout = [relax.const(a.astype("int32")) for a in
                  (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
        new_funcs[gv] = (prim.with_attr("tirx.is_scheduled", True), layout)
        decided[gv.name_hint] = dec
    if undecided:
        mod = tvm.IRModule({gv: undecided.get(gv, f) for gv, f in mod.functions.items()},
                           attrs=mod.attrs)
    if not new_funcs:
        return mod, decided
    return _rewrite_calls(mod, new_funcs), decided


def _rewrite_calls(mod: tvm.IRModule, new_funcs: dict) -> tvm.IRModule:
    """Replace each old kernel by a new GlobalVar (its signature changed with the block sizes,
    and a GlobalVar carries its function's type) and rewrite the layout constants."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @mutator
    class _Rewriter(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.gvs = {}
            for gv, (prim, layout) in new_funcs.items():
                new_gv = self.builder_.add_func(prim, gv.name_hint + "_tuned")
                self.gvs[gv] = (new_gv, layout)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir or call.args[0] not in self.gvs:
                return call
            new_gv, layout = self.gvs[call.args[0]]
            args = call.args[1]
            if not isinstance(args, relax.Tuple) or len(args.fields) < 6:
                raise ValueError(f"attention call of {call.args[0].name_hint}: expected an "
                                 "inline argument tuple (Q, K, V, layout x3[, mask])")
            fields = list(args.fields)
            fields[3:6] = layout
            args = relax.Tuple(fields)
            return relax.Call(call.op, [new_gv, args] + list(call.args[2:]), call.attrs,
                              call.ty_args)

    rw = _Rewriter(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    out = rw.builder_.get()
    return tvm.IRModule({gv: f for gv, f in out.functions.items() if gv not in new_funcs},
                        attrs=out.attrs)


# ----------------------------------------------------------------- builder and runner
def build_candidate(mod: tvm.IRModule) -> tvm.IRModule:
    """Tuning builder hook: an attention workload ``main`` -> its real kernel (the decided one,
    or the default kernel when undecided) plus the info function (the runner needs the layout
    either way); any other module is returned unchanged."""
    func = mod["main"] if any(g.name_hint == "main" for g in mod.get_global_vars()) else None
    sp = space_of(func)
    if sp is None:
        return mod
    got = sp.materialize(func)
    if got is None:
        return tvm.IRModule({"main": sp.unwrap(func).with_attr("global_symbol", "main"),
                             sp.INFO_FUNC: sp.info_func(func)})
    prim, _, _ = got
    return tvm.IRModule({"main": prim.with_attr("global_symbol", "main"),
                         sp.INFO_FUNC: sp.info_func(func)})


def _attention_info(rt_mod, device) -> dict | None:
    sp = _spaces()["llvm"]  # INFO_FUNC / INFO_CAP: the same for both spaces
    try:
        f = rt_mod.get_function(sp.INFO_FUNC, query_imports=True)
    except Exception:  # noqa: BLE001 - not an attention candidate
        return None
    if f is None:
        return None
    import numpy as np

    buf = tvm.runtime.empty((sp.INFO_CAP,), "int32", device)
    f(buf)
    data = buf.numpy()
    n = int(np.argmax(data == 0))
    return json.loads(bytes(data[:n].astype(np.uint8)).decode())


def _fix_args(rt_mod, device, repeated_args):
    info = _attention_info(rt_mod, device)
    if info is None:
        return repeated_args
    layout = _spaces()["llvm"].layout_arrays(info)  # same BlockMask for both kernels
    out = []
    for args in repeated_args:
        args = list(args)
        args[3:6] = [tvm.runtime.tensor(a, device) for a in layout]
        out.append(args)
    return out


def local_run_evaluator(rt_mod, device, evaluator_config, repeated_args):
    """``LocalRunner`` evaluator: TVM's, with real layout arrays for attention candidates."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return run_evaluator_common(rt_mod, device, evaluator_config,
                                _fix_args(rt_mod, device, repeated_args))


def rpc_run_evaluator(session, rt_mod, device, evaluator_config, repeated_args):
    """``RPCRunner`` evaluator: as :func:`local_run_evaluator`, on the remote device."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return run_evaluator_common(rt_mod, device, evaluator_config,
                                _fix_args(rt_mod, device, repeated_args))


def tune_contexts(tasks, work_dir: str, seed=None):
    """``extracted_tasks_to_tune_contexts`` (post-order-apply, evolutionary), except that
    attention workloads get their space's generator (``space_generator`` of
    :mod:`~attnforge.schedules.attention_cpu_space` / ``attention_cuda_space``)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    from .tuning_progress import quiet_tvm_console

    # MetaSchedule's logger setup: its console handler at WARNING; an unnamed handler (left by
    # an earlier caller) would break its dictConfig
    quiet_tvm_console(before=True)
    contexts, weights = [], []
    loggers = get_loggers_from_work_dir(work_dir, [t.task_name for t in tasks])
    for task, logger, rand in zip(tasks, loggers, fork_seed(seed, n=len(tasks))):
        func = task.dispatched[0]["main"]
        sp = space_of(func)
        space = sp.space_generator(rand) if sp is not None else "post-order-apply"
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target,
                                       space_generator=space, search_strategy="evolutionary",
                                       task_name=task.task_name, logger=logger,
                                       rand_state=rand, num_threads="physical").clone())
        weights.append(task.weight)
    return contexts, weights
