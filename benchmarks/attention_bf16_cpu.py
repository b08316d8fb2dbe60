"""bf16 fused attention on the CPU: ``vdpbf16ps`` kernel vs the fp32-widening kernel vs torch.

Causal self-attention, B=1, H=8, D=64, N in (512, 2048) (``--quick``: 512 only), 2 threads.
Rows: ``schedules/attention_cpu_bf16.py`` (bf16 Q/K/V, Q Kᵀ and P V on ``vdpbf16ps``; what
``precision="bfloat16"`` runs on AVX-512 BF16 CPUs), ``schedules/attention_cpu.py`` on the same
bf16 inputs (widened to fp32 inside; the earlier bf16 path) and on fp32 inputs, and torch's
``F.scaled_dot_product_attention(is_causal=True)`` in bf16 and fp32. GFLOP/s counted the
FlashAttention way (4 N^2 D per head, halved for causal). Each kernel is checked against a
float64 reference first (max error / max |ref| printed). Timings: median of interleaved
rounds (each (2048/N)^2 calls); the machine may be shared (load average recorded).

Run: ``TVM_NUM_THREADS=2 python benchmarks/attention_bf16_cpu.py [--rounds 5] [--quick]``;
writes ``benchmarks/results/attention_bf16_cpu.json`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM uses ONE thread unless this is set
THREADS = int(os.environ["TVM_NUM_THREADS"])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu  # noqa: E402
from attnforge.schedules.attention_cpu_bf16 import fused_attention_cpu_bf16  # noqa: E402
from attnforge.schedules.block_mask import MaskSpec  # noqa: E402

B, H, D = 1, 8, 64


def _reference(q, k, v, scale):
    q, k, v = (x.double() for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            scale=scale).numpy()


def run(n: int, rounds: int) -> dict:
    target = default_cpu_target()
    scale = D ** -0.5
    torch.manual_seed(0)
    q32, k32, v32 = (torch.randn(B, H, n, D) for _ in range(3))
    qb, kb, vb = (x.bfloat16() for x in (q32, k32, v32))
    kw = dict(batch=B, q_heads=H, kv_heads=H, q_len=n, kv_len=n, head_dim=D, scale=scale,
              mask=MaskSpec.causal())
    cases = {  # name -> (generator, dtype, inputs)
        "ours bf16 vdpbf16ps": (fused_attention_cpu_bf16, "bfloat16", (qb, kb, vb)),
        "ours bf16 widened to fp32": (fused_attention_cpu, "bfloat16", (qb, kb, vb)),
        "ours fp32": (fused_attention_cpu, "float32", (q32, k32, v32)),
    }
    timers, errors = {}, {}
    calls = max(1, (2048 // n) ** 2)  # ~the same work per sample at every N
    for name, (gen, dtype, ins) in cases.items():
        func, bm = gen(**kw, dtype=dtype)
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
        out = torch.zeros(B, H, n, D, dtype=ins[0].dtype)
        args = [*ins, *(torch.from_numpy(np.ascontiguousarray(a)) for a in
                        (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)), out]
        lib["main"](*args)
        ref = _reference(*ins, scale)
        errors[name] = float(np.abs(out.float().numpy() - ref).max() / np.abs(ref).max())

        def timed(lib=lib, args=args):
            t0 = time.perf_counter()
            for _ in range(calls):
                lib["main"](*args)
            return (time.perf_counter() - t0) / calls

        timers[name] = timed
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name, ins in (("torch sdpa bf16", (qb, kb, vb)), ("torch sdpa fp32", (q32, k32, v32))):
        def timed(ins=ins):
            t0 = time.perf_counter()
            for _ in range(calls):
                sdpa(*ins, is_causal=True, scale=scale)
            return (time.perf_counter() - t0) / calls

        timers[name] = timed
    for fn in timers.values():  # warm-up
        fn()
    samples = {name: [] for name in timers}
    for _ in range(rounds):
        for name, fn in timers.items():
            samples[name].append(fn() * 1e3)
    flop = 4.0 * B * H * n * n * D / 2
    row = {"N": n, "B": B, "H": H, "D": D, "mask": "causal", "rel_err_vs_f64": errors}
    for name, vals in samples.items():
        ms = float(np.median(vals))
        row[name] = {"ms": round(ms, 2), "gflops": round(flop / ms / 1e6, 1)}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(THREADS)
    rows = [run(n, opts.rounds) for n in ((512,) if opts.quick else (512, 2048))]
    out = pathlib.Path(__file__).parent / "results" / (
        "attention_bf16_cpu" + ("_quick" if opts.quick else "") + ".json")
    meta = {"command": "python benchmarks/attention_bf16_cpu.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "threads": THREADS, "rounds": opts.rounds, "statistic": "median of interleaved rounds",
            "tvm": tvm.__version__, "torch": torch.__version__, "load_average": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ms" in rows[0][k]]
    print("\n| N | " + " | ".join(f"{k} ms (GFLOP/s)" for k in names) + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['N']} | " + " | ".join(f"{r[k]['ms']:.1f} ({r[k]['gflops']:.0f})"
                                           for k in names) + " |")


if __name__ == "__main__":
    main()
