"""``make demo``: compile a small GPT-2 on this CPU, verify, export, reload, time it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np


def _median_ms(fn, repeat: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def run_demo(seq_len: int = 256, hidden: int = 256, layers: int = 4, heads: int = 4) -> int:
    import torch

    import attnforge
    from attnforge.models import build_hf_model

    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    print(f"attnforge demo: GPT-2 (hidden {hidden}, {layers} layers, {heads} heads, random "
          f"weights), batch 1, sequence {seq_len}, CPU, {threads} threads")
    model, inputs = build_hf_model("gpt2", seq_len=seq_len, hidden=hidden, layers=layers,
                                   heads=heads)
    t0 = time.perf_counter()
    cm = attnforge.compile_model(model, inputs, target="llvm")
    compile_s = time.perf_counter() - t0
    from attnforge.cli import _summary

    print(_summary(cm.report))
    out_dir = tempfile.mkdtemp(prefix="attnforge-demo-")
    try:
        path = cm.export(os.path.join(out_dir, "gpt2.afm"))
        loaded = attnforge.load(path)
        x = inputs[0]
        with torch.no_grad():
            ref = model(x).logits
        got = loaded(x).logits
        reload_err = float((got - ref).abs().max())
        eager_ms = _median_ms(lambda: model(x))
        ids = x.numpy()
        compiled_ms = _median_ms(lambda: loaded.run_flat(ids))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    v = cm.report["verification"]
    rows = [("compile time", f"{compile_s:.1f} s"),
            ("eager PyTorch", f"{eager_ms:.2f} ms"),
            ("attnforge (exported + reloaded)", f"{compiled_ms:.2f} ms"),
            ("speed-up vs eager", f"{eager_ms / compiled_ms:.2f}x"),
            ("max abs error vs eager (verify)", f"{v['max_abs_err']:.2e}"),
            ("max rel error vs eager (verify)", f"{v['max_rel_err']:.2e}"),
            ("max abs error after reload", f"{reload_err:.2e}")]
    w = max(len(r[0]) for r in rows)
    print("\n| " + "what".ljust(w) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for k, val in rows:
        print(f"| {k.ljust(w)} | {val} |")
    return 0
