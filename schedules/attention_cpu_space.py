"""The fused CPU attention kernel as a MetaSchedule design space.

The kernel (:mod:`.attention_cpu`) is generated from Python parameters, so its knobs are not
loop splits of one fixed TIR: ``block_q`` (query rows per task = the vector width times the
lanes of the online softmax), ``block_kv`` (keys per step; with ``block_q`` it also sets the
block-sparse layout arrays the kernel reads) and ``rows`` (height of the unrolled register
micro-kernel).  MetaSchedule still searches them, as *decisions*:

* :func:`as_design_space` wraps a generated kernel's body in a root ``sblock`` annotated with
  ``schedule_rule = "attnforge_attention_cpu"`` and the generator's arguments (JSON, from the
  kernel's ``attnforge.kernel_args`` attribute).  That function is the tuning *workload*.
* The registered rule :func:`attention_space_rule` (MetaSchedule calls it for that block and
  for nothing else) draws each knob with ``sch.sample_categorical`` and records it with
  ``sch.annotate(root, "attnforge.<knob>", value)``.  A candidate is a replay of that trace
  with other decisions; a tuning record stores the decisions, so replaying it
  (``MetaScheduleApplyDatabase``) gives back the annotated workload.
* :func:`materialize` turns an annotated workload into the real kernel: the generator is
  called again with the decided knobs (plus the new ``BlockMask`` whose arrays replace the
  layout constants at the call site: ``attnforge.tuning_space``).  The tuning builder does
  the same for every candidate, so what is measured is exactly what a record applies.
* :class:`MutateAttentionKnob` lets the evolutionary search mutate these decisions (TVM's
  mutators only touch tile sizes, unroll annotations, parallel extents, compute locations).

XGBoost sees the same loop nest for every candidate of this workload (the knobs are
annotations until materialised), so for it the search is evolutionary/random sampling over
the small grid (27 points); the cost model still learns the other tasks of the job.
"""

from __future__ import annotations

import json

import tvm
from tvm import tirx

from .block_mask import BlockMask, MaskSpec

RULE_NAME = "attnforge_attention_cpu"
ARGS_KEY = "attnforge.kernel_args"  # func attr (generator) and root-block annotation (space)
KNOBS = {"block_q": (32, 64, 128), "block_kv": (32, 64, 128), "rows": (2, 4, 8)}
ANN_PREFIX = "attnforge."
INFO_FUNC = "attnforge_attention_args"  # built next to a candidate for the tuning runner
INFO_CAP = 4096  # bytes of the JSON the info function writes


# ----------------------------------------------------------------- generator arguments
def kernel_args_json(**kw) -> str | None:
    """JSON of ``fused_attention_cpu``'s arguments, or None when they cannot be replayed
    (a static mask array, symbolic sizes): such a kernel is not a design space."""
    mask = kw.pop("mask", None)
    mask = MaskSpec.full() if mask is None else mask
    if not isinstance(mask, MaskSpec) or mask.kind == "static":
        return None
    kw.pop("global_symbol", None)
    if kw.get("mask_input_shape") is not None:
        kw["mask_input_shape"] = list(kw["mask_input_shape"])
    kw["mask"] = {"kind": mask.kind, "q_offset": mask.q_offset, "min_diff": mask.min_diff,
                  "max_diff": mask.max_diff, "chunk": mask.chunk}
    try:
        return json.dumps(_plain(kw), sort_keys=True)
    except (TypeError, ValueError):
        return None


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, tirx.IntImm)):
        return int(v)
    if isinstance(v, (float, tirx.FloatImm)):
        return float(v)
    raise TypeError(f"not JSON-able: {v!r}")


def decode_args(text: str) -> dict:
    """Inverse of :func:`kernel_args_json`: keyword arguments of ``fused_attention_cpu``."""
    kw = json.loads(str(text))
    kw["mask"] = MaskSpec(**kw["mask"])
    if kw.get("mask_input_shape") is not None:
        kw["mask_input_shape"] = tuple(kw["mask_input_shape"])
    return kw


# ----------------------------------------------------------------- the space itself
def _root(func):
    body = func.body
    return body.block if isinstance(body, tvm.s_tir.SBlockRealize) else None


def is_space_of(func, rule_name: str) -> bool:
    """Whether ``func`` is a design-space workload of ``rule_name`` (annotated root block);
    shared with :mod:`.attention_cuda_space`."""
    root = _root(func) if isinstance(func, tirx.PrimFunc) else None
    return root is not None and str(root.annotations.get("schedule_rule", "")) == rule_name


def is_space(func) -> bool:
    """Whether ``func`` is an attention design-space workload (annotated root block)."""
    return is_space_of(func, RULE_NAME)


def wrap_as_space(func: tirx.PrimFunc, rule_name: str, args) -> tirx.PrimFunc:
    """``func``'s body under a root block annotated with ``rule_name`` and the generator's
    ``args`` (JSON): the tuning workload."""
    root = tvm.s_tir.SBlock([], [], [], "root", func.body,
                            annotations={"schedule_rule": rule_name, ARGS_KEY: str(args)})
    # MetaSchedule's flop counter cannot walk the kernel (Let nodes): give it the count
    flops = int(estimated_flops(decode_args(str(args))))
    # No global symbol: MetaSchedule keys a workload by the function named "main" (the build
    # names the kernel after its GlobalVar again). A hand-scheduled kernel must not stay
    # "scheduled" either, or task extraction drops it.
    return func.with_body(tvm.s_tir.SBlockRealize([], True, root)).with_attr(
        {"estimated_flops": flops, "tirx.noalias": True}).without_attr(
        "global_symbol").without_attr("tirx.is_scheduled")


def as_design_space(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The tuning workload of a generated kernel (None: no replayable ``attnforge.kernel_args``)."""
    if is_space(func):
        return func
    args = func.attrs.get(ARGS_KEY) if func.attrs is not None else None
    if args is None or _root(func) is not None:
        return None
    return wrap_as_space(func, RULE_NAME, args)


def estimated_flops(args: dict) -> float:
    """FLOPs of the two GEMMs over the visited blocks (FlashAttention's count)."""
    bm = BlockMask.from_spec(args["mask"], int(args["q_len"]), int(args["kv_len"]),
                             int(args["block_q"]), int(args["block_kv"]))
    return (2.0 * args["batch"] * args["q_heads"] * args["q_len"] * args["kv_len"]
            * (args["head_dim"] + (args.get("v_head_dim") or args["head_dim"]))
            * bm.visited_fraction)


def unwrap(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The generated kernel again (an untuned workload builds as the default kernel)."""
    return func.with_body(_root(func).body) if is_space(func) else func


def knob_candidates(args: dict) -> dict[str, list[int]]:
    """Values each knob may take for this kernel (the layout's own block sizes included)."""
    out = {}
    for k, vals in KNOBS.items():
        vals = sorted(set(vals) | {int(args.get(k, 4 if k == "rows" else 64))})
        out[k] = vals
    return out


def knob_decisions(func, knobs) -> dict | None:
    """The values of ``knobs`` a replayed trace annotated on ``func``'s root block (a space
    workload), or None when any is missing (untuned)."""
    ann = _root(func).annotations
    got = {k: int(ann[ANN_PREFIX + k]) for k in knobs if ANN_PREFIX + k in ann}
    return got if len(got) == len(knobs) else None


def sample_knobs(sch, block, candidates: dict, force: dict | None):
    """Draw each knob from its candidates (``force``: fixed decisions) and annotate ``block``
    with it; the body of both spaces' MetaSchedule rules."""
    for knob, cands in candidates.items():
        idx = None if force is None else cands.index(int(force[knob]))
        rv = sch.sample_categorical(cands, [1.0 / len(cands)] * len(cands), decision=idx)
        sch.annotate(block, ANN_PREFIX + knob, rv)
    return [sch]


def decisions(func) -> dict | None:
    """The knob values a replayed trace annotated, or None (no decision: untuned)."""
    return knob_decisions(func, KNOBS) if is_space(func) else None


def attention_space_rule(sch, block, force: dict | None = None):
    """MetaSchedule rule: sample ``block_q``, ``block_kv``, ``rows``; annotate the root block.

    ``force`` fixes the decisions (the default schedule: the layout's own block sizes)."""
    args = decode_args(sch.get(block).annotations[ARGS_KEY])
    return sample_knobs(sch, block, knob_candidates(args), force)


tvm.register_global_func(f"s_tir.meta_schedule.cpu.{RULE_NAME}", attention_space_rule,
                         override=True)


def default_space_schedule(func):
    """Schedule (with trace) of the space at the generator's own knobs: the untuned kernel."""
    mod = tvm.IRModule({"main": func})
    sch = tvm.s_tir.Schedule(mod)
    args = decode_args(_root(func).annotations[ARGS_KEY])
    force = {k: int(args.get(k, 4 if k == "rows" else 64)) for k in KNOBS}
    attention_space_rule(sch, sch.get_sblock("root"), force)
    return sch


def materialize(func) -> tuple[tirx.PrimFunc, BlockMask, dict] | None:
    """Kernel for a space function's decisions: ``(PrimFunc, BlockMask, decisions)``.

    The PrimFunc keeps ``func``'s attributes (global symbol); None when undecided."""
    from .attention_cpu import fused_attention_cpu

    dec = decisions(func)
    if dec is None:
        return None
    kw = decode_args(_root(func).annotations[ARGS_KEY])
    kw.update(dec)
    new, bm = fused_attention_cpu(**kw)
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs[ARGS_KEY] = kernel_args_json(**kw)
    return new.with_attr(attrs), bm, dec


def info_func(func) -> tirx.PrimFunc:
    """A PrimFunc writing the materialised kernel's arguments (JSON bytes, 0-terminated) into
    an int32 buffer: the tuning runner reads it to build the matching layout arrays."""
    kw = json.loads(str(_root(func).annotations[ARGS_KEY]))
    kw.update(decisions(func) or {})
    data = json.dumps(kw, sort_keys=True).encode() + b"\0"
    if len(data) > INFO_CAP:
        raise ValueError(f"attention kernel arguments too long for {INFO_FUNC} ({len(data)} B)")
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def template(out: T.Buffer((INFO_CAP,), "int32")):
        out[0] = 0

    store = template.body  # out[0] = 0: gives the parameter's buffer
    body = tirx.SeqStmt([tirx.BufferStore(store.buffer, tirx.const(c, "int32"), [i])
                         for i, c in enumerate(data)])
    return template.with_body(body).with_attr({"global_symbol": INFO_FUNC, "tir.noalias": True})


def layout_arrays(info: dict) -> list:
    """``kv_num_blocks, kv_indices, kv_is_full`` (numpy int32) for an info-function payload."""
    import numpy as np

    bm = BlockMask.from_spec(MaskSpec(**info["mask"]), int(info["q_len"]), int(info["kv_len"]),
                             int(info["block_q"]), int(info["block_kv"]))
    return [np.ascontiguousarray(a, dtype="int32")
            for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]


# ----------------------------------------------------------------- search
def _mutator_class():
    from tvm.s_tir.meta_schedule.mutator import PyMutator
    from tvm.ir.utils import derived_object

    @derived_object
    class MutateAttentionKnob(PyMutator):
        """Move one ``sample_categorical`` decision of the trace to another candidate."""

        def __init__(self, seed: int = 0):
            import random

            self.rng = random.Random(seed)

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, trace, _rand_state):
            insts = [i for i in trace.insts if i.kind.name == "SampleCategorical"
                     and i in trace.decisions]
            if not insts:
                return None
            inst = self.rng.choice(insts)
            n = len(inst.attrs[0])
            if n < 2:
                return None
            cur = int(trace.decisions[inst])
            new = self.rng.choice([i for i in range(n) if i != cur])
            return trace.with_decision(inst, new, remove_postproc=True)

        def clone(self):
            return MutateAttentionKnob(self.rng.randint(0, 1 << 30))

    return MutateAttentionKnob


def space_generator(seed: int = 0):
    """PostOrderApply for attention workloads: only the custom rule (the block's
    ``schedule_rule``), no postprocessors (they expect TVM-generated loop nests; the kernel's
    ``T.parallel``/dynamic kv loop are its own) and :class:`MutateAttentionKnob`."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(
        sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[],
        mutator_probs={_mutator_class()(seed): 1.0})
