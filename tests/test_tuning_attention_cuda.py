"""The CUDA tensor-core fused attention as a MetaSchedule design space, tested without a GPU:
knobs and validity rules; MetaSchedule's task extraction for a cuda target gives the attention
task our rule's space; candidates build for sm_90 / sm_80 with tensor-core ``mma`` in the PTX,
no register-tile spills and shared memory within the arch's limit (nvcc / ptxas); candidate
numerics through the kernel's TIR emulation (vs float64); a record applies and builds; and
``attnforge tune --target cuda`` on a machine without a GPU stops with a clear error."""

import itertools
import json
import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from attnforge import cuda_aot
from attnforge.schedules import attention_cuda_space as sp
from attnforge.schedules.attention_cuda import (
    cuda_target,
    fused_attention_cuda,
    fused_attention_cuda_reference_tir,
)
from attnforge.schedules.block_mask import MaskSpec

needs_nvcc = pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None, reason="needs nvcc")
no_gpu = pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a GPU")

SITES = {"causal": MaskSpec.causal(), "window": MaskSpec.sliding_window(200)}


def _kernel(mask, arch="sm_90", n=2048, d=64, **kw):
    return fused_attention_cuda(batch=1, q_heads=8, kv_heads=2, q_len=n, kv_len=n, head_dim=d,
                                mask=mask, arch=arch, **kw)


def _space(mask, **kw):
    func, bm = _kernel(mask, **kw)
    space = sp.as_design_space(func)
    assert space is not None and sp.is_space(space)
    return func, space


def _forced(space, knobs):
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": space}))
    sp.attention_space_rule(sch, sch.get_sblock("root"), knobs)
    return sch


def _cover(configs):
    """Greedy stratified sample: few configs that together take every value of every knob."""
    todo = {(k, v) for c in configs for k, v in c.items()}
    out = []
    while todo:
        best = max(configs, key=lambda c: len(todo & set(c.items())))
        out.append(best)
        todo -= set(best.items())
    return out


# ----------------------------------------------------------------- the space itself
def test_space_wraps_kernel_knobs_and_validity():
    func, space = _space(SITES["causal"])
    root = space.body.block
    assert str(root.annotations["schedule_rule"]) == sp.RULE_NAME
    assert "tirx.is_scheduled" not in space.attrs  # else task extraction would drop it
    assert int(space.attrs["estimated_flops"]) > 0 and sp.decisions(space) is None
    unwrapped = sp.unwrap(space)
    assert bool(unwrapped.attrs["tirx.is_scheduled"])  # dlight leaves the default kernel alone
    tvm.ir.assert_structural_equal(unwrapped.body, func.body)
    # the default schedule replays to the generator's own kernel
    sch = sp.default_space_schedule(space)
    assert sp.decisions(sch.mod["main"]) == sp.DEFAULTS
    prim, _, _ = sp.materialize(sch.mod["main"])
    tvm.ir.assert_structural_equal(prim, func.without_attr("global_symbol").with_attr(
        dict(prim.attrs)))
    # validity: shared memory per arch, register tiles, kernel constraints
    args = sp.decode_args(func.attrs[sp.ARGS_KEY])
    big = {"block_q": 128, "block_kv": 128, "warp_rows": 16, "num_stages": 3}
    args128 = {**args, "head_dim": 128, "v_head_dim": 128}
    assert sp.check_knobs({**args128, "arch": "sm_90"}, big) is None
    assert "shared memory" in sp.check_knobs({**args128, "arch": "sm_80"}, big)
    assert "register" in sp.check_knobs(args128, {**big, "warp_rows": 32, "num_stages": 1})
    assert "idle warps" in sp.check_knobs({**args, "q_len": 60}, big)
    configs = sp.valid_configs(args)
    assert sp.DEFAULTS in configs and len(configs) < 36  # some of the 36 points are invalid
    assert {c["warp_rows"] for c in configs} == {16, 32}
    assert {c["num_stages"] for c in configs} == {1, 2, 3}
    # a static mask or a score mod cannot be replayed from JSON: no space
    static, _ = fused_attention_cuda(1, 1, 1, 64, 64, 64, mask=MaskSpec.static(
        np.tril(np.ones((64, 64), bool))), mask_input="bool", mask_input_shape=(64, 64))
    assert sp.as_design_space(static) is None
    # a CPU kernel is not a CUDA space
    from attnforge.schedules.attention_cpu import fused_attention_cpu

    cpu, _ = fused_attention_cpu(1, 2, 2, 64, 64, 16, mask=MaskSpec.causal())
    assert sp.as_design_space(cpu) is None


def _relax_attention(mask, n=256, d=64, arch="sm_90"):
    """What LowerAttentionToTIR emits for cuda: call_tir + BlockMask constants."""
    from tvm import relax

    prim, bm = fused_attention_cuda(batch=1, q_heads=4, kv_heads=2, q_len=n, kv_len=n,
                                    head_dim=d, mask=mask, arch=arch)
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, 4, n, d), "float16"))
    kv = [relax.Var(x, relax.TensorType((1, 2, n, d), "float16")) for x in "kv"]
    with bb.function("main", [q, *kv]):
        with bb.dataflow():
            gv = bb.add_func(prim, "fused_attention_cuda")
            ins = [q, *kv] + [relax.const(a) for a in
                              (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
            o = bb.emit(relax.call_tir(gv, relax.Tuple(ins),
                                       out_ty=relax.TensorType((1, 4, n, d), "float16")))
            out = bb.emit_output(o)
        bb.emit_func_output(out)
    return bb.get()


def test_task_extraction_for_cuda_gives_our_design_space():
    """MetaSchedule's extract_tasks on the prepared cuda module finds the attention kernel as a
    task, and the job's tune context (and a plain PostOrderApply with ApplyCustomRule, which
    looks the rule up under the target's ``cuda`` key) generate our knobs as its space."""
    from tvm.s_tir import meta_schedule as ms

    from attnforge.tuning import _extract
    from attnforge.tuning_build import ensure_cpu_intrinsics
    from attnforge.tuning_space import is_attention_space, space_of, tune_contexts

    ensure_cpu_intrinsics()  # TuneContext imports every tensor intrinsic otherwise (~30 s)
    tgt = cuda_target("sm_90")
    tasks = _extract(_relax_attention(SITES["causal"]), tgt, "attn", "cuda-sm_90")
    (task,) = [t for t in tasks if is_attention_space(t.dispatched[0]["main"])]
    assert space_of(task.dispatched[0]["main"]) is sp
    assert tvm.get_global_func(f"s_tir.meta_schedule.cuda.{sp.RULE_NAME}") is not None
    contexts, _ = tune_contexts([task], "/tmp", seed=0)
    plain = ms.TuneContext(mod=task.dispatched[0], target=tgt, task_name="plain",
                           space_generator=ms.space_generator.PostOrderApply(
                               sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[],
                               mutator_probs={}))
    for ctx in (contexts[0], plain):
        (space,) = ctx.generate_design_space()
        insts = [i for i in space.trace.insts if i.kind.name == "SampleCategorical"]
        assert [list(map(int, i.attrs[0])) for i in insts] == [
            sorted(v) for v in sp.KNOBS.values()]
        assert set(sp.decisions(space.mod["main"])) == set(sp.KNOBS)


# ----------------------------------------------------------------- candidates through nvcc
def _expected_mma(args, knobs):
    d, dv = args["head_dim"], args.get("v_head_dim") or args["head_dim"]
    mt = knobs["warp_rows"] // 16  # QK^T + PV per kv block, fully unrolled, per m16 tile
    return ((d // 16) * (knobs["block_kv"] // 8) + (knobs["block_kv"] // 16) * (dv // 8)) * mt


def _check_candidate(site, arch, knobs, d=64):
    func, space = _space(SITES[site], arch=arch, d=d)
    sch = _forced(space, knobs)
    assert sp.decisions(sch.mod["main"]) == knobs
    prim, bm, _ = sp.materialize(sch.mod["main"])
    assert (bm.block_q, bm.block_kv) == (knobs["block_q"], knobs["block_kv"])
    lib = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}),
                      target=cuda_target(arch))
    (src,) = cuda_aot.cuda_sources(lib)
    nt = knobs["block_q"] // knobs["warp_rows"] * 32
    assert f"__launch_bounds__({nt})" in src  # warps per block as decided
    ptx = cuda_aot.compile_source(src, arch, "ptx").decode()
    n_mma = ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
    args = sp.decode_args(func.attrs[sp.ARGS_KEY])
    assert n_mma == _expected_mma(args, knobs), (knobs, n_mma)
    assert "ldmatrix.sync.aligned" in ptx and "cp.async.cg.shared.global" in ptx
    assert f"cp.async.wait_group {knobs['num_stages'] - 1}" in ptx
    _, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
    (rep,) = cuda_aot.ptxas_report(log).values()
    # No spilled register tiles (those are hundreds of bytes at 255 registers).  ptxas may
    # still choose to spill a word or two well below the register limit (seen once: sm_90,
    # D=64, 64/128/16/2 at N=2048: 168 registers, 4 B; none with -maxrregcount=255).
    assert rep["registers"] <= 255, (knobs, rep)
    assert rep["spill_stores"] == 0 or (rep["registers"] < 200 and rep["spill_stores"] <= 8), (
        knobs, rep)
    dyn = sp.shared_memory(args, knobs)
    assert f"store i64 {dyn}," in lib.mod.inspect_source("ll")  # launched with this smem
    assert dyn + rep["smem_static"] <= sp.SMEM_LIMIT[arch], (knobs, dyn)
    return rep


def _site_configs(site, arch, d=64):
    func, _ = _kernel(SITES[site], arch=arch, d=d)
    return sp.valid_configs(sp.decode_args(func.attrs[sp.ARGS_KEY]))


@needs_nvcc
@pytest.mark.parametrize("site,arch", [("causal", "sm_90"), ("window", "sm_80")])
def test_stratified_candidates_build_with_tensor_cores(site, arch):
    """Every value of every knob at least once per (site, arch) (3 kernels each)."""
    for knobs in _cover(_site_configs(site, arch)):
        _check_candidate(site, arch, knobs)


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("site,arch,d", list(itertools.product(SITES, ("sm_90", "sm_80"),
                                                                (64, 128))))
def test_every_candidate_builds_with_tensor_cores(site, arch, d):
    for knobs in _site_configs(site, arch, d):
        _check_candidate(site, arch, knobs, d=d)


# ----------------------------------------------------------------- candidate numerics
def _reference(q, k, v, allowed, scale):
    g = q.shape[1] // k.shape[1]
    k, v = (np.repeat(a.astype(np.float64), g, 1) for a in (k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) * scale
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _check_numerics(site, knobs, seed):
    """The candidate's own generator arguments, built as the TIR emulation of every PTX op
    (how tests/schedules/test_attention_cuda.py checks the kernel) and run on the CPU."""
    mask = SITES[site] if site == "causal" else MaskSpec.sliding_window(37)
    shape = dict(batch=2, q_heads=4, kv_heads=2, q_len=150, kv_len=150, head_dim=32)
    func, _ = fused_attention_cuda(**shape, mask=mask, arch="sm_90")
    kw = sp.materialize_kwargs(_forced(sp.as_design_space(func), knobs).mod["main"])
    assert {k: kw[k] for k in knobs} == knobs
    emu, bm = fused_attention_cuda_reference_tir(**kw)
    lib = tvm.compile(tvm.IRModule({"main": emu}), target="llvm")
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 150, 32)).astype(np.float16)
    k, v = (rng.standard_normal((2, 2, 150, 32)).astype(np.float16) for _ in range(2))
    out = np.full((2, 4, 150, 32), np.nan, np.float16)  # poisoned: unwritten elements show
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in
            (q, k, v, bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full, out)]
    lib["main"](*args)
    got = args[-1].numpy().astype(np.float64)
    ref = _reference(q, k, v, mask.dense(150, 150)[None], 1 / math.sqrt(32))
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("site,knobs", [
    ("causal", {"block_q": 64, "block_kv": 32, "warp_rows": 32, "num_stages": 3}),
    ("window", {"block_q": 128, "block_kv": 64, "warp_rows": 16, "num_stages": 1}),
])
def test_candidate_numerics_match_float64(site, knobs):
    _check_numerics(site, knobs, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("site", list(SITES))
def test_stratified_candidate_numerics_slow(site):
    func, _ = fused_attention_cuda(2, 4, 2, 150, 150, 32, mask=SITES[site], arch="sm_90")
    for i, knobs in enumerate(_cover(sp.valid_configs(sp.decode_args(
            func.attrs[sp.ARGS_KEY])))):
        _check_numerics(site, knobs, seed=i)


# ----------------------------------------------------------------- records applied
def _synthetic_log(d, mod, knobs, tuned_us, default_us):
    """One record of the attention workload with ``knobs`` and a meta.json default."""
    from tvm.s_tir import meta_schedule as ms

    from attnforge.tuning_apply import prepare_module, workload_hash

    tgt = cuda_target("sm_90")
    ((name, func),) = [(gv.name_hint, f) for gv, f in prepare_module(mod, tgt).functions.items()
                       if isinstance(f, tvm.tirx.PrimFunc) and sp.is_space(f)]
    wmod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    d.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(d))
    wl = db.commit_workload(wmod)
    db.commit_tuning_record(ms.database.TuningRecord(
        _forced(wmod["main"], knobs).trace, wl, [tuned_us * 1e-6], tgt,
        ms.arg_info.ArgInfo.from_prim_func(wmod["main"])))
    task = {"name": name, "workload_hash": workload_hash(func), "default_us": default_us}
    (d / "meta.json").write_text(json.dumps({"target_tag": "cuda-sm_90", "tasks": [task]}))
    return d


def test_cuda_record_applies_and_builds(tmp_path):
    from attnforge.tuning_apply import apply_tuning_logs

    knobs = {"block_q": 64, "block_kv": 32, "warp_rows": 16, "num_stages": 3}
    mod = _relax_attention(SITES["causal"], n=256)
    log = _synthetic_log(tmp_path / "fast", mod, knobs, tuned_us=50.0, default_us=80.0)
    final, rep = apply_tuning_logs(mod, "cuda:sm_90", log)
    (f,) = [f for f in rep["functions"] if "attention" in f["name"]]
    assert f["status"] == "tuned" and f["attention_knobs"] == knobs, f
    (kernel,) = [f for gv, f in final.functions.items() if gv.name_hint.endswith("_tuned")]
    kw = sp.decode_args(kernel.attrs[sp.ARGS_KEY])
    assert {k: kw[k] for k in knobs} == knobs and bool(kernel.attrs["tirx.is_scheduled"])
    assert [int(s) for s in kernel.params[4].shape][:2] == [1, 4]  # kv_indices [1, 256/64, W]
    ex = tvm.compile(final, target=cuda_target("sm_90"))
    (src,) = cuda_aot.cuda_sources(ex)
    assert "__launch_bounds__(128)" in src and "af_cp_wait_2()" in src
    # gate: a default faster than the record -> the default kernel (8 warps, 2 stages)
    slow = _synthetic_log(tmp_path / "slow", mod, knobs, tuned_us=90.0, default_us=80.0)
    final2, rep2 = apply_tuning_logs(mod, "cuda:sm_90", slow)
    (f2,) = [f for f in rep2["functions"] if "attention" in f["name"]]
    assert f2["status"] == "default" and "slower than default" in f2["reason"]
    (src2,) = cuda_aot.cuda_sources(tvm.compile(final2, target=cuda_target("sm_90")))
    assert "__launch_bounds__(256)" in src2


def test_builder_materialises_candidates_with_info_function():
    """The tuning builder turns a decided (or undecided) CUDA candidate into its kernel plus
    the info kernel the runner reads the layout from."""
    from attnforge.tuning_space import build_candidate

    _, space = _space(SITES["window"], n=300)
    knobs = {"block_q": 64, "block_kv": 64, "warp_rows": 32, "num_stages": 1}
    for sch_mod, want in ((_forced(space, knobs).mod, knobs),
                          (tvm.IRModule({"main": space}), sp.DEFAULTS)):
        mod = build_candidate(sch_mod)
        assert {g.name_hint for g in mod.get_global_vars()} == {"main", sp.INFO_FUNC}
        lib = tvm.compile(mod, target=cuda_target("sm_90"))
        (src,) = cuda_aot.cuda_sources(lib)
        assert f"{sp.INFO_FUNC}_kernel" in src
        text = "".join(chr(int(m)) for m in __import__("re").findall(
            r"out_ptr\[\d+\] = (\d+);", src) if int(m))
        info = json.loads(text)
        assert {k: info[k] for k in knobs} == want
        layout = sp.layout_arrays(info)
        assert layout[1].shape[1] == -(-300 // want["block_q"])


# ----------------------------------------------------------------- no GPU here
@no_gpu
def test_tune_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    from attnforge.cli_tune import main
    from attnforge.tuning import TuningError, tune

    with pytest.raises(TuningError, match="CUDA device.*RPC tracker"):
        tune(None, None, "cuda:sm_90", trials=4, work_dir=tmp_path / "w",
             mod=_relax_attention(SITES["causal"]))
    assert not (tmp_path / "w").exists()
    for target in ("cuda:sm_90", "cuda"):
        assert main(["tune", "llama", "--target", target, "--trials", "4",
                     "--work-dir", str(tmp_path / "cli")]) == 2
        err = capsys.readouterr().err
        assert "CUDA device" in err and "--rpc HOST:PORT --device-key KEY" in err, err
    assert not (tmp_path / "cli").exists()


# ----------------------------------------------------------------- the search loop, stub runner
@pytest.mark.slow
def test_cuda_search_loop_with_stub_runner(tmp_path):
    """attnforge.tune on a cuda target with a runner that returns made-up latencies (no GPU):
    evolutionary search + xgb + our postprocessor/mutator, CUDA builds of every candidate,
    default measured and seeded, confirm step; all recorded decisions valid."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from attnforge.tuning import tune
    from attnforge.tuning_build import ensure_cpu_intrinsics

    ensure_cpu_intrinsics()

    @derived_object
    class Future(ms.runner.PyRunnerFuture):
        def __init__(self, secs):
            super().__init__()
            self.secs = secs

        def done(self):
            return True

        def result(self):
            return ms.runner.RunnerResult(self.secs, None)

    @derived_object
    class StubRunner(ms.runner.PyRunner):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(0)

        def run(self, inputs):
            return [Future([float(self.rng.uniform(1e-4, 2e-4))]) for _ in inputs]

    mod = _relax_attention(SITES["causal"])
    res = tune(None, None, "cuda:sm_90", trials=6, work_dir=tmp_path / "w", runner=StubRunner(),
               mod=mod, num_trials_per_iter=3, progress=False, seed=0, confirm_rounds=1)
    (task,) = res.tasks
    assert task["trials"] == 6 and task["default_us"] is not None and task["best_us"] > 0
    space = sp.as_design_space(fused_attention_cuda(1, 4, 2, 256, 256, 64,
                                                    mask=SITES["causal"])[0])
    args = sp.decode_args(space.body.block.annotations[sp.ARGS_KEY])
    recs = [json.loads(ln) for ln in (tmp_path / "w" / "database_tuning_record.json")
            .read_text().splitlines() if ln.strip()]
    decided = 0
    for rec in recs:
        insts, dec = rec[1][0]
        cats = [i for i in insts if i[0] == "SampleCategorical"]
        if not cats:
            continue  # the default-schedule seed
        vals = {k: list(sp.knob_candidates(args)[k])[d[1]] for k, d in zip(sp.KNOBS, dec)}
        assert sp.check_knobs(args, vals) is None, vals
        decided += 1
    assert decided == 6


# ----------------------------------------------------------------- gpu_check without a GPU
def test_gpu_check_help_needs_no_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--tune-s" in r.stdout and "--only" in r.stdout


@pytest.mark.slow
def test_gpu_check_tuning_dry_run(tmp_path):
    """Stage (d)'s jobs lower and extract for cuda here: the attention job is one design-space
    task, the Llama job only matmuls."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path), "--dry-run", "--only", "tuning"]) == 0
    rows = {r["job"]: r for r in json.loads((tmp_path / "results.json").read_text())["tuning"]}
    assert rows["attention"]["attention_spaces"] == 1 and len(rows["attention"]["tasks"]) == 1
    assert rows["llama"]["tasks"] and all("matmul" in t for t in rows["llama"]["tasks"])


@pytest.mark.slow
def test_compile_model_cuda_applies_attention_record(tmp_path):
    """compile_model(target=cuda, precision=float16, tuning_logs=...) builds with the decided
    attention kernel (no GPU: verify=False; the build and the report are what is checked)."""
    import torch

    import attnforge
    from attnforge.target import parse_target
    from attnforge.tuning import import_and_lower
    from attnforge.tuning_apply import prepare_module

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    x = tuple(torch.randn(1, 4, 300, 64) for _ in range(3))
    tgt = parse_target("cuda:sm_90")
    mod, _ = import_and_lower(Attn(), x, tgt, precision="float16")
    assert any(sp.is_space(f) for f in prepare_module(mod, tgt).functions.values())
    knobs = {"block_q": 64, "block_kv": 128, "warp_rows": 16, "num_stages": 2}
    log = _synthetic_log(tmp_path / "log", mod, knobs, tuned_us=10.0, default_us=20.0)
    cm = attnforge.compile_model(Attn(), x, target="cuda:sm_90", precision="float16",
                                 tuning_logs=str(log), verify=False)
    (f,) = [f for f in cm.report["tuning"]["functions"] if "attention" in f["name"]]
    assert f["status"] == "tuned" and f["attention_knobs"] == knobs, f
    (src,) = cuda_aot.cuda_sources(cm.executable)
    assert "__launch_bounds__(128)" in src
