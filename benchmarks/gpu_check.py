"""One short GPU session on an H200: checks and timings (< 10 min), CUDA tuning (~3 min).

(a) every CUDA fused-attention variant (fp16/bf16, D 64/128, block_q 64/128, stages 1-3,
    causal / window / chunked / static block-sparse / dynamic bool+additive masks, GQA/MQA,
    ragged lengths, fully masked rows) against a float64 PyTorch reference on the GPU, with
    fresh random inputs and the output poisoned with NaN first;
(b) HF models end to end: ``attnforge.compile_model(model, inputs, target="cuda")`` vs eager;
(c) timings, B=4 H=16 D=128 fp16, N = 1k/4k/16k; causal, sliding window 512, BigBird
    (128-blocks: 3-block window, 2 global, 3 random): ours vs ``F.scaled_dot_product_attention``
    (flash backend when causal/full, else efficient with the dense mask) and FlexAttention under
    ``torch.compile`` with the same block mask.  TFLOP/s = 4·B·H·D·visited (query, key) pairs.

(d) after (a)-(c): a bounded CUDA tuning stage (``--tune-s``, default 180 s of wall time in
    all): MetaSchedule on this GPU, fp16 (``precision="float16"``), XGBoost cost model,
    evolutionary search, the local runner (builder timeout 60 s, runner timeout 60 s,
    3 runs x >= 40 ms per measurement):
    * ``attention-causal-n2048-float16``: an SDPA module, B1 H8 N2048 D64, causal, only the
      fused attention task (design space ``schedules/attention_cuda_space.py``), 16 trials;
    * ``llama-h512-l2-s512-float16``: the HF Llama config of ``benchmarks/tuning_cpu.py``
      (hidden 512, 2 layers, 8 heads, seq 512), only its matmul tasks, 48 trials.
    Each job runs in its own process with a soft deadline (checked after every measured batch:
    the job stops, records kept) and a hard one 15 s later (process group killed).  Logs go to
    ``OUT_DIR/tuning_logs/cuda-<arch>/<workload>/`` (MetaSchedule ``JSONDatabase`` +
    ``meta.json``, which ``attnforge.compile_model`` applies through its gate): copy them into
    the repository's ``tuning_logs/`` and commit.  A failed job is recorded in
    ``results.json`` (``tuning``), it never fails the script.

Writes ``table.md`` and ``results.json`` into OUT_DIR.  ``--dry-run`` builds every kernel
(tvm.compile for cuda, optionally ``--nvcc`` to cubin) and exits before touching a GPU; with
``--only tuning`` it instead extracts the tuning jobs' tasks for cuda (no measuring).
One 10-minute device slot may not hold everything: ``--only checks`` runs (a)-(c),
``--only tuning`` (d) alone (e.g. as a second command).

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--quick] [--nvcc] [--budget-s 540]
                                   [--only all|checks|tuning] [--tune-s 180]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from attnforge.schedules.attention_cuda import cuda_target, fused_attention_cuda
from attnforge.schedules.block_mask import MaskSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from gpu_tuning_stage import TUNE_JOBS, run_tuning, tune_job, tuning_dry_run  # noqa: E402

T0 = time.time()
WARP_ROWS = (16, 32)  # both kernel layouts are timed: the H200 run picks the default


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="build only, never touch a GPU")
    p.add_argument("--quick", action="store_true", help="a few variants and N=1k only")
    p.add_argument("--nvcc", action="store_true", help="dry run: also nvcc every kernel")
    p.add_argument("--arch", default=None, help="default: the GPU's (dry run: sm_90)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip what would run past it")
    p.add_argument("--only", choices=["all", "checks", "tuning"], default="all",
                   help="checks: (a)-(c); tuning: (d) the CUDA tuning stage; all: both")
    p.add_argument("--tune-s", type=float, default=180.0,
                   help="wall-time budget of the whole tuning stage (0: skip it)")
    p.add_argument("--tune-job", choices=sorted(TUNE_JOBS), default=None,
                   help=argparse.SUPPRESS)  # internal: one tuning job in this process
    p.add_argument("--job-budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _bigbird(nb, window=3, n_global=2, n_random=3, seed=0):
    rng = np.random.default_rng(seed)
    lay = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        lay[i, max(0, i - window // 2): i + window // 2 + 1] = True
        lay[i, rng.choice(nb, size=min(n_random, nb), replace=False)] = True
    lay[:, :n_global] = True
    lay[:n_global, :] = True
    return lay


def correctness_variants(quick: bool):
    """(name, kernel kwargs, mask-tensor maker or None)."""
    rng = np.random.default_rng(0)

    def sparse(nq, nk):
        lay = rng.random((-(-nq // 64), -(-nk // 64))) < 0.5
        m = np.kron(lay, np.ones((64, 64), bool))[:nq, :nk] & (rng.random((nq, nk)) < 0.9)
        m[:, 0] = True
        return m

    static = sparse(640, 640)

    def case(name, mk=None, **kw):
        return name, kw, mk

    causal, dyn = MaskSpec.causal(), MaskSpec.dynamic()
    v = [
        case("fp16 D128 bq128 causal GQA ragged", batch=2, q_heads=8, kv_heads=2, q_len=1000,
             kv_len=1000, head_dim=128, dtype="float16", mask=causal, block_q=128),
        case("bf16 D128 bq128 causal GQA ragged", batch=2, q_heads=8, kv_heads=2, q_len=1000,
             kv_len=1000, head_dim=128, dtype="bfloat16", mask=causal, block_q=128),
        case("fp16 D64 bq64 window128 3 stages", batch=1, q_heads=4, kv_heads=4, q_len=777,
             kv_len=777, head_dim=64, mask=MaskSpec.sliding_window(127), block_q=64,
             num_stages=3),
        case("bf16 D64 MQA full Nq!=Nk", batch=2, q_heads=4, kv_heads=1, q_len=333, kv_len=1041,
             head_dim=64, dtype="bfloat16", block_q=128),
        case("fp16 D128 bq64 static block-sparse", lambda: static, batch=1, q_heads=2,
             kv_heads=2, q_len=640, kv_len=640, head_dim=128, mask=MaskSpec.static(static),
             block_q=64, mask_input="bool", mask_input_shape=(640, 640)),
        case("fp16 D64 dynamic additive", "additive", batch=2, q_heads=4, kv_heads=2, q_len=500,
             kv_len=500, head_dim=64, mask=dyn, mask_input="additive",
             mask_input_shape=(2, 1, 500, 500)),
        case("bf16 D128 key padding bool", "padding", batch=2, q_heads=4, kv_heads=4, q_len=600,
             kv_len=600, head_dim=128, dtype="bfloat16", mask=dyn, mask_input="bool",
             mask_input_shape=(2, 1, 1, 600)),
        case("fp16 D64 empty rows nan", batch=1, q_heads=2, kv_heads=1, q_len=300, kv_len=300,
             head_dim=64, mask=MaskSpec.causal(q_offset=-37), empty_rows="nan"),
        case("fp16 D64 empty rows zero 1 stage", batch=1, q_heads=2, kv_heads=1, q_len=300,
             kv_len=300, head_dim=64, mask=MaskSpec.causal(q_offset=-37), num_stages=1),
        case("fp16 D128 Dv64 chunked causal", batch=1, q_heads=4, kv_heads=2, q_len=512,
             kv_len=512, head_dim=128, v_head_dim=64, mask=MaskSpec.chunked(100, causal=True)),
        case("fp16 D128 32 rows/warp causal GQA", batch=2, q_heads=8, kv_heads=2, q_len=1000,
             kv_len=1000, head_dim=128, mask=causal, block_q=128, warp_rows=32),
        case("bf16 D128 32 rows/warp additive 3 stages", "additive", batch=2, q_heads=4,
             kv_heads=2, q_len=500, kv_len=700, head_dim=128, dtype="bfloat16", mask=dyn,
             mask_input="additive", mask_input_shape=(2, 1, 500, 700), warp_rows=32,
             num_stages=3),
        case("fp16 D64 bq64 32 rows/warp window", batch=1, q_heads=4, kv_heads=4, q_len=777,
             kv_len=777, head_dim=64, mask=MaskSpec.sliding_window(127), block_q=64,
             warp_rows=32),
    ]
    return [v[0], v[2], v[-3]] if quick else v


def timing_cases(quick: bool):
    """(name, N, MaskSpec, flex mask_mod maker, sdpa mode)."""
    out = []
    for n in (1024,) if quick else (1024, 4096, 16384):
        lay = _bigbird(n // 128)
        dense = np.kron(lay, np.ones((128, 128), bool))
        out += [(f"causal N={n}", n, MaskSpec.causal(), "causal", None),
                (f"window 512 N={n}", n, MaskSpec.sliding_window(511), "window", None),
                (f"BigBird N={n}", n, MaskSpec.static(dense), "bigbird", (lay, dense))]
    return out


def build(kw, arch):
    import tvm

    f, bm = fused_attention_cuda(**kw, arch=arch)
    return tvm.compile(tvm.IRModule({"main": f}), target=cuda_target(arch)), bm


def _timing_kw(n, spec):
    kw = {"batch": 4, "q_heads": 16, "kv_heads": 16, "q_len": n, "kv_len": n, "head_dim": 128,
              "dtype": "float16", "mask": spec, "block_q": 128, "block_kv": 64}
    if spec.kind == "static":
        kw.update(mask_input="bool", mask_input_shape=(n, n))
    return kw


# ------------------------------------------------------------------ GPU parts
def _torch_dtype(dt):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[dt]


def _to_tvm(t, dev):
    """torch CUDA tensor -> tvm tensor (via DLPack, copy through host as a fallback)."""
    import tvm

    try:
        return tvm.runtime.from_dlpack(t.contiguous())
    except Exception:  # noqa: BLE001
        import ml_dtypes

        a = t.detach().cpu()
        arr = (a.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
               if a.dtype == __import__("torch").bfloat16 else a.numpy())
        return tvm.runtime.tensor(arr, dev)


def _from_tvm(x):
    import torch

    return torch.from_dlpack(x)


def _inputs(kw, mask_kind, dev):
    import torch

    B, Hq, Hkv, Nq, Nk, D = (kw[n] for n in ("batch", "q_heads", "kv_heads", "q_len", "kv_len",
                                             "head_dim"))
    Dv = kw.get("v_head_dim") or D
    dt = _torch_dtype(kw.get("dtype", "float16"))
    g = torch.Generator(device="cuda").manual_seed(int(time.time()))  # fresh inputs every run
    q = torch.randn(B, Hq, Nq, D, device="cuda", generator=g).to(dt)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", generator=g).to(dt)
    v = torch.randn(B, Hkv, Nk, Dv, device="cuda", generator=g).to(dt)
    allowed = torch.from_numpy(kw["mask"].dense(Nq, Nk)).cuda() if kw["mask"].kind != "dynamic" \
        else torch.ones(1, Nq, Nk, dtype=torch.bool, device="cuda")
    allowed, add, mt = allowed[None], None, None
    if mask_kind == "additive":
        add = torch.randn(B, 1, Nq, Nk, device="cuda", generator=g)
        add = torch.where(torch.rand(B, 1, Nq, Nk, device="cuda", generator=g) < 0.2,
                          float("-inf"), add).to(dt)
        mt = add
    elif mask_kind == "padding":
        lens = torch.randint(1, Nk + 1, (B,), device="cuda", generator=g)
        keep = torch.arange(Nk, device="cuda")[None] < lens[:, None]
        mt = torch.empty(B, 1, 1, Nk, dtype=torch.bool, device="cuda")  # compact strides
        mt.copy_(keep[:, None, None])
        allowed = allowed & mt
    elif callable(mask_kind):
        mt = torch.from_numpy(mask_kind()).cuda()
    return q, k, v, allowed, add, mt


def _reference(q, k, v, allowed, add, scale, empty_rows):
    import torch

    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if add is not None:
        s = s + torch.where(torch.isfinite(add.double()), add.double(), 0.0)
        allowed = allowed & torch.isfinite(add.double())
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    out = p.nan_to_num(0.0) @ v
    empty = ~allowed.any(-1).expand(out.shape[:-1])
    out[empty] = 0.0 if empty_rows == "zero" else float("nan")
    return out


def run_correctness(arch, quick, dev, results):
    import torch

    for name, kw, mk in correctness_variants(quick):
        row = {"name": name}
        try:
            lib, bm = build(kw, arch)
            q, k, v, allowed, add, mt = _inputs(kw, mk, dev)
            out = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype,
                             device="cuda")
            args = [q, k, v] + [torch.from_numpy(a).cuda() for a in
                                (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
            args += ([mt] if mt is not None else []) + [out]
            targs = [_to_tvm(a, dev) for a in args]
            lib["main"](*targs)
            dev.sync()
            got = _from_tvm(targs[-1]).double()
            ref = _reference(q, k, v, allowed, add, 1 / math.sqrt(kw["head_dim"]),
                             kw.get("empty_rows", "zero"))
            tol = 3e-3 if kw.get("dtype", "float16") == "float16" else 2e-2
            same_nan = torch.equal(torch.isnan(got), torch.isnan(ref))
            err = (got - ref).abs().nan_to_num(0.0)
            bound = tol + tol * ref.abs().nan_to_num(0.0)
            row.update(max_abs_err=float(err.max()), unwritten_or_nan_mismatch=not same_nan,
                       ok=bool(same_nan and (err <= bound).all()))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                       trace=traceback.format_exc()[-2000:])
        results["correctness"].append(row)
        print("correctness", row.get("ok"), name, row.get("max_abs_err"), row.get("error", ""))


def run_models(results, budget):
    import inspect

    import torch

    import attnforge
    from attnforge.models import build_hf_model

    params = inspect.signature(attnforge.compile_model).parameters
    if "precision" not in params:
        results["models_note"] = "compile_model has no 'precision' parameter: fp32 compiled"
    cases = [("gpt2", "float16"), ("llama", "float16"), ("bert", "float16"),
             ("gpt2", "bfloat16"), ("llama", "bfloat16")]
    for name, precision in cases:
        row = {"model": name, "precision": precision}
        if time.time() - T0 > budget / 2:
            results["models"].append({**row, "ok": None, "error": "skipped: time budget"})
            continue
        try:
            model, inputs = build_hf_model(name, batch=2, seq_len=128)
            t = time.time()
            extra = {"precision": precision} if "precision" in params else {}
            cm = attnforge.compile_model(model, inputs, target="cuda", **extra)
            row["compile_s"] = round(time.time() - t, 1)
            row["schedules"] = cm.report.get("schedules")
            row["report"] = {k: cm.report.get(k) for k in ("verification", "gpu_kernels_run",
                                                           "attention_sites")
                             if isinstance(getattr(cm, "report", None), dict)}
            gin = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)
            y = cm(*gin)
            with torch.no_grad():
                ref = model.cuda()(*gin)
            y0 = y[0] if isinstance(y, (tuple, list)) else y
            r0 = ref[0] if isinstance(ref, (tuple, list)) else getattr(ref, "logits", ref)
            row["max_abs_err"] = float((y0.float() - r0.float()).abs().max())
            row["max_rel_err"] = row["max_abs_err"] / max(float(r0.float().abs().max()), 1e-30)
            row["ok"] = row["max_rel_err"] < (2e-2 if precision == "float16" else 5e-2)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        results["models"].append(row)
        print("model", name, precision, row.get("ok"), row.get("error", row.get("max_rel_err")))


def _time_ms(fn, warmup=3, iters=10):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(iters):
        fn()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / iters


def run_timing(arch, quick, dev, budget, results):
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for name, n, spec, kind, extra in timing_cases(quick):
        row = {"case": name}
        results["timing"].append(row)
        if time.time() - T0 > budget:
            row["skipped"] = "time budget"
            continue
        try:
            _time_case(row, arch, dev, flex, n, spec, kind, extra)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        print("timing", row)
        torch.cuda.empty_cache()


def _time_case(row, arch, dev, flex, n, spec, kind, extra):
    """Fill ``row`` with ours / SDPA / FlexAttention times for one timing case."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    kw = _timing_kw(n, spec)
    libs = {wr: build({**kw, "warp_rows": wr}, arch) for wr in WARP_ROWS}
    bm = libs[16][1]
    flops = 4 * 4 * 16 * 128 * bm.visited_elements()
    q, k, v = (torch.randn(4, 16, n, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    lay = None if extra is None else torch.from_numpy(extra[0]).cuda()
    mods = {"causal": lambda b, h, i, j: i >= j,
            "window": lambda b, h, i, j: (i >= j) & (i - j < 512),
            "bigbird": lambda b, h, i, j: lay[i // 128, j // 128]}
    blk = create_block_mask(mods[kind], None, None, n, n, device="cuda")
    ref = flex(q, k, v, block_mask=blk)
    row["flex_ms"] = _time_ms(lambda: flex(q, k, v, block_mask=blk))
    meta = [torch.from_numpy(a).cuda() for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    dense = None if extra is None else torch.from_numpy(extra[1]).cuda()
    for wr, (lib, _) in libs.items():
        out = torch.full_like(q, float("nan"))
        targs = [_to_tvm(a, dev) for a in [q, k, v, *meta, *([dense] if dense is not None
                                                             else []), out]]
        f = lib["main"]
        row[f"ours{wr}_ms"] = _time_ms(lambda: f(*targs))  # noqa: B023 (called right here)
        row[f"ours{wr}_max_abs_err_vs_flex"] = float((_from_tvm(targs[-1]) - ref).abs().max())
    if kind == "causal":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            row["sdpa_ms"] = _time_ms(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True))
        row["sdpa_backend"] = "flash"
    else:
        m = torch.from_numpy(spec.dense(n, n)[0]).cuda() if dense is None else dense
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            row["sdpa_ms"] = _time_ms(lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m))
        row["sdpa_backend"] = "efficient + dense bool mask"
    for key in (*(f"ours{wr}" for wr in WARP_ROWS), "sdpa", "flex"):
        row[f"{key}_tflops"] = flops / (row[f"{key}_ms"] * 1e-3) / 1e12
    row["visited_fraction"] = bm.visited_fraction


def write_table(out: Path, results: dict) -> None:
    lines = [f"# GPU check ({results['device']}, arch {results['arch']})", "",
             "## (a) kernel correctness (NaN-poisoned output, float64 reference)", "",
             "| variant | ok | max abs err |", "| --- | --- | --- |"]
    for r in results["correctness"]:
        lines.append(f"| {r['name']} | {r.get('ok')} | {r.get('max_abs_err', r.get('error'))} |")
    lines += ["", "## (b) models end to end", "", results.get("models_note", ""), "",
              "| model | ok | max abs err / error |", "| --- | --- | --- |"]
    for r in results["models"]:
        lines.append(f"| {r['model']} | {r.get('ok')} | {r.get('max_abs_err', r.get('error'))} |")
    lines += ["", "## (c) fused attention B=4 H=16 D=128 fp16 (ms, TFLOP/s on visited pairs)",
              "", ("| case | ours (16 rows/warp) | ours (32 rows/warp) | SDPA | Flex (compiled) "
                   "| SDPA backend |"), "| --- | --- | --- | --- | --- | --- |"]
    for r in results["timing"]:
        if "sdpa_tflops" not in r:
            lines.append(f"| {r['case']} | {r.get('skipped', r.get('error'))} | | | | |")
            continue
        cell = [f"{r[k + '_ms']:.3f} ({r[k + '_tflops']:.0f})"
                for k in ("ours16", "ours32", "sdpa", "flex")]
        lines.append(f"| {r['case']} | {' | '.join(cell)} | {r['sdpa_backend']} |")
    if results.get("tuning"):
        lines += ["", "## (d) CUDA tuning (MetaSchedule, fp16; logs under tuning_logs/)", "",
                  "| job | status | trials in log | wall s | best / default us per task |",
                  "| --- | --- | --- | --- | --- |"]
        for r in results["tuning"]:
            per = "; ".join(f"{t['name']}: {t.get('best_us')} / {t.get('default_us')}"
                            for t in r.get("tasks", []))
            lines.append(f"| {r['workload']} | {r.get('status')} {r.get('error', '')[:200]} | "
                         f"{sum(t.get('trials', 0) for t in r.get('tasks', []))} | "
                         f"{r.get('wall_s')} | {per} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def dry_run(args, out: Path) -> dict:
    """Build every kernel this script would run; never touches a GPU."""
    arch = args.arch or "sm_90"
    built = []
    kws = [(n, kw) for n, kw, _ in correctness_variants(args.quick)]
    kws += [(f"{n} warp_rows={wr}", {**_timing_kw(size, spec), "warp_rows": wr})
            for n, size, spec, _, _ in timing_cases(args.quick) for wr in WARP_ROWS]
    for name, kw in kws:
        t = time.time()
        lib, bm = build(kw, arch)
        row = {"name": name, "build_s": round(time.time() - t, 2),
               "visited_fraction": round(bm.visited_fraction, 4)}
        if args.nvcc:
            from attnforge import cuda_aot

            (src,) = cuda_aot.cuda_sources(lib)
            _, log = cuda_aot.compile_source(src, arch, "cubin", verbose=True)
            row["ptxas"] = next(iter(cuda_aot.ptxas_report(log).values()))
        built.append(row)
        print("built", row)
    res = {"dry_run": True, "arch": arch, "built": built}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "table.md").write_text(f"# GPU check dry run ({arch})\n\n" + "\n".join(
        f"- {r['name']}: built in {r['build_s']} s" for r in built) + "\n")
    return res


def main(argv=None) -> int:
    args = _parse(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune_job:  # one job of (d), started by run_tuning in its own process
        return tune_job(args.tune_job, out, args.arch or "sm_90", args.job_budget_s)
    if args.dry_run:
        if args.only == "tuning":
            tuning_dry_run(out, args.arch or "sm_90")
        else:
            dry_run(args, out)
        return 0
    import torch
    import tvm

    from attnforge import cuda_aot

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; use --dry-run", file=sys.stderr)
        return 2
    if cuda_aot.find_cuda_tool("nvcc"):
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # inherited by the tuning jobs
    dev = tvm.cuda(0)
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    results = {"device": torch.cuda.get_device_name(), "arch": arch, "torch": torch.__version__,
               "tvm": tvm.__version__, "correctness": [], "models": [], "timing": [],
               "tuning": []}
    parts = []
    if args.only in ("all", "checks"):
        parts += [("correctness", lambda: run_correctness(arch, args.quick, dev, results)),
                  ("models", lambda: run_models(results, args.budget_s)),
                  ("timing", lambda: run_timing(arch, args.quick, dev, args.budget_s,
                                                results))]
    if args.only in ("all", "tuning") and args.tune_s > 0:  # after the checks, never fatal
        parts.append(("tuning", lambda: run_tuning(out, arch, args.tune_s, results)))
    for part, fn in parts:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            results[f"{part}_error"] = f"{type(e).__name__}: {e}"
        write_table(out, results)  # partial results survive a later crash or timeout
    results["wall_s"] = round(time.time() - T0, 1)
    write_table(out, results)
    print((out / "table.md").read_text())
    return 0 if all(r.get("ok") for r in results["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
