"""Measuring candidates over TVM RPC (a tracker and servers registered under a device key).

:func:`make_rpc_runner` checks the tracker first, with a short socket timeout, so an
unreachable tracker or a key with no servers is a clear :class:`TuningError` within seconds
instead of a hang inside MetaSchedule.  A server that dies mid-job makes its candidates fail
(``RunnerResult.error_msg`` set; MetaSchedule records them with a huge latency and moves on).
"""

from __future__ import annotations

import socket
import threading

from .tuning_db import TuningError


def parse_rpc(rpc) -> tuple[str, int]:
    """``("host", port)`` or ``"host:port"`` -> ``(host, port)``; TuningError names ``rpc``."""
    if isinstance(rpc, str):
        host, sep, port = rpc.rpartition(":")
        if not sep:
            raise TuningError(f"rpc={rpc!r}: expected HOST:PORT of the RPC tracker")
        rpc = (host, port)
    try:
        host, port = rpc
        port = int(port)
    except (TypeError, ValueError) as e:
        raise TuningError(f"rpc={rpc!r}: expected (host, port) or 'HOST:PORT' of the RPC "
                          "tracker") from e
    if not host or not 0 < port < 65536:
        raise TuningError(f"rpc={rpc!r}: bad host or port")
    return str(host), port


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's summary, or TuningError after ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise TuningError(f"rpc=({host!r}, {port}): cannot reach the RPC tracker ({e}); start "
                          f"one with `python -m tvm.exec.rpc_tracker --host {host} --port "
                          f"{port}`") from e
    from tvm import rpc

    out: dict = {}

    def _query():
        try:
            out["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=_query, daemon=True)
    t.start()
    t.join(timeout)
    if "summary" not in out:
        why = out.get("error", f"no answer within {timeout:.0f} s")
        raise TuningError(f"rpc=({host!r}, {port}): the port is open but does not answer as "
                          f"an RPC tracker: {why}")
    return out["summary"]


def count_servers(summary: dict, key: str) -> int:
    n = 0
    for item in summary.get("server_info", []):
        if str(item.get("key", "")).split(":")[-1] == key:
            n += 1
    return n


def make_rpc_runner(rpc, device_key: str | None, *, session_timeout_sec: float = 60.0,
                    max_workers: int | None = None, evaluator_config=None,
                    check_timeout: float = 5.0):
    """An ``ms.runner.RPCRunner`` for ``device_key`` after checking the tracker and servers."""
    from tvm.s_tir import meta_schedule as ms

    host, port = parse_rpc(rpc)
    if not device_key:
        raise TuningError("device_key is required with rpc= (the key servers registered "
                          "with, e.g. `--key znver4`)")
    summary = tracker_summary(host, port, check_timeout)
    n = count_servers(summary, device_key)
    if n == 0:
        keys = sorted({str(s.get("key", "")).split(":")[-1]
                       for s in summary.get("server_info", [])})
        raise TuningError(f"device_key={device_key!r}: no RPC server registered under this key "
                          f"at tracker {host}:{port} (keys there: {keys or 'none'})")
    cfg = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=device_key,
                              session_priority=1, session_timeout_sec=int(session_timeout_sec))
    from .tuning_space import rpc_run_evaluator  # real layout arrays for attention candidates

    runner = ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=evaluator_config,
                                 max_workers=max_workers or n, f_run_evaluator=rpc_run_evaluator)
    return runner, {"tracker": f"{host}:{port}", "device_key": device_key, "servers": n}
