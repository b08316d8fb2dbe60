"""fp32 GEMM on the CPU: attnforge's ``MatmulCPU`` rule vs torch (MKL) vs stock TVM.

Shapes (M x N x K, ``y = x @ W + b`` with a constant ``[K, N]`` weight) from a Llama layer at
hidden 512 / seq 1024 and from the demo GPT-2 (hidden 256, seq 256). Both runtimes use 2
threads (``TVM_NUM_THREADS``, default 2, and ``torch.set_num_threads`` with the same value). The machine may be shared, so
every kernel is timed in interleaved rounds and the median round is reported.

bf16 part: the Llama linear shapes (hidden 512, intermediate 1024, vocab 32000 LM head) at
M = 512 and 2048 rows: our bf16 x bf16 -> fp32 ``vdpbf16ps`` kernel
(``schedules/matmul_bf16_cpu.py``, weight packed offline, x rounded to bf16 inside the kernel,
fp32 out) vs our fp32 ``MatmulCPU`` vs torch bf16 (``F.linear`` on bf16 x and W, bf16 out) vs
torch fp32. No bias (Llama has none).

Run: ``python benchmarks/gemm_cpu.py [--rounds 7] [--no-stock] [--only fp32|bf16] [--quick]``
(``--quick``: 2 rounds, M = 512 bf16 shapes only, a smoke test for a loaded machine); writes
``benchmarks/results/gemm_cpu.json`` (``gemm_cpu_t<N>.json`` for other thread counts,
``_quick`` appended with ``--quick``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM uses ONE thread unless this is set
THREADS = int(os.environ["TVM_NUM_THREADS"])

import numpy as np
import torch
import tvm
from attnforge.schedules.matmul_bf16_cpu import bf16_matmul_func, bf16_matmul_reference, pack_weight
from attnforge.schedules.matmul_cpu import MatmulCPU
from tvm import te, topi

SHAPES = [  # (name, M, N, K, time stock TVM too)
    ("llama q/o proj", 1024, 512, 512, False),
    ("llama mlp up", 1024, 1024, 512, False),
    ("llama mlp down", 1024, 512, 1024, False),
    ("llama qkv fused", 1024, 1536, 512, False),
    ("gpt2 c_attn", 256, 768, 256, True),
    ("gpt2 c_proj", 256, 256, 256, True),
    ("gpt2 mlp fc", 256, 1024, 256, True),
    ("gpt2 mlp proj", 256, 256, 1024, True),
]


BF16_SHAPES = [  # (name, N, K) of the Llama config of benchmarks/precision_cpu.py
    ("q/o proj", 512, 512),
    ("mlp gate/up", 1024, 512),
    ("mlp down", 512, 1024),
    ("lm head", 32000, 512),
]
BF16_ROWS = (512, 2048)


def _linear_func(m: int, n: int, k: int):
    x = te.placeholder((m, k), name="x")
    w = te.placeholder((k, n), name="w")
    b = te.placeholder((n,), name="b")
    return te.create_prim_func([x, w, b, topi.add(topi.nn.matmul(x, w), b)])


def _tvm_timer(mod, target, args):
    lib = tvm.compile(mod, target=target)
    lib["main"](*args)
    return lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=1)


def run(rounds: int, stock: bool) -> list[dict]:
    torch.set_num_threads(THREADS)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    rows = []
    for name, m, n, k, with_stock in SHAPES:
        rng = np.random.default_rng(0)
        x, w, b = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (n,)))
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(a, dev) for a in (x, w, b, np.zeros((m, n), np.float32))]
        func = _linear_func(m, n, k)
        ours = _tvm_timer(MatmulCPU().apply(func, target, False).mod, target, args)
        np.testing.assert_allclose(args[3].numpy(), x @ w + b, rtol=1e-4, atol=1e-3)
        timers = {"attnforge": lambda f=ours, a=args: f(*a).mean}
        if stock and with_stock:
            stock_t = _tvm_timer(tvm.IRModule({"main": func}), target, args)
            timers["stock TVM"] = lambda f=stock_t, a=args: f(*a).mean
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w).T.contiguous(), torch.from_numpy(b)

        def torch_t(tx=tx, tw=tw, tb=tb):
            t0 = time.perf_counter()
            for _ in range(3):
                torch.nn.functional.linear(tx, tw, tb)
            return (time.perf_counter() - t0) / 3

        timers["torch"] = torch_t
        samples = {key: [] for key in timers}
        for _ in range(rounds):
            for key, fn in timers.items():
                samples[key].append(fn() * 1e3)
        flop = 2.0 * m * n * k
        row = {"name": name, "M": m, "N": n, "K": k}
        for key, vals in samples.items():
            ms = float(np.median(vals))
            row[key] = {"ms": round(ms, 3), "gflops": round(flop / ms / 1e6, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


def _timed(fn, calls: int):
    def run_calls():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    return run_calls


def run_bf16(rounds: int, row_counts) -> list[dict]:
    """bf16 vs fp32, ours vs torch, on the Llama linear shapes (see the module docstring)."""
    torch.set_num_threads(THREADS)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    dev = tvm.cpu()
    rows = []
    for m in row_counts:
        for name, n, k in BF16_SHAPES:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            calls = 1 if m * n * k > 2e9 else 3
            out = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
            tx, tw = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)
            f32_lib = tvm.compile(MatmulCPU().apply(te.create_prim_func(
                [*(p := [te.placeholder((m, k), name="x"), te.placeholder((k, n), name="w")]),
                 topi.nn.matmul(*p)]), target, False).mod, target=target)
            f32_lib["main"](tx, tw, out)
            np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-3, atol=1e-3)
            bf_lib = tvm.compile(bf16_matmul_func(m, n, k), target=target)
            twp = tvm.runtime.tensor(pack_weight(w), dev)
            bf_lib["main"](tx, twp, out)
            ref = bf16_matmul_reference(x, w)
            err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
            assert err < 1e-5, f"bf16 kernel wrong on {name} M={m}: rel. error {err}"
            xt, wt = torch.from_numpy(x), torch.from_numpy(w.T.copy())
            xb, wb = xt.bfloat16(), wt.bfloat16()
            timers = {
                "ours bf16": _timed(lambda: bf_lib["main"](tx, twp, out), calls),
                "ours fp32": _timed(lambda: f32_lib["main"](tx, tw, out), calls),
                "torch bf16": _timed(lambda: torch.nn.functional.linear(xb, wb), calls),
                "torch fp32": _timed(lambda: torch.nn.functional.linear(xt, wt), calls),
            }
            for fn in timers.values():  # warm-up
                fn()
            samples = {key: [] for key in timers}
            for _ in range(rounds):
                for key, fn in timers.items():
                    samples[key].append(fn() * 1e3)
            flop = 2.0 * m * n * k
            row = {"name": name, "M": m, "N": n, "K": k, "bf16_rel_err_vs_f64": err}
            for key, vals in samples.items():
                ms = float(np.median(vals))
                row[key] = {"ms": round(ms, 3), "gflops": round(flop / ms / 1e6, 1)}
            ours = row["ours bf16"]["ms"]
            row["speedup ours bf16 vs"] = {key: round(row[key]["ms"] / ours, 2)
                                           for key in ("ours fp32", "torch bf16", "torch fp32")}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-stock", action="store_true")
    parser.add_argument("--only", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        opts.rounds = 2
    rows = [] if opts.only == "bf16" else run(opts.rounds, not opts.no_stock)
    bf16_rows = [] if opts.only == "fp32" else run_bf16(
        opts.rounds, BF16_ROWS[:1] if opts.quick else BF16_ROWS)
    suffix = ("" if THREADS == 2 else f"_t{THREADS}") + ("_quick" if opts.quick else "")
    out = pathlib.Path(__file__).parent / "results" / f"gemm_cpu{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": THREADS,
        "rounds": opts.rounds,
        "statistic": "median of interleaved rounds",
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
    }
    meta["command"] = "python benchmarks/gemm_cpu.py " + " ".join(__import__("sys").argv[1:])
    meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta["bf16_note"] = ("ours bf16 includes rounding x from fp32 inside the kernel and "
                         "writes fp32; torch bf16 takes bf16 x and writes bf16")
    # --only: keep the other table (and the meta of the run that measured it) from the file
    prev = json.loads(out.read_text()) if opts.only and out.exists() else {}
    runs = dict(prev.get("runs") or {s: prev["meta"] for s in ("fp32", "bf16") if "meta" in prev})
    runs.update({s: meta for s in ("fp32", "bf16") if opts.only in (None, s)})
    data = {"meta": meta, "runs": runs,
            "rows": prev.get("rows", []) if opts.only == "bf16" else rows,
            "bf16_rows": prev.get("bf16_rows", []) if opts.only == "fp32" else bf16_rows}
    out.write_text(json.dumps(data, indent=1))
    cols = ["attnforge", "torch", "stock TVM"]
    print("\n| shape | M x N x K | " + " | ".join(f"{c} ms (GFLOP/s)" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]['ms']:.2f} ({r[c]['gflops']:.0f})" if c in r else "-" for c in cols]
        print(f"| {r['name']} | {r['M']}x{r['N']}x{r['K']} | " + " | ".join(cells) + " |")
    if bf16_rows:
        cols = ["ours bf16", "ours fp32", "torch bf16", "torch fp32"]
        print("\n| shape | M x N x K | " + " | ".join(f"{c} ms (GFLOP/s)" for c in cols)
              + " | ours bf16 speedup vs ours fp32 / torch bf16 |")
        print("|---|---|" + "---|" * (len(cols) + 1))
        for r in bf16_rows:
            cells = [f"{r[c]['ms']:.2f} ({r[c]['gflops']:.0f})" for c in cols]
            sp = r["speedup ours bf16 vs"]
            print(f"| {r['name']} | {r['M']}x{r['N']}x{r['K']} | " + " | ".join(cells)
                  + f" | {sp['ours fp32']:.2f}x / {sp['torch bf16']:.2f}x |")


if __name__ == "__main__":
    main()
