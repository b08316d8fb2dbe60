"""INT8 GEMM on the CPU: attnforge's VNNI kernel vs our fp32 ``MatmulCPU`` rule vs torch.

``y = dequant(u8 A @ s8 W.T) + b`` (fp32 out, per-channel scales, bias fused) against
``y = x @ W + b`` in fp32 (our rule), ``F.linear`` fp32 (torch/MKL) and ``torch._int_mm``
(s8 x s8 -> int32, no dequant). Activations are assumed already quantised (u8 input), the
weight packed offline. 2 threads (``TVM_NUM_THREADS``, ``torch.set_num_threads``); kernels
are timed in interleaved rounds and the median round is reported; the load average is recorded
(the machine is shared).

``--e2e`` also times tiny HF Llamas end to end (import -> attention passes -> INT8 passes with
the LM head kept fp32 -> our CPU build) against the same fp32 pipeline, with accuracy on
held-out inputs (``attnforge.accuracy.accuracy_metrics``; calibration on 8 other batches).

Run: ``python benchmarks/int8_cpu.py [--rounds 5] [--e2e] [--no-gemm]``; writes
``benchmarks/results/int8_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM uses ONE thread unless this is set
THREADS = int(os.environ["TVM_NUM_THREADS"])

import numpy as np
import torch
import tvm
from attnforge.schedules.matmul_cpu import MatmulCPU
from attnforge.schedules.matmul_int8_cpu import (
    int8_matmul_func,
    int8_matmul_reference,
    pack_weight,
)
from tvm import te, topi

SHAPES = [(m, n, k) for m in (512, 1024) for n, k in
          ((512, 512), (2048, 512), (512, 2048), (2048, 2048))]
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})


def _fp32_func(m: int, n: int, k: int):
    x = te.placeholder((m, k), name="x")
    w = te.placeholder((k, n), name="w")
    b = te.placeholder((n,), name="b")
    return te.create_prim_func([x, w, b, topi.add(topi.nn.matmul(x, w), b)])


def _tvm_timer(func, args):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    lib["main"](*args)
    ev = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=1)
    return lib, (lambda: ev(*args).mean)


def _torch_timer(fn):
    def timer():
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3
    return timer


def run(rounds: int) -> list[dict]:
    torch.set_num_threads(THREADS)
    dev = tvm.cpu()
    rows = []
    for m, n, k in SHAPES:
        rng = np.random.default_rng(0)
        x, wf, b = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (n,)))
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        w8 = rng.integers(-127, 128, (n, k), dtype=np.int8)
        scale = rng.random(n, dtype=np.float32)
        i8_args = [tvm.runtime.tensor(v, dev) for v in
                   (a, pack_weight(w8), scale, b, np.zeros((m, n), np.float32))]
        _, ours8 = _tvm_timer(int8_matmul_func(m, n, k), i8_args)
        acc = int8_matmul_reference(a, w8).astype(np.float32)
        np.testing.assert_allclose(i8_args[-1].numpy(), acc * scale + b, rtol=1e-5, atol=1e-2)
        f_args = [tvm.runtime.tensor(v, dev) for v in (x, wf, b, np.zeros((m, n), np.float32))]
        _, ours32 = _tvm_timer(MatmulCPU().apply(_fp32_func(m, n, k), TARGET, False).mod["main"],
                               f_args)
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(wf.T.copy()), torch.from_numpy(b)
        ta = torch.from_numpy(a.view(np.int8)).contiguous()
        tw8 = torch.from_numpy(w8.T.copy())
        timers = {
            "attnforge int8 (VNNI)": ours8,
            "attnforge fp32": ours32,
            "torch fp32": _torch_timer(
                lambda tx=tx, tw=tw, tb=tb: torch.nn.functional.linear(tx, tw, tb)),
            "torch._int_mm": _torch_timer(lambda ta=ta, tw8=tw8: torch._int_mm(ta, tw8)),
        }
        samples = {key: [] for key in timers}
        for _ in range(rounds):
            for key, fn in timers.items():
                samples[key].append(fn() * 1e3)
        ops = 2.0 * m * n * k
        row = {"M": m, "N": n, "K": k, "load_average": os.getloadavg()[0]}
        for key, vals in samples.items():
            ms = float(np.median(vals))
            row[key] = {"ms": round(ms, 3), "gops": round(ops / ms / 1e6, 1)}
        row["int8 / our fp32"] = round(row["attnforge fp32"]["ms"] /
                                       row["attnforge int8 (VNNI)"]["ms"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


E2E_MODELS = [  # (hidden, layers, seq_len)
    (128, 2, 64),
    (512, 2, 512),
]


def _vm(mod):
    from attnforge.schedules.cpu_schedule import cpu_build_pipeline
    from tvm import relax

    mod = cpu_build_pipeline(TARGET)(mod)
    with tvm.transform.PassContext(opt_level=3):
        return relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())


def run_e2e(rounds: int) -> list[dict]:
    from attnforge.frontends import import_torch_model
    from attnforge.passes import attention_pipeline
    from tvm import relax

    from attnforge.accuracy import accuracy_metrics, held_out_inputs
    from attnforge.models import build_hf_model
    from attnforge.quantization import quantize_int8

    rows = []
    for hidden, layers, seq in E2E_MODELS:
        model, inputs = build_hf_model("llama", hidden=hidden, layers=layers, seq_len=seq,
                                       heads=max(4, hidden // 64))
        mod = attention_pipeline(TARGET)(import_torch_model(model, inputs).mod)
        mod = relax.transform.FoldConstant()(mod)
        calib = [held_out_inputs(inputs, seed=s) for s in range(8)]
        qmod = quantize_int8(mod, calib, TARGET, exclude=["lm_head"], model=model)
        vms = {"int8": _vm(qmod), "fp32": _vm(mod)}
        ref, got = [], []
        for s in range(100, 104):
            xs = held_out_inputs(inputs, seed=s)
            with torch.no_grad():
                ref.append(model(*xs).logits.numpy())
            out = vms["int8"]["main"](*[tvm.runtime.tensor(x.numpy()) for x in xs])
            got.append((out if hasattr(out, "numpy") else out[0]).numpy())
        acc = accuracy_metrics([np.concatenate(ref)], [np.concatenate(got)], ["logits"])
        args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
        samples = {k: [] for k in vms}
        for _ in range(rounds):
            for k, vm in vms.items():
                t0 = time.perf_counter()
                for _ in range(3):
                    vm["main"](*args)
                samples[k].append((time.perf_counter() - t0) / 3 * 1e3)
        row = {"model": f"llama hidden={hidden} layers={layers} seq={seq}",
               "load_average": os.getloadavg()[0],
               **{f"{k} ms": round(float(np.median(v)), 3) for k, v in samples.items()},
               "accuracy": acc["outputs"][0]}
        row["speedup"] = round(row["fp32 ms"] / row["int8 ms"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--e2e", action="store_true")
    parser.add_argument("--no-gemm", action="store_true")
    opts = parser.parse_args()
    out = pathlib.Path(__file__).parent / "results" / "int8_cpu.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = old.get("rows", []) if opts.no_gemm else run(opts.rounds)
    e2e = run_e2e(opts.rounds) if opts.e2e else old.get("e2e", [])
    meta = {"threads": THREADS, "rounds": opts.rounds,
            "statistic": "median of interleaved rounds", "tvm": tvm.__version__,
            "torch": torch.__version__, "load_average_end": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "e2e": e2e}, indent=1))
    cols = ["attnforge int8 (VNNI)", "attnforge fp32", "torch fp32", "torch._int_mm"]
    print("\n| M x N x K | " + " | ".join(f"{c} ms (GOP/s)" for c in cols) + " | speedup |")
    print("|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = [f"{r[c]['ms']:.2f} ({r[c]['gops']:.0f})" for c in cols]
        print(f"| {r['M']}x{r['N']}x{r['K']} | " + " | ".join(cells)
              + f" | {r['int8 / our fp32']}x |")


if __name__ == "__main__":
    main()
