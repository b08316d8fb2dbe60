"""Symbolic-length (dynamic) fused attention vs the static-shape kernel and SDPA, and the
length dispatch kernel, on the CPU.

Cases (fp32, B=1, H=8, D=64) at N = 1024 and 4096: causal attention by (a) our static kernel
compiled for that N (block layout a constant), (b) our dynamic kernel compiled ONCE for a
symbolic N (block layout computed at run time by ``attnforge_block_mask``, timed together
with the kernel), (c) ``Dispatch(threshold=2048, long=SlidingWindow(256))`` as one dynamic
kernel (dense causal at 1k, causal window of 256 at 4k), (d) eager
``F.scaled_dot_product_attention(is_causal=True)``.  Medians of round-robin runs; outputs
checked against SDPA (with the window mask for the dispatch's long side).

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/dispatch_cpu.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.attention_cpu_dynamic import fused_attention_cpu_dynamic
from attnforge.schedules.block_mask import MaskSpec
from attnforge.schedules.block_mask_runtime import DispatchMask

sys.path.insert(0, str(Path(__file__).parent))
from attention_cpu import bench_interleaved  # noqa: E402

B, H, D = 1, 8, 64
THRESHOLD, WINDOW = 2048, 256


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _dynamic(spec, target):
    kernel, layout = fused_attention_cpu_dynamic(None, H, H, None, None, D, mask=spec)
    fk = tvm.compile(tvm.IRModule({"k": kernel.with_attr("global_symbol", "k")}), target=target)
    fl = tvm.compile(tvm.IRModule({"l": layout.with_attr("global_symbol", "l")}), target=target)
    return fk["k"], fl["l"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    load_before = os.getloadavg()
    target = default_cpu_target()
    dyn_causal = _dynamic(MaskSpec.causal(), target)
    dispatch = _dynamic(DispatchMask(THRESHOLD, MaskSpec.causal(),
                                     MaskSpec.sliding_window(WINDOW - 1, 0)), target)
    rows = []
    for n in (1024, 4096):
        rng = np.random.default_rng(n)
        q, k, v = (rng.standard_normal((B, H, n, D), dtype=np.float32) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        prim, bm = fused_attention_cpu(B, H, H, n, n, D, mask=MaskSpec.causal())
        static = tvm.compile(tvm.IRModule({"s": prim.with_attr("global_symbol", "s")}),
                             target=target)["s"]
        bm_args = [_t(a.astype("int32")) for a in (bm.kv_num_blocks, bm.kv_indices,
                                                    bm.kv_is_full)]
        nb = -(-n // 64)
        lay = [_t(np.zeros(s, "int32")) for s in ((1, nb), (1, nb, nb), (1, nb, nb))]
        ins = [_t(a) for a in (q, k, v)]
        outs = {name: _t(np.zeros((B, H, n, D), "float32"))
                for name in ("static", "dynamic", "dispatch")}

        def run_dyn(pair, name):
            kern, layout = pair
            layout(ins[0], ins[1], *lay)
            kern(*ins, *lay, outs[name])

        fns = {
            "ours_static": lambda: static(*ins, *bm_args, outs["static"]),
            "ours_dynamic": lambda: run_dyn(dyn_causal, "dynamic"),
            "ours_dispatch": lambda: run_dyn(dispatch, "dispatch"),
            "sdpa": lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True),
        }
        times = bench_interleaved(fns, args.repeat)
        ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).numpy()
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        dmask = torch.from_numpy((d >= 0) & (d < WINDOW))
        ref_disp = ref if n < THRESHOLD else F.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=dmask).numpy()
        errs = {"ours_static": outs["static"].numpy(), "ours_dynamic": outs["dynamic"].numpy(),
                "ours_dispatch": outs["dispatch"].numpy()}
        errs = {k2: float(np.abs(o - (ref_disp if k2 == "ours_dispatch" else ref)).max())
                for k2, o in errs.items()}
        side = "long (window 256)" if n >= THRESHOLD else "short (causal)"
        rows.append({"n": n, "times_ms": times, "max_abs_err": errs, "dispatch_side": side})
        print(n, {k2: round(t["ms"], 2) for k2, t in times.items()}, errs, flush=True)
    result = {
        "benchmark": "dispatch_cpu", "command": "TVM_NUM_THREADS=2 .venv/bin/python "
        "benchmarks/dispatch_cpu.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"B": B, "H": H, "D": D, "dtype": "float32"},
        "threads": os.environ.get("TVM_NUM_THREADS"), "tvm": tvm.__version__,
        "torch": torch.__version__, "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "shared 2-core host: other engineers' jobs add noise (see loadavg)",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dispatch_cpu.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out / 'dispatch_cpu.json'}")


if __name__ == "__main__":
    main()
