"""Sparsity policies on the fused CPU kernel vs dense SDPA and FlexAttention, N = 1k/4k/16k.

fp32, B=1, H=8, D=64, policies from ``attnforge.sparsity``: ``SlidingWindow(256)``,
``BlockLocal(256)``, ``BigBird(64, 3, 2, 3)``, ``Longformer(256, 64 global tokens)``; each
turned into its MaskSpec and run by ``fused_attention_cpu`` (what ``InsertSparsity`` +
``LowerAttentionToTIR`` build for a site without a mask of its own).  Peers: eager
``F.scaled_dot_product_attention`` with the dense bool mask, and ``flex_attention`` under
``torch.compile`` with ``create_block_mask`` of an equivalent ``mask_mod``.  Dense SDPA's time
does not depend on the mask's content, so at the largest N it is timed once (SlidingWindow's
mask, one run) and that time is reused for the other policies (marked in the JSON).
Interleaved runs (``attention_cpu.bench_interleaved``: median, min and process CPU ms in the
JSON); the plot shows the best run, the figure least disturbed by other load on a shared host.
Our output is checked against SDPA (N <= 4096) or FlexAttention (largest N).

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/sparsity_cpu.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from attention_cpu import _timed, bench_interleaved
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu

from attnforge import sparsity as sp

B, H, D = 1, 8, 64


def policies():
    """``(name, policy, mask_mod factory, FlexAttention block size)``."""
    bb = sp.BigBird(64, 3, 2, 3, seed=0)

    def window(n):
        return lambda b, h, q, k: (q >= k) & (q - k < 256)

    def local(n):
        return lambda b, h, q, k: q // 256 == k // 256

    def bigbird(n):
        lay = torch.from_numpy(bb.layout(n // 64, n // 64, 0))
        return lambda b, h, q, k: lay[q // 64, k // 64]

    def longformer(n):
        return lambda b, h, q, k: ((q - k).abs() <= 128) | (k < 64) | (q < 64)

    return [("SlidingWindow(256)", sp.SlidingWindow(256), window, 128),
            ("BlockLocal(256)", sp.BlockLocal(256), local, 128),
            ("BigBird(64,3,2,3)", bb, bigbird, 64),
            ("Longformer(256, 64 global)", sp.Longformer(256, 64), longformer, 128)]


def _ours(spec, n, target):
    static = spec.kind == "static"
    f, bm = fused_attention_cpu(batch=B, q_heads=H, kv_heads=H, q_len=n, kv_len=n, head_dim=D,
                                mask=spec, mask_input="bool" if static else None,
                                mask_input_shape=(1, 1, n, n) if static else None)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
    arrays = [torch.from_numpy(a) for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    if static:
        arrays.append(torch.from_numpy(spec.static_mask[None]))
    return lib["main"], arrays, bm


def run(sizes, repeat, target, flex_on=True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows, meta = [], []
    sdpa_reuse = None
    for n in sizes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
        largest = n == sizes[-1] and n > 4096
        for name, policy, mask_mod, fblock in policies():
            spec = policy.mask_spec(n, n, H)
            fn, arrays, bm = _ours(spec, n, target)
            out = torch.empty(B, H, n, D)
            fns = {"attnforge fused": lambda fn=fn, a=(q, k, v, *arrays, out): fn(*a)}
            fns["attnforge fused"]()
            keep = None
            if not largest or sdpa_reuse is None:
                keep = torch.from_numpy(np.ascontiguousarray(spec.dense(n, n)[0]))
                fns["SDPA dense (bool mask)"] = lambda a=(q, k, v), m=keep: (
                    F.scaled_dot_product_attention(*a, attn_mask=m))
            if flex_on:
                t0 = time.perf_counter()
                fbm = create_block_mask(mask_mod(n), B=None, H=None, Q_LEN=n, KV_LEN=n,
                                        device="cpu", BLOCK_SIZE=fblock)
                flex = torch.compile(flex_attention)
                ref_flex = flex(q, k, v, block_mask=fbm)
                flex_build = time.perf_counter() - t0
                fns[f"FlexAttention compiled (block {fblock})"] = (
                    lambda f=flex, a=(q, k, v), m=fbm: f(*a, block_mask=m))
            if keep is not None and not largest:
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                against = "SDPA"
            else:
                ref, against = ref_flex, "FlexAttention"
            err = float((out - ref).abs().max() / ref.abs().max())
            sdpa = fns.pop("SDPA dense (bool mask)") if largest and keep is not None else None
            res = bench_interleaved(fns, repeat, warmup=1)
            if sdpa is not None:  # seconds per call: one run, no warm-up
                ms, cpu = _timed(sdpa)
                sdpa_reuse = {"ms": ms, "min_ms": ms, "cpu_ms": cpu, "runs": 1}
                res["SDPA dense (bool mask)"] = sdpa_reuse
            elif largest:
                res["SDPA dense (bool mask)"] = dict(sdpa_reuse, reused_from="SlidingWindow(256)")
            for impl, t in res.items():
                rows.append({"n": n, "policy": name, "impl": impl, **t})
            meta.append({"n": n, "policy": name, "mask": spec.describe(),
                         "visited_fraction": bm.visited_fraction,
                         "partial_fraction": bm.partial_fraction,
                         "max_rel_err": err, "checked_against": against,
                         "flex_build_s": flex_build if flex_on else None})
            line = ", ".join(f"{i} {t['ms']:.1f} ms" for i, t in res.items())
            print(f"N={n} {name}: {line}; err vs {against} {err:.1e}", flush=True)
    return rows, meta


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, (name, *_rest) in zip(axes, policies()):
        for impl, style in (("attnforge fused", "o-"), ("FlexAttention", "s--"),
                            ("SDPA dense", "^:")):
            pts = sorted((r["n"], r["min_ms"]) for r in rows
                         if r["policy"] == name and r["impl"].startswith(impl))
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        ns = sorted({r["n"] for r in rows})
        base = next((r["min_ms"] for r in rows if r["policy"] == name and r["n"] == ns[0]
                     and r["impl"] == "attnforge fused"), None)
        if base:
            ax.plot(ns, [base * x / ns[0] for x in ns], color="grey", lw=0.8, label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("sequence length N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("best of runs, ms (B1 H8 D64 fp32, 2 threads)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if "OMP_WAIT_POLICY" not in os.environ:
        # torch's OpenMP workers otherwise spin after each call and slow the TVM thread pool
        # that runs next in the interleaved loop; it must be set before torch is loaded.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 512, 1024 (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    a = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))
    torch.set_num_threads(a.threads)
    for key in ("recompile_limit", "cache_size_limit"):  # one flex compile per mask and N
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    sizes = [512, 1024] if a.quick else [1024, 4096, 16384]
    t0 = time.perf_counter()
    target = default_cpu_target()
    rows, meta = run(sizes, a.repeat, target, flex_on=not a.no_flex)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sparsity_cpu_quick" if a.quick else "sparsity_cpu"
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg": os.getloadavg(), "tvm_num_threads": os.environ["TVM_NUM_THREADS"],
           "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "tvm": tvm.__version__, "target": str(target), "shape": {"B": B, "H": H, "D": D},
           "dtype": "float32", "command": " ".join(sys.argv), "total_s": None,
           "cases": meta, "results": rows}
    plot(rows, out / f"{stem}.png")
    doc["total_s"] = round(time.perf_counter() - t0, 1)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / stem}.json/.png in {doc['total_s']} s")


if __name__ == "__main__":
    main()
