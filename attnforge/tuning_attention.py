"""Direct block-size grid search for attnforge's fused CPU attention kernel (a reference).

The kernel is tuned through MetaSchedule like every other task (``attnforge.tune``: the design
space of :mod:`attnforge.schedules.attention_cpu_space`, records in the job's
``JSONDatabase``, applied by ``compile_model``).  This module times the same grid
(``block_q`` x ``block_kv`` x ``rows``) exhaustively without MetaSchedule (building one variant
takes ~0.1-0.3 s), as a cross-check of what the search finds: each variant is built, checked
against the first one and timed; results go to ``attention_blocks.json`` in the tuning-log
directory, keyed by the attention signature.  ``best_attention_blocks(path, ...)`` reads them
back; pass ``block_q``/``block_kv`` to ``compile_model`` to use them by hand.

The CUDA kernel has no such direct search: its knobs (``block_q``, ``block_kv``, ``warp_rows``,
``num_stages``) are searched by MetaSchedule only (``attnforge tune --target cuda --precision
float16``; space and validity rules in :mod:`attnforge.schedules.attention_cuda_space`, whose
``valid_configs`` lists the grid that search samples).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import time
from pathlib import Path

from .tuning_db import TuningError, TuningLogError, WorkDirLock

BLOCKS_FILE = "attention_blocks.json"
DEFAULT_SPACE = {"block_q": (32, 64, 128), "block_kv": (32, 64, 128), "rows": (2, 4, 8)}


def attention_signature(batch, q_heads, kv_heads, q_len, kv_len, head_dim, mask="causal",
                        dtype="float32") -> str:
    """Key of one attention shape: ``b1-h8-kv8-q2048-k2048-d64-causal-float32``."""
    return f"b{batch}-h{q_heads}-kv{kv_heads}-q{q_len}-k{kv_len}-d{head_dim}-{mask}-{dtype}"


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TuningLogError(f"tuning log {str(path)!r} is corrupt ({e.msg})") from e


def _time(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)  # min: robust to other load on a shared host


def tune_attention_blocks(*, batch: int = 1, q_heads: int = 8, kv_heads: int | None = None,
                          q_len: int = 2048, kv_len: int | None = None, head_dim: int = 64,
                          causal: bool = True, target="llvm", work_dir=None,
                          space: dict | None = None, repeat: int = 5,
                          progress: bool = True) -> dict:
    """Time every ``(block_q, block_kv, rows)`` of ``space``; record and return the best.

    Returns ``{"signature", "best": {block_q, block_kv, rows, ms}, "default_ms", "results"}``
    (``default_ms``: 64/64/4, the compile_model default).  Writes ``work_dir/attention_blocks.json``
    when ``work_dir`` is given (merged with other signatures already there; locked).
    """
    import numpy as np
    import tvm

    from attnforge.schedules.attention_cpu import fused_attention_cpu
    from attnforge.schedules.block_mask import MaskSpec

    from .target import parse_target, target_tag

    tgt = parse_target(target)
    if tgt.kind.name != "llvm":
        raise TuningError(f"target={target_tag(tgt)}: the direct block search covers the llvm "
                          "kernel; the CUDA kernel's knobs are tuned by MetaSchedule (`attnforge "
                          "tune MODEL --target cuda --precision float16`, design space "
                          "attnforge.schedules.attention_cuda_space)")
    kv_heads, kv_len = kv_heads or q_heads, kv_len or q_len
    space = {**DEFAULT_SPACE, **(space or {})}
    for k, vals in space.items():
        if k not in DEFAULT_SPACE or not vals or any(int(v) <= 0 for v in vals):
            raise TuningError(f"space[{k!r}]={vals!r}: expected positive sizes for "
                              f"{tuple(DEFAULT_SPACE)}")
    mask = MaskSpec.causal() if causal else MaskSpec.full()
    sig = attention_signature(batch, q_heads, kv_heads, q_len, kv_len, head_dim,
                              "causal" if causal else "full")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, q_heads, q_len, head_dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, kv_len, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, kv_len, head_dim), dtype=np.float32)
    dev = tvm.cpu()
    tq, tk, tv = (tvm.runtime.tensor(a, dev) for a in (q, k, v))
    combos = [c for c in itertools.product(space["block_q"], space["block_kv"], space["rows"])
              if c[1] % c[2] == 0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(combos), unit="variant", desc=f"attention blocks {sig}")
    results, ref = [], None
    for bq, bk, rows in combos:
        entry = {"block_q": bq, "block_kv": bk, "rows": rows}
        try:
            func, bm = fused_attention_cpu(batch, q_heads, kv_heads, q_len, kv_len, head_dim,
                                           mask=mask, block_q=bq, block_kv=bk, rows=rows)
            lib = tvm.compile(tvm.IRModule({"main": func}), target=tgt)
            arrays = [tvm.runtime.tensor(a, dev) for a in
                      (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
            out = tvm.runtime.empty((batch, q_heads, q_len, head_dim), "float32", dev)
            fn = lib["main"]
            run = lambda: fn(tq, tk, tv, *arrays, out)  # noqa: B023
            entry["ms"] = round(_time(run, repeat), 4)
            o = out.numpy()
            if ref is None:
                ref = o
            entry["max_abs_diff_vs_first"] = float(np.abs(o - ref).max())
            if entry["max_abs_diff_vs_first"] > 1e-3:
                entry["error"] = "result differs from the first variant"
        except Exception as e:  # noqa: BLE001 - an invalid variant is recorded, not fatal
            entry["error"] = str(e).strip().splitlines()[-1][:300] if str(e) else repr(e)
        results.append(entry)
        if bar is not None:
            bar.update(1)
            ok = [r for r in results if "ms" in r and "error" not in r]
            if ok:
                b = min(ok, key=lambda r: r["ms"])
                bar.set_postfix_str(f"best {b['block_q']}/{b['block_kv']}/{b['rows']} "
                                    f"{b['ms']:.2f} ms")
    if bar is not None:
        bar.close()
    ok = [r for r in results if "ms" in r and "error" not in r]
    if not ok:
        raise TuningError(f"no attention variant of {sig} built and ran: "
                          f"{results[0].get('error') if results else 'empty space'}")
    best = min(ok, key=lambda r: r["ms"])
    default = next((r for r in ok if (r["block_q"], r["block_kv"], r["rows"]) == (64, 64, 4)),
                   None)
    out = {"signature": sig, "target_tag": target_tag(tgt), "best": best,
           "default_ms": default["ms"] if default else None, "results": results,
           "repeat": repeat, "tvm_version": tvm.__version__,
           "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if work_dir is not None:
        d = Path(work_dir)
        d.mkdir(parents=True, exist_ok=True)
        with WorkDirLock(d):
            path = d / BLOCKS_FILE
            data = _read(path)
            data[sig] = out
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
    return out


def best_attention_blocks(path, signature: str, target=None) -> dict | None:
    """The recorded best ``{block_q, block_kv, rows, ms}`` for ``signature`` under ``path``
    (a log directory or one above it), or None.  With ``target``, entries measured on another
    target are ignored."""
    from .target import parse_target, target_tag

    tag = target_tag(parse_target(target)) if target is not None else None
    p = Path(path)
    files = [p / BLOCKS_FILE] if (p / BLOCKS_FILE).exists() else sorted(p.rglob(BLOCKS_FILE))
    for f in files:
        entry = _read(f).get(signature)
        if entry and (tag is None or entry.get("target_tag") == tag):
            return dict(entry["best"])
    return None
