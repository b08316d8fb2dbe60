"""MetaSchedule tuning: a short real job (interrupted, then resumed), applying its log only
where it beats the measured default schedule, and every bad input (corrupt / truncated /
other-target log, changed IR, bad arguments, lock)."""

import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tvm = pytest.importorskip("tvm")

from attnforge.errors import TargetError
from attnforge.target import parse_target
from attnforge.tuning import (
    TuningError,
    TuningLockError,
    TuningLogError,
    TuningLogWarning,
    apply_tuning_logs,
    default_log_dir,
    import_and_lower,
    tune,
)
from attnforge.tuning_apply import prepare_module


class LinearGelu(torch.nn.Module):
    def __init__(self, n=128):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)

    def forward(self, x):
        return torch.nn.functional.gelu(self.lin(x))


def _model(rows=128):
    torch.manual_seed(0)
    return LinearGelu().eval(), (torch.randn(rows, 128),)


def _lines(path):
    return [ln for ln in open(path).read().split("\n") if ln.strip()]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """2 trials, interrupted from a callback (simulated Ctrl-C), then resumed to 4."""
    wdir = tmp_path_factory.mktemp("tune") / "linear_gelu"
    model, inputs = _model()

    def stop(info):
        if info["trials_done"] >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(model, inputs, "llvm", trials=4, work_dir=wdir, num_trials_per_iter=2,
             callbacks=[stop], progress=False, seed=0)
    first = _lines(wdir / "database_tuning_record.json")
    meta1 = json.loads((wdir / "meta.json").read_text())
    res = tune(model, inputs, "llvm", trials=4, work_dir=wdir, num_trials_per_iter=2,
               progress=False, seed=0)
    return {"dir": wdir, "first": first, "meta1": meta1, "result": res}


def test_interrupt_keeps_records_and_rerun_resumes(tuned):
    wdir = tuned["dir"]
    assert len(tuned["first"]) == 3  # the default-schedule seed + 2 trials
    assert tuned["meta1"]["status"] == "interrupted"
    assert not (wdir / ".tune.lock").exists()
    records = _lines(wdir / "database_tuning_record.json")
    assert records[:3] == tuned["first"]  # nothing lost
    # 4 trials + 1 seed (measured once: the rerun did not seed again)
    assert len(records) == 5 and len(_lines(wdir / "database_workload.json")) == 1
    res = tuned["result"]
    assert res.trials_run == 2 and res.trials_in_db == 4 and not res.interrupted
    meta = json.loads((wdir / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["tvm_version"] == tvm.__version__
    assert [r["status"] for r in meta["runs"]] == ["interrupted", "complete"]
    assert meta["target"]["kind"] == "llvm" and meta["trials_requested"] == 4
    (task,) = meta["tasks"]
    assert task["trials"] == 4 and task["best_us"] > 0
    assert task["default_us"] > 0 and task["default_rule"] == "MatmulCPU"
    assert task["default_error"] is None and len(task["default_trace_sha256"]) == 64
    assert tuned["meta1"]["tasks"][0]["default_us"] == task["default_us"]  # not re-measured
    assert (wdir / "logs").is_dir()
    # A finished budget is a no-op.
    again = tune(*_model(), "llvm", trials=4, work_dir=wdir, progress=False)
    assert again.trials_run == 0 and len(_lines(wdir / "database_tuning_record.json")) == 5


def _with_default(tuned, tmp_path, factor):
    """Copy of the tuned log whose stored default latency is ``factor`` x the best record's
    (``None``: no default latency, like a log written before defaults were measured)."""
    d = tmp_path / f"default_x{factor}"
    shutil.copytree(tuned["dir"], d)
    meta = json.loads((d / "meta.json").read_text())
    for t in meta["tasks"]:
        t.pop("default_confirm", None)  # the re-measured pair would take precedence
        if factor is None:
            t.pop("default_us")
        else:
            t["default_us"] = t["best_us"] * factor
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture
def faster_log(tuned, tmp_path):
    return _with_default(tuned, tmp_path, 10.0)  # the tuned record beats the default


def test_seed_record_replays_default_schedule(tuned):
    from tvm.s_tir import meta_schedule as ms

    from attnforge.tuning_default import default_schedule, trace_sha

    model, inputs = _model()
    tgt = parse_target("llvm")
    func = next(f for f in prepare_module(import_and_lower(model, inputs, tgt)[0], tgt)
                .functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    (task,) = json.loads((tuned["dir"] / "meta.json").read_text())["tasks"]
    seed = json.loads(_lines(tuned["dir"] / "database_tuning_record.json")[0])
    assert trace_sha(seed[1][0]) == task["default_trace_sha256"]
    wmod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    wl = ms.database.Workload(wmod)
    sch = ms.database.TuningRecord.from_json(seed[1], wl).trace
    replayed = tvm.s_tir.Schedule(wmod)
    sch.apply_to_schedule(replayed, remove_postproc=False)
    expected, rule = default_schedule(wmod["main"], tgt)
    assert rule == "MatmulCPU"
    tvm.ir.assert_structural_equal(replayed.mod, expected.mod)


def test_slower_record_not_applied(tuned, tmp_path):
    d = _with_default(tuned, tmp_path, 0.1)  # the default is 10x faster than the record
    model, inputs = _model()
    tgt = parse_target("llvm")
    mod, _ = import_and_lower(model, inputs, tgt)
    applied, report = apply_tuning_logs(mod, tgt, d)
    (f,) = report["functions"]
    assert f["status"] == "default" and not report["tuned"], report
    assert f["reason"].startswith("tuned record slower than default schedule (")
    assert f"{f['tuned_us']:.1f} us vs {f['default_us']:.1f} us" in f["reason"]
    assert report["slower_than_default"] == [f["name"]]
    assert report["records_for_target"] == 4 and report["unused_log_workloads"] == 0
    tvm.ir.assert_structural_equal(applied[f["name"]], prepare_module(mod, tgt)[f["name"]])
    # through compile_model: the default rules schedule it, output still verified
    import attnforge

    cm = attnforge.compile_model(model, inputs, tuning_logs=str(d))
    assert not cm.report["tuning"]["tuned"] and cm.report["verification"]["passed"]


def test_measured_comparison_is_consistent(tuned):
    """On the real log, a record is applied iff it measured faster than the default."""
    model, inputs = _model()
    tgt = parse_target("llvm")
    mod, _ = import_and_lower(model, inputs, tgt)
    _, report = apply_tuning_logs(mod, tgt, tuned["dir"])
    (f,) = report["functions"]
    assert f["default_us"] > 0 and f["tuned_us"] > 0
    assert (f["status"] == "tuned") == (f["tuned_us"] < f["default_us"]), f


def test_log_without_default_applies_and_says_so(tuned, tmp_path):
    d = _with_default(tuned, tmp_path, None)
    mod, _ = import_and_lower(*_model(), parse_target("llvm"))
    _, report = apply_tuning_logs(mod, "llvm", d)
    (f,) = report["functions"]
    assert f["status"] == "tuned" and f["compared_to_default"] is False
    assert "no comparison possible" in report["default_comparison"]


def test_apply_changes_tir_and_model_verifies(faster_log):
    model, inputs = _model()
    tgt = parse_target("llvm")
    mod, _ = import_and_lower(model, inputs, tgt)
    untuned = prepare_module(mod, tgt)
    applied, report = apply_tuning_logs(mod, tgt, faster_log)
    assert report["tuned"] and not report["default_scheduled"], report
    (f,) = report["functions"]
    assert f["compared_to_default"] and f["tuned_us"] < f["default_us"]
    assert "beat the default" in report["default_comparison"]
    name = report["tuned"][0]
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(applied[name], untuned[name])
    assert applied[name].attrs["tirx.is_scheduled"]
    ex = tvm.compile(applied, target=tgt)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(inputs[0].numpy()))
    out = out[0] if not hasattr(out, "numpy") else out
    ref = model(*inputs).detach().numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_compile_model_applies_tuning_logs(faster_log):
    import attnforge

    model, inputs = _model()
    cm = attnforge.compile_model(model, inputs, tuning_logs=str(faster_log))
    rep = cm.report["tuning"]
    assert rep["tuned"] and cm.report["verification"]["passed"]
    default = attnforge.compile_model(model, inputs)
    assert default.report["tuning"]["applied"] is False
    torch.testing.assert_close(cm(inputs[0]), model(inputs[0]), rtol=1e-4, atol=1e-5)


def test_apply_reports_changed_ir(tuned):
    model, inputs = _model(rows=64)  # same task name, other shape -> other workload hash
    tgt = parse_target("llvm")
    mod, _ = import_and_lower(model, inputs, tgt)
    with pytest.warns(TuningLogWarning, match="changed since tuning"):
        _, report = apply_tuning_logs(mod, tgt, tuned["dir"])
    (f,) = report["functions"]
    assert f["status"] == "default" and "workload hash mismatch" in f["reason"]
    assert report["unused_log_workloads"] == 1


def test_apply_other_target_log_warns(tuned, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(tuned["dir"], d)
    rec = d / "database_tuning_record.json"
    rec.write_text(rec.read_text().replace('"znver4"', '"skylake-avx512"'))
    model, inputs = _model()
    tgt = parse_target("llvm")
    mod, _ = import_and_lower(model, inputs, tgt)
    with pytest.warns(TuningLogWarning, match="skylake-avx512"):
        _, report = apply_tuning_logs(mod, tgt, d)
    assert report["records_other_target"] == 4 and report["records_for_target"] == 0
    assert report["other_targets"] == ["llvm-skylake-avx512"]
    assert "another target" in report["functions"][0]["reason"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_apply_bad_log_names_file(tuned, tmp_path, damage):
    d = tmp_path / damage
    shutil.copytree(tuned["dir"], d)
    rec = d / "database_tuning_record.json"
    lines = _lines(rec)
    if damage == "corrupt":
        lines[2] = "{not json"
        rec.write_text("\n".join(lines) + "\n")
    else:
        rec.write_text("\n".join(lines)[:-40])
    mod, _ = import_and_lower(*_model(), parse_target("llvm"))
    with pytest.raises(TuningLogError, match=f"database_tuning_record.json.*{damage}"):
        apply_tuning_logs(mod, "llvm", d)


def test_missing_log_and_empty_dir(tmp_path):
    mod = tvm.IRModule()
    with pytest.raises(TuningLogError, match="does not exist"):
        apply_tuning_logs(mod, "llvm", tmp_path / "nope")
    with pytest.raises(TuningLogError, match="no MetaSchedule database"):
        apply_tuning_logs(mod, "llvm", tmp_path)


@pytest.mark.parametrize("trials", [0, -3, 2.5])
def test_bad_trials(trials, tmp_path):
    with pytest.raises(TuningError, match="trials"):
        tune(*_model(), "llvm", trials=trials, work_dir=tmp_path)


def test_unknown_target(tmp_path):
    with pytest.raises(TargetError, match="tpu"):
        tune(*_model(), "tpu", trials=4, work_dir=tmp_path)


def test_unreachable_tracker_fails_fast(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.time()
    with pytest.raises(TuningError, match="rpc=.*cannot reach the RPC tracker"):
        tune(*_model(), "llvm", trials=4, work_dir=tmp_path, rpc=("127.0.0.1", port),
             device_key="k")
    assert time.time() - t0 < 10
    with pytest.raises(TuningError, match="device_key"):
        tune(*_model(), "llvm", trials=4, work_dir=tmp_path, rpc=f"127.0.0.1:{port}")


def test_second_job_on_same_dir_is_refused(tmp_path):
    lock = tmp_path / ".tune.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(TuningLockError, match="another job"):
        tune(*_model(), "llvm", trials=4, work_dir=tmp_path)
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    from attnforge.tuning_db import WorkDirLock

    with WorkDirLock(tmp_path):  # a dead holder's lock is taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_default_log_dir():
    d = default_log_dir("llvm", "llama-h512")
    assert d.parts[-3:] == ("tuning_logs", parse_target("llvm").attrs["mcpu"] and
                            f"llvm-{parse_target('llvm').attrs['mcpu']}", "llama-h512")
    with pytest.raises(TuningError, match="workload name"):
        default_log_dir("llvm", "../x")


@pytest.mark.parametrize("argv, msg", [
    (["tune", "gpt2", "--trials", "0"], "trials must be a positive integer"),
    (["tune", "gpt2", "--trials", "4", "--target", "tpu"], "unknown target"),
    (["tune", "gpt2", "--trials", "4", "--rpc", "127.0.0.1:9"], "--device-key"),
])
def test_cli_tune_errors(argv, msg, capsys):
    from attnforge.cli_tune import main

    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_attention_block_search_records_choice(tmp_path):
    from attnforge.tuning_attention import best_attention_blocks, tune_attention_blocks

    space = {"block_q": (32, 64), "block_kv": (32,), "rows": (4, 3)}  # rows 3: invalid combo
    r = tune_attention_blocks(q_heads=2, q_len=96, head_dim=16, work_dir=tmp_path,
                              space=space, repeat=1, progress=False)
    assert len(r["results"]) == 2 and all("error" not in x for x in r["results"])
    best = best_attention_blocks(tmp_path.parent, r["signature"], target="llvm")
    assert best is not None and best["block_kv"] == 32 and best["block_q"] in (32, 64)
    assert best_attention_blocks(tmp_path, "b9-nope") is None
    with pytest.raises(TuningError, match="space"):
        tune_attention_blocks(q_len=64, space={"block_q": (0,)}, progress=False)


def test_job_remeasures_best_against_default(tuned):
    """The end of a job re-measures its best record and the default alternately; the gate
    uses that pair (see test_measured_comparison_is_consistent)."""
    from attnforge.tuning_db import read_log
    from attnforge.tuning_default import record_us, seed_shas, trace_sha

    meta = json.loads((tuned["dir"] / "meta.json").read_text())
    (task,) = meta["tasks"]
    conf = task["default_confirm"]
    assert conf["rounds"] == 3 and conf["best_us"] > 0 and conf["default_us"] > 0, conf
    log = read_log(tuned["dir"])
    seeds = seed_shas(meta)
    timed = [(record_us(r), trace_sha(r[0])) for _, r in log.records
             if trace_sha(r[0]) not in seeds and record_us(r) is not None]
    assert conf["trace_sha256"] == min(timed)[1]  # the record MetaSchedule would apply
