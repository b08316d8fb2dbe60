"""Benchmark of attnforge's fused CPU attention kernel against PyTorch and stock TVM.

Cases (fp32, B=1, H=8, D=64): (a) causal N=2048, (b) causal sliding window of 256 keys at
N=8192, (c) a BigBird-style static block layout at N=4096 (blocks of 64: a 3-block window,
2 global blocks, 3 random blocks per row; seeded).  Peers: eager
``F.scaled_dot_product_attention`` (``is_causal`` or the dense bool mask), ``torch.compile`` of
the hand-written matmul/mask/softmax/matmul, FlexAttention under ``torch.compile`` with the
equivalent ``BlockMask``, and stock TVM (``from_exported_program`` + ``tvm.compile``) for (a)
only, timed once.  Times are medians after warm-up; GFLOP/s count only visited blocks
(4·B·H·visited_pairs·D).  Our output is checked against SDPA in the same run.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/attention_cpu.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.block_mask import MaskSpec


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for attention_cpu.json")
    p.add_argument("--threads", type=int, default=2, help="TVM_NUM_THREADS and torch threads")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per implementation")
    p.add_argument("--no-stock-tvm", action="store_true", help="skip the slow stock TVM peer")
    return p.parse_args()




def _timed(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def bench_interleaved(fns: dict, repeat: int, warmup: int = 2) -> dict:
    """Time several implementations round-robin (so that load from other processes on a
    shared host hits all of them alike): median / min wall ms and median process CPU ms
    (all threads; on an idle host wall ~= cpu / threads for a kernel that scales)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(_timed(fn))
    out = {}
    for name, xs in samples.items():
        ts, cs = [x[0] for x in xs], [x[1] for x in xs]
        out[name] = {"ms": statistics.median(ts), "min_ms": min(ts),
                     "cpu_ms": statistics.median(cs), "runs": len(xs)}
    return out


def bigbird_layout(nb: int, window: int = 3, n_global: int = 2, n_random: int = 3,
                   seed: int = 0) -> np.ndarray:
    """Bool [nb, nb] block layout: sliding window, global rows/columns, random blocks."""
    rng = np.random.default_rng(seed)
    lay = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        lay[i, max(0, i - window // 2): i + window // 2 + 1] = True
        lay[i, rng.choice(nb, size=min(n_random, nb), replace=False)] = True
    lay[:, :n_global] = True
    lay[:n_global, :] = True
    return lay


class HandWritten(torch.nn.Module):
    """matmul / mask / softmax / matmul, as people write it."""

    def __init__(self, mask: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("mask", mask)
        self.scale = scale

    def forward(self, q, k, v):
        s = (q @ k.transpose(-1, -2)) * self.scale
        s = s.masked_fill(~self.mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def stock_tvm(mod: torch.nn.Module, q, k, v, target):
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(mod, (q, k, v))
    ex = tvm.compile(from_exported_program(ep), target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    tq, tk, tv = (tvm.runtime.tensor(x.numpy()) for x in (q, k, v))
    return lambda: vm["main"](tq, tk, tv)


def run_case(name, n, spec, dense_mask, mask_mod, flex_block, sdpa_causal, peers, target,
             repeat, stock=False):
    B, H, D = 1, 8, 64
    scale = D ** -0.5
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    use_tensor = spec.kind == "static"
    f, bm = fused_attention_cpu(batch=B, q_heads=H, kv_heads=H, q_len=n, kv_len=n, head_dim=D,
                                scale=scale, mask=spec,
                                mask_input="bool" if use_tensor else None,
                                mask_input_shape=(1, 1, n, n) if use_tensor else None)
    t0 = time.perf_counter()
    lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
    build_s = time.perf_counter() - t0
    arrays = [torch.from_numpy(a) for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    if use_tensor:
        arrays.append(torch.from_numpy(np.ascontiguousarray(dense_mask[None, None])))
    out = torch.empty(B, H, n, D)
    fn = lib["main"]
    fns = {"attnforge (TVM fused)": lambda: fn(q, k, v, *arrays, out)}
    fns["attnforge (TVM fused)"]()
    visited = bm.visited_elements() * H * B  # Hm == 1: the layout is shared by all heads
    gflop = 4.0 * visited * D / 1e9

    mask_t = torch.from_numpy(np.ascontiguousarray(dense_mask))
    sdpa_kw = {"is_causal": True} if sdpa_causal else {"attn_mask": mask_t}

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **sdpa_kw)

    ref = sdpa()
    err = float((out - ref).abs().max() / ref.abs().max())
    if "sdpa" in peers:
        fns["SDPA eager" + (" (is_causal)" if sdpa_causal else " (bool mask)")] = sdpa
    if "compile" in peers:
        hw = torch.compile(HandWritten(mask_t, scale))
        fns["hand-written, torch.compile"] = lambda: hw(q, k, v)
    if "flex" in peers:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        fbm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu",
                                BLOCK_SIZE=flex_block)
        flex = torch.compile(flex_attention)
        fns[f"FlexAttention, torch.compile (block {flex_block})"] = lambda: flex(
            q, k, v, block_mask=fbm, scale=scale)
    rows = [dict(impl=k_, **t) for k_, t in bench_interleaved(fns, repeat).items()]
    ours = rows[0]["ms"]
    if stock:  # ~9 s per call: one cold run
        run = stock_tvm(HandWritten(mask_t, scale), q, k, v, target)
        ms, cpu = _timed(run)
        rows.append({"impl": "stock TVM (from_exported_program, llvm), 1 run", "ms": ms,
                         "min_ms": ms, "cpu_ms": cpu, "runs": 1})
    for r in rows:
        r.update(case=name, speedup_of_attnforge=r["ms"] / ours,
                 gflops_visited=gflop / (r["ms"] / 1e3))
    meta = {"case": name, "n": n, "mask": spec.describe(), "visited_fraction": bm.visited_fraction,
                "partial_fraction": bm.partial_fraction, "visited_gflop": gflop,
                "attnforge_build_s": build_s, "max_rel_err_vs_sdpa": err}
    print(f"  {name}: ours {ours:.2f} ms, rel err vs SDPA {err:.2e}", flush=True)
    return rows, meta


def cases(quick: bool):
    n_a, n_b, w, n_c = (256, 1024, 64, 512) if quick else (2048, 8192, 256, 4096)

    def causal(b, h, qi, ki):
        return qi >= ki

    def window(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < w)

    lay = bigbird_layout(n_c // 64)
    lay_t = torch.from_numpy(lay)
    dense_c = np.repeat(np.repeat(lay, 64, 0), 64, 1)

    def bigbird(b, h, qi, ki):
        return lay_t[qi // 64, ki // 64]

    allp = ("sdpa", "compile", "flex")
    yield {"name": f"causal N={n_a}", "n": n_a, "spec": MaskSpec.causal(),
               "dense_mask": MaskSpec.causal().dense(n_a, n_a)[0], "mask_mod": causal,
           "flex_block": 128,
               "sdpa_causal": True, "peers": allp, "stock": True}
    spec_b = MaskSpec.sliding_window(w - 1, 0)
    yield {"name": f"sliding window {w} (causal) N={n_b}", "n": n_b, "spec": spec_b,
               "dense_mask": spec_b.dense(n_b, n_b)[0], "mask_mod": window, "flex_block": 128,
               "sdpa_causal": False, "peers": ("sdpa", "flex") if not quick else allp}
    yield {"name": f"BigBird blocks N={n_c}", "n": n_c, "spec": MaskSpec.static(dense_c),
               "dense_mask": dense_c, "mask_mod": bigbird, "flex_block": 64, "sdpa_causal": False,
               "peers": allp}


def markdown(rows) -> str:
    lines = [("| case | implementation | median ms | min ms | CPU ms | attnforge speedup "
              "| GFLOP/s (visited) |"), "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.2f} | {r['min_ms']:.2f} | "
                     f"{r['cpu_ms']:.1f} | {r['speedup_of_attnforge']:.2f}x | "
                     f"{r['gflops_visited']:.1f} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.processor()
    except OSError:
        return platform.processor()


def main(args: argparse.Namespace) -> None:
    # TVM's thread pool starts at the first parallel call and reads TVM_NUM_THREADS then.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    target = default_cpu_target()
    load_before = os.getloadavg()
    all_rows, metas = [], []
    for c in cases(args.quick):
        stock = c.pop("stock", False) and not args.no_stock_tvm
        print(f"running {c['name']} ...", flush=True)
        rows, meta = run_case(**c, target=target, repeat=args.repeat, stock=stock)
        all_rows += rows
        metas.append(meta)
    table = markdown(all_rows)
    print(table)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "target": str(target), "threads": args.threads,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
        "command": " ".join([f"TVM_NUM_THREADS={args.threads}", "python"] + sys.argv),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "quick": args.quick,
        "config": {"batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32", "block_q": 64,
                   "block_kv": 64},
        "cases": metas, "results": all_rows, "markdown": table}
    load = max(load_before[0], result["loadavg_after"][0])
    if load > 1.5 * (os.cpu_count() or 1):
        result["note"] = (f"shared host under load (1-min load average up to {load:.1f} on "
                          f"{os.cpu_count()} CPUs): wall times include waiting for a CPU; "
                          "compare 'cpu_ms' (process CPU time, all threads) between peers")
        print(result["note"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_cpu.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out / 'attention_cpu.json'}")
    bad = [m for m in metas if not m["max_rel_err_vs_sdpa"] < 1e-4]
    if bad:
        raise SystemExit(f"attnforge output differs from SDPA: {bad}")


if __name__ == "__main__":
    main(_parse())
