"""fp32 GEMM on the CPU: attnforge's ``MatmulCPU`` rule vs torch (MKL) vs stock TVM.

Shapes (M x N x K, ``y = x @ W + b`` with a constant ``[K, N]`` weight) from a Llama layer at
hidden 512 / seq 1024 and from the demo GPT-2 (hidden 256, seq 256). Both runtimes use 2
threads (``TVM_NUM_THREADS``, default 2, and ``torch.set_num_threads`` with the same value). The machine may be shared, so
every kernel is timed in interleaved rounds and the median round is reported.

Run: ``python benchmarks/gemm_cpu.py [--rounds 7] [--no-stock]``; writes
``benchmarks/results/gemm_cpu.json`` (``gemm_cpu_t<N>.json`` for other thread counts) and
prints a markdown table.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-stock", action="store_true")
    opts = parser.parse_args()
    rows = run(opts.rounds, not opts.no_stock)
    suffix = "" if THREADS == 2 else f"_t{THREADS}"
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
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["attnforge", "torch", "stock TVM"]
    print("\n| shape | M x N x K | " + " | ".join(f"{c} ms (GFLOP/s)" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]['ms']:.2f} ({r[c]['gflops']:.0f})" if c in r else "-" for c in cols]
        print(f"| {r['name']} | {r['M']}x{r['N']}x{r['K']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
