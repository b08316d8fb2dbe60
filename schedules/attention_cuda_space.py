"""The CUDA tensor-core fused attention kernel as a MetaSchedule design space.

The CUDA twin of :mod:`.attention_cpu_space` (read that module first: same mechanism).  The
kernel (:mod:`.attention_cuda`) is generated from Python parameters, and its knobs are:

* ``block_q`` (64, 128): query rows per thread block;
* ``block_kv`` (32, 64, 128): keys per pipeline step; with ``block_q`` it also sets the
  block-sparse layout arrays the kernel reads;
* ``warp_rows`` (16, 32): query rows per warp, so ``block_q // warp_rows`` warps per block
  (2 to 8); 16 keeps Q's mma fragments in registers, 32 (FlashAttention-2's layout) re-reads Q
  from shared memory and halves the shared-memory traffic per mma;
* ``num_stages`` (1, 2, 3): depth of the ``cp.async`` K/V ring in shared memory (1: no
  overlap of the next tile's copy with this tile's math).

There is no separate unroll knob: every loop over register fragments is fully unrolled by
construction (a register array indexed by a loop variable lives in local memory, i.e. spills),
so the unroll factors follow from ``block_kv``, ``warp_rows`` and the head dim.

As on the CPU, the generated kernel's body is wrapped in a root ``sblock`` annotated with
``schedule_rule = "attnforge_attention_cuda"`` and the generator's arguments; the rule
registered for the ``cuda`` target key (:func:`attention_space_rule`) draws each knob with
``sch.sample_categorical`` and annotates it; :func:`materialize` calls the generator again with
the decided knobs.  Invalid combinations (dynamic shared memory over the arch's limit, a
register tile that ptxas would spill, a block larger than the query length allows) are
rejected by the :class:`ValidateAttentionKnobs` postprocessor before anything is built, which
is how MetaSchedule's evolutionary search filters candidates.
"""

from __future__ import annotations

import itertools
import json

import tvm
from tvm import tirx

from . import attention_cpu_space as _cpu
from .attention_cpu_space import (  # noqa: F401 - re-exported: shared with the CPU space
    ARGS_KEY,
    INFO_CAP,
    INFO_FUNC,
    decode_args,
    kernel_args_json,
    layout_arrays,
)

RULE_NAME = "attnforge_attention_cuda"
KNOBS = {"block_q": (64, 128), "block_kv": (32, 64, 128), "warp_rows": (16, 32),
         "num_stages": (1, 2, 3)}
DEFAULTS = {"block_q": 128, "block_kv": 64, "warp_rows": 16, "num_stages": 2}  # the generator's
# Dynamic shared memory one block may use (cudaFuncAttributeMaxDynamicSharedMemorySize).
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
# Budget of the register-tile estimate (:func:`register_estimate`), calibrated with ptxas
# (nvcc 13.0, sm_80 and sm_90, D = 64 and 128, causal and windowed): every point under it
# compiled without register-tile spills (once ptxas chose 168 registers + a 4-byte spill by
# its own heuristics); above it ptxas sits at 255 registers and spills for some stage counts.
REG_BUDGET = 200


# ----------------------------------------------------------------- validity
def shared_memory(args: dict, knobs: dict) -> int:
    """Dynamic shared memory (bytes) of one thread block for these knobs."""
    from .attention_cuda import shared_memory_bytes

    D = int(args["head_dim"])
    Dv = int(args.get("v_head_dim") or D)
    return shared_memory_bytes(D, Dv, knobs["block_q"], knobs["block_kv"], knobs["num_stages"],
                               knobs["warp_rows"])


def register_estimate(args: dict, knobs: dict) -> int:
    """32-bit registers per thread of the kernel's register tiles (no addresses/indices):
    fp32 score and output accumulators, the packed P fragments, Q fragments when they stay in
    registers.  A ranking, not ptxas's count: compare it with :data:`REG_BUDGET`."""
    D = int(args["head_dim"])
    Dv = int(args.get("v_head_dim") or D)
    mt = knobs["warp_rows"] // 16  # m16 tiles per warp
    scores = mt * knobs["block_kv"] // 2  # S accumulators (fp32), per thread
    probs = scores // 2  # P re-packed as 16-bit pairs
    out = mt * Dv // 2  # O accumulators (fp32)
    q = D // 4 if mt == 1 else 4 * mt
    return scores + probs + out + q


def check_knobs(args: dict, knobs: dict) -> str | None:
    """Why ``knobs`` is not a valid kernel for ``args`` (``None``: valid)."""
    from .attention_cuda import check_cuda_tiles

    arch = str(args.get("arch", "sm_90"))
    D = int(args["head_dim"])
    Dv = int(args.get("v_head_dim") or D)
    try:
        check_cuda_tiles(D, Dv, knobs["block_q"], knobs["block_kv"], knobs["num_stages"],
                         knobs["warp_rows"])
    except ValueError as e:
        return str(e)
    smem, limit = shared_memory(args, knobs), SMEM_LIMIT.get(arch, 99 * 1024)
    if smem > limit:
        return f"shared memory {smem} B > {limit} B on {arch}"
    regs = register_estimate(args, knobs)
    if regs > REG_BUDGET:
        return f"register tile estimate {regs} > {REG_BUDGET} (ptxas would spill)"
    if knobs["block_q"] > 64 and int(args["q_len"]) <= 64:
        return f"block_q {knobs['block_q']} > q_len {args['q_len']}: idle warps"
    return None


def knob_candidates(args: dict) -> dict[str, list[int]]:
    """Values each knob may take for this kernel (the generator's own values included)."""
    return {k: sorted(set(vals) | {int(args.get(k, DEFAULTS[k]))}) for k, vals in KNOBS.items()}


def valid_configs(args: dict) -> list[dict]:
    """Every valid knob combination of the space for ``args`` (grid order)."""
    cands = knob_candidates(args)
    out = []
    for combo in itertools.product(*cands.values()):
        knobs = dict(zip(cands, combo))
        if check_knobs(args, knobs) is None:
            out.append(knobs)
    return out


def default_knobs(args: dict) -> dict:
    """The generator's own knobs (what an untuned build uses)."""
    return {k: int(args.get(k, DEFAULTS[k])) for k in KNOBS}


# ----------------------------------------------------------------- the space itself
def design_space_attrs(**kw) -> dict:
    """Function attributes a generated CUDA kernel carries so it can become a design space:
    ``{ARGS_KEY: json}``, or ``{}`` when it cannot be replayed (static mask, score mod)."""
    if kw.get("score_mod") is not None:
        return {}
    kw.pop("score_mod", None)
    args = kernel_args_json(**kw)
    return {} if args is None else {ARGS_KEY: args}


_root = _cpu._root


def is_space(func) -> bool:
    """Whether ``func`` is a CUDA attention design-space workload (annotated root block)."""
    return _cpu.is_space_of(func, RULE_NAME)


def _is_cuda_kernel_args(text) -> bool:
    try:
        return "arch" in json.loads(str(text))
    except (TypeError, ValueError):
        return False


def as_design_space(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The tuning workload of a generated CUDA kernel (None: not replayable / not ours)."""
    if is_space(func):
        return func
    args = func.attrs.get(ARGS_KEY) if func.attrs is not None else None
    if args is None or _root(func) is not None or not _is_cuda_kernel_args(args):
        return None
    return _cpu.wrap_as_space(func, RULE_NAME, args)


def unwrap(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The generated kernel again (hand-scheduled: dlight must leave it alone)."""
    if not is_space(func):
        return func
    return func.with_body(_root(func).body).with_attr("tirx.is_scheduled", True)


def decisions(func) -> dict | None:
    """The knob values a replayed trace annotated, or None (no decision: untuned)."""
    return _cpu.knob_decisions(func, KNOBS) if is_space(func) else None


def attention_space_rule(sch, block, force: dict | None = None):
    """MetaSchedule rule: sample ``block_q``, ``block_kv``, ``warp_rows``, ``num_stages``;
    annotate the root block.  ``force`` fixes the decisions (the default schedule)."""
    args = decode_args(sch.get(block).annotations[ARGS_KEY])
    return _cpu.sample_knobs(sch, block, knob_candidates(args), force)


tvm.register_global_func(f"s_tir.meta_schedule.cuda.{RULE_NAME}", attention_space_rule,
                         override=True)


def default_space_schedule(func):
    """Schedule (with trace) of the space at the generator's own knobs: the untuned kernel."""
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    args = decode_args(_root(func).annotations[ARGS_KEY])
    attention_space_rule(sch, sch.get_sblock("root"), default_knobs(args))
    return sch


def materialize_kwargs(func) -> dict | None:
    """``fused_attention_cuda`` keyword arguments of a decided space function (None when
    undecided; ValueError for decisions :func:`check_knobs` rejects).  Passing them to
    ``fused_attention_cuda_reference_tir`` gives the candidate's CPU-buildable emulation."""
    dec = decisions(func)
    if dec is None:
        return None
    kw = decode_args(_root(func).annotations[ARGS_KEY])
    why = check_knobs(kw, dec)
    if why is not None:
        raise ValueError(f"attention knobs {dec} are not a valid CUDA kernel: {why}")
    kw.update(dec)
    return kw


def materialize(func) -> tuple[tirx.PrimFunc, object, dict] | None:
    """Kernel for a space function's decisions: ``(PrimFunc, BlockMask, decisions)``
    (the PrimFunc keeps ``func``'s attributes and is marked scheduled); None when undecided.
    Raises ValueError for decisions :func:`check_knobs` rejects."""
    from .attention_cuda import fused_attention_cuda

    dec = decisions(func)
    if dec is None:
        return None
    kw = materialize_kwargs(func)
    new, bm = fused_attention_cuda(**kw)
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs.update(design_space_attrs(**kw))
    attrs["tirx.is_scheduled"] = True
    return new.with_attr(attrs), bm, dec


def info_func(func) -> tirx.PrimFunc:
    """The kernel's arguments (with its decisions) as a PrimFunc for the tuning runner; see
    :func:`attnforge.schedules.attention_cpu_space.info_func` (same payload and name)."""
    kw = json.loads(str(_root(func).annotations[ARGS_KEY]))
    kw.update(decisions(func) or {})
    return info_func_for(kw)


def info_func_for(kw: dict) -> tirx.PrimFunc:
    """An ``INFO_FUNC`` kernel writing ``kw`` (JSON, 0-terminated) into an int32 buffer on the
    GPU (one thread): the runner allocates the buffer on the candidate's device, as on llvm."""
    from tvm.script import tirx as T

    data = json.dumps(kw, sort_keys=True).encode() + b"\0"
    if len(data) > INFO_CAP:
        raise ValueError(f"attention kernel arguments too long for {INFO_FUNC} ({len(data)} B)")

    @T.prim_func(private=True)
    def template(out: T.Buffer((INFO_CAP,), "int32")):
        for tx in T.thread_binding(1, thread="threadIdx.x"):
            out[0] = 0

    loop = template.body
    body = tirx.SeqStmt([tirx.BufferStore(loop.body.buffer, tirx.const(c, "int32"), [i])
                         for i, c in enumerate(data)])
    loop = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding,
                    loop.annotations)
    return template.with_body(loop).with_attr({"global_symbol": INFO_FUNC,
                                               "tir.noalias": True})


# ----------------------------------------------------------------- search
def _postproc_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.postproc import PyPostproc

    @derived_object
    class ValidateAttentionKnobs(PyPostproc):
        """Reject a candidate whose decisions :func:`check_knobs` refuses (before building)."""

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            func = sch.mod["main"]
            dec = decisions(func)
            if dec is None:
                return True
            return check_knobs(decode_args(_root(func).annotations[ARGS_KEY]), dec) is None

        def clone(self):
            return ValidateAttentionKnobs()

    return ValidateAttentionKnobs


def space_generator(seed: int = 0):
    """PostOrderApply for CUDA attention workloads: only the custom rule, the knob validator as
    the one postprocessor (TVM's CUDA postprocessors expect TVM-generated loop nests) and the
    CPU space's knob mutator."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(
        sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[_postproc_class()()],
        mutator_probs={_cpu._mutator_class()(seed): 1.0})
