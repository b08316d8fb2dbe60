"""Tuning over TVM RPC on loopback: a tracker and two servers started in-process (their
popen workers are subprocesses), a short job, and a job that loses a server midway."""

import time

import pytest

torch = pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")
pytest.importorskip("tornado")

from attnforge.tuning import tune
from attnforge.tuning_rpc import count_servers, tracker_summary

KEY = "attnforge-test"


class MatMul(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(128, 128))

    def forward(self, x):
        return x @ self.w


def _kill_tree(worker) -> None:
    """Kill a PopenWorker-backed tracker/server and every process below it."""
    proc = getattr(worker, "proc", None)
    p = getattr(proc, "_proc", None)
    if p is None:
        return
    try:
        root = psutil.Process(p.pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def _start_cluster(n_servers=2):
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9490, silent=True)
    servers = [Server("127.0.0.1", port=9090, port_end=9189,
                      tracker_addr=("127.0.0.1", tracker.port), key=KEY, silent=True)
               for _ in range(n_servers)]
    deadline = time.time() + 30
    while count_servers(tracker_summary("127.0.0.1", tracker.port), KEY) < n_servers:
        assert time.time() < deadline, "RPC servers did not register"
        time.sleep(0.2)
    return tracker, servers


@pytest.fixture()
def rpc_cluster():
    """Tracker + two servers; on teardown every process of theirs is killed and checked."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    tracker, servers = _start_cluster()
    yield tracker, servers
    procs = []
    for w in servers + [tracker]:
        try:
            procs += _tree(w)
        except psutil.NoSuchProcess:
            pass
        _kill_tree(w)
    alive = [q for q in procs if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [q.cmdline() for q in alive]
    time.sleep(0.5)  # tune() shut its runner pool down: no popen_worker of its own is left
    extra = [q for q in psutil.Process().children(recursive=True)
             if q.pid not in before and q.is_running() and q.status() != psutil.STATUS_ZOMBIE
             and "popen_worker" in " ".join(q.cmdline())]
    assert not extra, [q.cmdline() for q in extra]


def _tree(worker) -> list:
    root = psutil.Process(worker.proc._proc.pid)
    return root.children(recursive=True) + [root]


def test_rpc_tune_two_servers(rpc_cluster, tmp_path):
    tracker, _ = rpc_cluster
    torch.manual_seed(0)
    res = tune(MatMul().eval(), (torch.randn(128, 128),), "llvm", trials=2,
               work_dir=tmp_path, rpc=("127.0.0.1", tracker.port), device_key=KEY,
               num_trials_per_iter=2, progress=False, seed=0)
    assert res.runner["servers"] == 2 and res.trials_in_db == 2
    assert res.tasks[0]["best_us"] is not None  # measured remotely
    assert res.tasks[0]["default_us"] is not None  # the default schedule too, same runner


@pytest.mark.slow
def test_rpc_server_dies_mid_job(rpc_cluster, tmp_path):
    tracker, servers = rpc_cluster
    killed = []

    def kill_one(info):
        if not killed:
            _kill_tree(servers[0])
            killed.append(info["trials_done"])

    torch.manual_seed(0)
    res = tune(MatMul().eval(), (torch.randn(128, 128),), "llvm", trials=4,
               work_dir=tmp_path, rpc=f"127.0.0.1:{tracker.port}", device_key=KEY,
               num_trials_per_iter=2, progress=False, seed=0, callbacks=[kill_one])
    assert killed and not res.interrupted
    assert res.trials_run == 4 and res.trials_in_db == 4
    assert res.tasks[0]["best_us"] is not None


@pytest.mark.slow
def test_rpc_tunes_attention_kernel(rpc_cluster, tmp_path):
    """The attention design space over RPC: the remote evaluator gets the real layout arrays
    (random kv_indices would read out of bounds), so candidates run and are timed."""
    tracker, _ = rpc_cluster

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    x = tuple(torch.randn(1, 2, 100, 32) for _ in range(3))
    res = tune(Attn(), x, "llvm", trials=2, work_dir=tmp_path / "attn", num_trials_per_iter=2,
               rpc=("127.0.0.1", tracker.port), device_key=KEY, progress=False, seed=0,
               only=["attention"])
    (task,) = res.tasks
    assert task["trials"] == 2 and task["best_us"] > 0 and task["default_us"] > 0, task
