"""Benchmark: FlexAttention programs compiled by attnforge vs FlexAttention in PyTorch (CPU).

Cases (fp32, B=1, H=8, N=2048, D=64), each a model calling ``flex_attention`` with a
``create_block_mask`` mask and a ``score_mod``: (a) causal + ALiBi (per-head slopes captured
as a parameter), (b) causal sliding window of 256 + tanh softcapping (30), (c) document mask
(4 documents of 512, ids captured as a tensor), no score mod.  Ours: ``attnforge.compile_model``
on llvm (the converter + the fused kernel with the score mod inlined); peers: eager
``flex_attention`` and ``torch.compile(flex_attention)`` with the same mask and score mod.
Medians of ``--repeat`` interleaved runs after warm-up; our output is checked against eager in
the same run.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/flex_cpu.py [--quick] [--out DIR]
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

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=256 (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    return p.parse_args()


class FlexModel(torch.nn.Module):
    def __init__(self, block_mask, score_mod_name, heads):
        super().__init__()
        self.block_mask, self.kind = block_mask, score_mod_name
        self.slope = torch.nn.Parameter(2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads),
                                        requires_grad=False)

    def score_mod(self):
        if self.kind == "alibi":
            return lambda s, b, h, q, k: s + self.slope[h] * (k - q)
        if self.kind == "softcap":
            return lambda s, b, h, q, k: torch.tanh(s / 30.0) * 30.0
        return None

    def forward(self, q, k, v):
        return flex_attention(q, k, v, score_mod=self.score_mod(), block_mask=self.block_mask)


def _cases(n):
    doc = torch.arange(n) // (n // 4)

    def causal(b, h, q, k):
        return q >= k

    def window(b, h, q, k):
        return (q >= k) & (q - k < 256)

    def document(b, h, q, k):
        return doc[q] == doc[k]

    return [("causal + ALiBi", causal, "alibi"), ("window 256 + softcap", window, "softcap"),
            ("document (4 docs)", document, None)]


def _median_ms(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(args):
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    import attnforge

    B, H, N, D = 1, 8, (256 if args.quick else 2048), 64
    load_before = os.getloadavg()
    rows = []
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    for name, mask_mod, sm in _cases(N):
        torch.manual_seed(0)
        bm = create_block_mask(mask_mod, None, None, N, N, device="cpu")
        model = FlexModel(bm, sm, H).eval()
        q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
        t0 = time.perf_counter()
        cm = attnforge.compile_model(model, (q, k, v), target="llvm")
        compile_s = time.perf_counter() - t0
        site = cm.report["attention"][0]
        with torch.no_grad():
            ref = model(q, k, v)
            err = float((cm(q, k, v) - ref).abs().max() / ref.abs().max())
            smod = model.score_mod()

            def ours():
                return cm(q, k, v)

            def eager():
                return flex_attention(q, k, v, score_mod=smod, block_mask=bm)

            def compiled():
                return compiled_flex(q, k, v, score_mod=smod, block_mask=bm)

            compiled()  # compile outside the timing
            times = {"attnforge": [], "flex_eager": [], "flex_torch_compile": []}
            for _ in range(args.repeat):  # interleaved: the machine is shared
                for key, fn in (("attnforge", ours), ("flex_eager", eager),
                                ("flex_torch_compile", compiled)):
                    times[key].append(_median_ms(fn, 1))
        med = {k: round(statistics.median(v), 2) for k, v in times.items()}
        rows.append({"case": name, "ms": med, "rel_err_vs_eager": err,
                     "compile_s": round(compile_s, 1), "mask": site["mask"],
                     "score_mod": site.get("score_mod"),
                     "visited_fraction": site["visited_fraction"],
                     "lowered_to": site["lowered_to"]})
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "float32"}, "rows": rows,
    }
    path = Path(args.out) / ("flex_cpu_quick.json" if args.quick else "flex_cpu.json")
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main(_parse())
