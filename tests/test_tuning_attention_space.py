"""The fused CPU attention kernel as a MetaSchedule design space: sampled decisions give valid,
correct kernels (vs float64); a short tuning job over the attention task writes records that
apply through the gate; the shipped logs are picked up by default and ``tuning_logs=False``
opts out."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tvm = pytest.importorskip("tvm")

from attnforge.schedules import attention_cpu_space as sp
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.block_mask import MaskSpec


def _reference(q, k, v, spec, scale):
    """float64 attention with the MaskSpec's element rule; GQA by repeating kv heads."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    nq, nk = s.shape[-2:]
    qi, ki = np.arange(nq)[:, None], np.arange(nk)[None, :]
    allowed = np.ones((nq, nk), bool)
    if spec.min_diff is not None:
        allowed &= (qi + spec.q_offset - ki) >= spec.min_diff
    if spec.max_diff is not None:
        allowed &= (qi + spec.q_offset - ki) <= spec.max_diff
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


def _space(spec, shape=(2, 4, 2, 100, 100, 16)):
    func, _ = fused_attention_cpu(*shape, mask=spec)
    space = sp.as_design_space(func)
    assert space is not None and sp.is_space(space)
    return func, space


def _same_attrs(func, like):
    """``func`` with the attributes of ``like`` (the space adds a flop count, drops the symbol)."""
    return func.without_attr("global_symbol").with_attr(dict(like.attrs))


def _forced(space, knobs):
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": space}))
    sp.attention_space_rule(sch, sch.get_sblock("root"), knobs)
    return sch


def _run(prim, bm, shape, seed=0):
    b, hq, hkv, nq, nk, d = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, nq, d), dtype=np.float32)
    k = rng.standard_normal((b, hkv, nk, d), dtype=np.float32)
    v = rng.standard_normal((b, hkv, nk, d), dtype=np.float32)
    lib = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}),
                      target=default_cpu_target())
    dev = tvm.cpu()
    out = tvm.runtime.empty((b, hq, nq, d), "float32", dev)
    args = [tvm.runtime.tensor(a, dev) for a in
            (q, k, v, bm.kv_num_blocks.astype("int32"), bm.kv_indices.astype("int32"),
             bm.kv_is_full.astype("int32"))]
    lib["main"](*args, out)
    return q, k, v, out.numpy()


def test_space_wraps_kernel_and_unwraps_to_it():
    func, space = _space(MaskSpec.causal())
    root = space.body.block
    assert str(root.annotations["schedule_rule"]) == sp.RULE_NAME
    assert "global_symbol" not in space.attrs and int(space.attrs["estimated_flops"]) > 0
    tvm.ir.assert_structural_equal(sp.unwrap(space), _same_attrs(func, space))
    assert sp.decisions(space) is None and sp.materialize(space) is None
    # a static mask cannot be replayed from JSON: no design space, a clear None
    static, _ = fused_attention_cpu(1, 1, 1, 8, 8, 16, mask=MaskSpec.static(np.tril(np.ones(
        (8, 8), bool))), mask_input="bool", mask_input_shape=(1, 1, 8, 8))
    assert sp.as_design_space(static) is None


def test_default_trace_reproduces_the_default_kernel():
    func, space = _space(MaskSpec.causal())
    sch = sp.default_space_schedule(space)
    assert sp.decisions(sch.mod["main"]) == {"block_q": 64, "block_kv": 64, "rows": 4}
    prim, _, _ = sp.materialize(sch.mod["main"])
    tvm.ir.assert_structural_equal(prim, _same_attrs(func, prim))


@pytest.mark.parametrize("knobs,spec", [
    ({"block_q": 32, "block_kv": 32, "rows": 2}, MaskSpec.causal()),
    ({"block_q": 128, "block_kv": 64, "rows": 8}, MaskSpec.causal()),
    ({"block_q": 64, "block_kv": 128, "rows": 4}, MaskSpec.sliding_window(37)),
    ({"block_q": 32, "block_kv": 128, "rows": 8}, MaskSpec.full()),
])
def test_decisions_give_correct_kernels(knobs, spec):
    """GQA (4 q heads / 2 kv heads), batch 2, 100 tokens (not a multiple of any block)."""
    shape = (2, 4, 2, 100, 100, 16)
    _, space = _space(spec, shape)
    sch = _forced(space, knobs)
    assert sp.decisions(sch.mod["main"]) == knobs
    prim, bm, _ = sp.materialize(sch.mod["main"])
    assert bm.block_q == knobs["block_q"] and bm.block_kv == knobs["block_kv"]
    q, k, v, got = _run(prim, bm, shape)
    np.testing.assert_allclose(got, _reference(q, k, v, spec, 0.25), rtol=2e-5, atol=2e-5)


def test_sampled_and_mutated_traces_are_valid():
    """Decisions drawn by the rule (as the design-space generator does) and moved by the
    evolutionary search's mutator replay into correct kernels."""
    shape = (1, 2, 2, 70, 70, 16)
    _, space = _space(MaskSpec.causal(), shape)
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": space}), seed=11)
    sp.attention_space_rule(sch, sch.get_sblock("root"))  # sampled, not forced
    mutator = sp._mutator_class()(5)
    trace, seen = sch.trace, set()
    for i in range(3):
        if i:
            trace = mutator.apply(trace)
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": space}))
        trace.apply_to_schedule(sch, remove_postproc=False)
        dec = sp.decisions(sch.mod["main"])
        seen.add(tuple(sorted(dec.items())))
        prim, bm, _ = sp.materialize(sch.mod["main"])
        q, k, v, got = _run(prim, bm, shape, seed=i)
        np.testing.assert_allclose(got, _reference(q, k, v, MaskSpec.causal(), 0.25),
                                   rtol=2e-5, atol=2e-5)
    assert len(seen) >= 2  # the mutator moves decisions


# ----------------------------------------------------------------- tuning job end to end
class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _inputs():
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, 150, 32) for _ in range(3))


@pytest.fixture(scope="module")
def attention_log(tmp_path_factory):
    """4 real trials of the attention task only (evolutionary search, xgb cost model)."""
    from attnforge.tuning import tune

    wdir = tmp_path_factory.mktemp("tune_attn") / "attn"
    res = tune(Attn(), _inputs(), "llvm", trials=4, work_dir=wdir, num_trials_per_iter=4,
               progress=False, seed=0, only=["attention"])
    return wdir, res


def _synthetic_log(d, knobs, tuned_us, default_us, confirm=None):
    """A log holding one record of the attention workload with ``knobs`` (what a tuning job
    writes, without the minutes of measuring), ``meta.json`` with the default's latency."""
    from tvm.s_tir import meta_schedule as ms

    from attnforge.target import parse_target, target_tag
    from attnforge.tuning import import_and_lower
    from attnforge.tuning_apply import prepare_module, workload_hash
    from attnforge.tuning_build import tuning_target

    tgt = parse_target("llvm")
    mod, _ = import_and_lower(Attn(), _inputs(), tgt)
    ((name, func),) = [(gv.name_hint, f) for gv, f in prepare_module(mod, tgt).functions.items()
                       if isinstance(f, tvm.tirx.PrimFunc) and sp.is_space(f)]
    wmod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    d.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(d))
    wl = db.commit_workload(wmod)
    sch = _forced(wmod["main"], knobs)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, wl, [tuned_us * 1e-6], tuning_target(tgt),
        ms.arg_info.ArgInfo.from_prim_func(wmod["main"])))
    task = {"name": name, "workload_hash": workload_hash(func), "default_us": default_us}
    if confirm is not None:  # tune's interleaved re-measurement of this record vs default
        from attnforge.tuning_default import trace_sha

        rec = json.loads((d / "database_tuning_record.json").read_text().splitlines()[-1])
        task["default_confirm"] = {"best_us": confirm[0], "default_us": confirm[1],
                                   "rounds": 3, "trace_sha256": trace_sha(rec[1][0])}
    (d / "meta.json").write_text(json.dumps({"target_tag": target_tag(tgt), "tasks": [task]}))
    return d


def _gated(src, dst, factor):
    """Copy of a log whose stored default latency is ``factor`` x the best record's."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    for t in meta["tasks"]:
        t.pop("default_confirm", None)  # the re-measured pair would take precedence
        t["default_us"] = t["best_us"] * factor
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.slow
def test_tuning_job_records_attention(attention_log):
    wdir, res = attention_log
    (task,) = res.tasks
    assert "attention" in task["name"] and task["trials"] == 4, res.tasks
    assert task["default_rule"].startswith("attnforge attention") and task["default_us"] > 0
    assert task["best_us"] is not None and task["best_us"] > 0
    recs = [json.loads(ln) for ln in (wdir / "database_tuning_record.json").read_text()
            .splitlines() if ln.strip()]
    insts = [i[0] for i in recs[-1][1][0][0]]
    assert insts.count("SampleCategorical") == 3  # block_q, block_kv, rows decisions


@pytest.mark.slow
def test_tuned_attention_record_applies_through_gate(attention_log, tmp_path):
    """The real job's records: applied iff faster than the measured default; model verifies."""
    import attnforge

    wdir, res = attention_log
    model, x = Attn(), _inputs()
    cm = attnforge.compile_model(model, x, tuning_logs=str(wdir))
    (f,) = [f for f in cm.report["tuning"]["functions"] if "attention" in f["name"]]
    assert f["compared_to_default"] is True or f["status"] == "default", f
    assert (f["status"] == "tuned") == (f["tuned_us"] < f["default_us"]), f
    torch.testing.assert_close(cm(*x), model(*x), rtol=1e-4, atol=1e-5)
    fast = _gated(wdir, tmp_path / "faster", 2.0)  # the gate passes
    cm2 = attnforge.compile_model(model, x, tuning_logs=str(fast))
    (f2,) = [f for f in cm2.report["tuning"]["functions"] if "attention" in f["name"]]
    assert f2["status"] == "tuned" and set(f2["attention_knobs"]) == {"block_q", "block_kv",
                                                                        "rows"}
    torch.testing.assert_close(cm2(*x), model(*x), rtol=1e-4, atol=1e-5)


KNOBS = {"block_q": 32, "block_kv": 128, "rows": 8}


def test_attention_record_applies_and_model_verifies(tmp_path):
    import attnforge
    from attnforge.tuning import apply_tuning_logs, import_and_lower

    log = _synthetic_log(tmp_path / "faster", KNOBS, tuned_us=100.0, default_us=200.0)
    model, x = Attn(), _inputs()
    cm = attnforge.compile_model(model, x, tuning_logs=str(log))
    (f,) = [f for f in cm.report["tuning"]["functions"] if "attention" in f["name"]]
    assert f["status"] == "tuned" and f["compared_to_default"], f
    assert f["attention_knobs"] == KNOBS
    torch.testing.assert_close(cm(*x), model(*x), rtol=1e-4, atol=1e-5)
    # the kernel built is the decided variant, with its own layout constants
    mod, _ = import_and_lower(model, x, "llvm")
    applied, _ = apply_tuning_logs(mod, "llvm", log)
    (kernel,) = [f for gv, f in applied.functions.items() if gv.name_hint.endswith("_tuned")]
    kw = sp.decode_args(kernel.attrs[sp.ARGS_KEY])
    assert {k: kw[k] for k in KNOBS} == KNOBS
    assert [int(s) for s in kernel.params[4].shape][:2] == [1, 5]  # kv_indices [1, 150/32, W]
    # gate: a default faster than the record -> the default kernel is built
    slow = _synthetic_log(tmp_path / "slower", KNOBS, tuned_us=300.0, default_us=200.0)
    cm2 = attnforge.compile_model(model, x, tuning_logs=str(slow))
    (f2,) = [f for f in cm2.report["tuning"]["functions"] if "attention" in f["name"]]
    assert f2["status"] == "default" and "slower than default" in f2["reason"]
    torch.testing.assert_close(cm2(*x), model(*x), rtol=1e-4, atol=1e-5)
    # the interleaved re-measurement decides over the numbers taken minutes apart
    remeasured = _synthetic_log(tmp_path / "remeasured", KNOBS, tuned_us=100.0,
                                default_us=200.0, confirm=(250.0, 240.0))
    _, rep = apply_tuning_logs(mod, "llvm", remeasured)
    (f3,) = [f for f in rep["functions"] if "attention" in f["name"]]
    assert f3["status"] == "default" and f3["remeasured"], f3
    assert "(250.0 us vs 240.0 us)" in f3["reason"]


def test_shipped_logs_used_by_default_and_opt_out(tmp_path, monkeypatch):
    import attnforge
    from attnforge.target import parse_target, target_tag

    root = tmp_path / "logs"
    _synthetic_log(root / target_tag(parse_target("llvm")) / "attn", KNOBS, 100.0, 200.0)
    monkeypatch.setenv("ATTNFORGE_TUNING_LOGS", str(root))
    model, x = Attn(), _inputs()
    cm = attnforge.compile_model(model, x)
    rep = cm.report["tuning"]
    assert rep["auto"] and rep["applied"] and any("attention" in n for n in rep["tuned"]), rep
    off = attnforge.compile_model(model, x, tuning_logs=False)
    assert off.report["tuning"]["applied"] is False and "False" in off.report["tuning"]["reason"]
    other = tuple(torch.randn(1, 2, 40, 32) for _ in range(3))  # another workload
    cm3 = attnforge.compile_model(model, other)
    assert cm3.report["tuning"]["applied"] is False
    assert "no shipped tuning record matches" in cm3.report["tuning"]["reason"]
    monkeypatch.setenv("ATTNFORGE_TUNING_LOGS", str(tmp_path / "none"))
    cm4 = attnforge.compile_model(model, x)
    assert "no tuning logs shipped" in cm4.report["tuning"]["reason"]


def test_undecided_candidate_builds_default_kernel_with_layout_info():
    """An undecided workload (e.g. a default schedule that only replays no-op instructions)
    builds as the default kernel and still carries the info function, so the runner passes
    the real layout arrays, not random ``kv_indices``; ``space_of`` finds the CPU space."""
    from attnforge.tuning_space import build_candidate, space_of

    _, space = _space(MaskSpec.causal())
    assert space_of(space) is sp
    mod = build_candidate(tvm.IRModule({"main": space}))
    assert {g.name_hint for g in mod.get_global_vars()} == {"main", sp.INFO_FUNC}
    lib = tvm.compile(mod, target=default_cpu_target())
    buf = tvm.runtime.empty((sp.INFO_CAP,), "int32", tvm.cpu())
    lib[sp.INFO_FUNC](buf)
    data = buf.numpy()
    info = json.loads(bytes(data[:int(np.argmax(data == 0))].astype(np.uint8)).decode())
    assert (info["block_q"], info["block_kv"], info["rows"]) == (64, 64, 4)
    assert [a.shape for a in sp.layout_arrays(info)][0] == (1, 2)  # 100 rows / 64
