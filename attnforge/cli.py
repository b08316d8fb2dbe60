"""The ``attnforge`` command line.

    attnforge compile MODEL [--target T] [--out DIR] [--batch B] [--seq-len N] [--attn eager|sdpa]
    attnforge run ARTIFACT [--inputs FILE.npz] [--repeat N]
    attnforge inspect ARTIFACT
    attnforge tune MODEL --target T --trials N [--work-dir DIR] [--rpc HOST:PORT --device-key K]
    attnforge generate MODEL [--prompt IDS | --prompt-len N] [--max-new-tokens N] [--sample ...]
    attnforge demo

MODEL is a built-in tiny config (gpt2, llama, mistral, bert, vit) or ``package.module:factory``
returning ``(model, example_inputs)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .errors import AttnforgeError


def _model_kwargs(args) -> dict:
    from .models import BUILTIN_MODELS

    if args.model not in BUILTIN_MODELS:
        return {}
    kw = {"batch": args.batch, "attn_implementation": args.attn}
    if args.seq_len:
        kw["seq_len"] = args.seq_len
    return kw


def cmd_compile(args) -> int:
    import attnforge
    from .models import load_model_spec

    model, inputs = load_model_spec(args.model, **_model_kwargs(args))
    logs = False if args.no_tuning_logs else args.tuning_logs
    cm = attnforge.compile_model(model, inputs, target=args.target, verify=not args.no_verify,
                                 precision=args.precision, tuning_logs=logs)
    print(_summary(cm.report))
    if args.out:
        print(f"exported to {cm.export(args.out)}")
    return 0


def _random_inputs(specs: list[dict], rng: np.random.Generator) -> list[np.ndarray]:
    arrays = []
    for s in specs:
        if any(not isinstance(d, int) for d in s["shape"]):
            raise AttnforgeError(f"input {s['name']!r} has symbolic shape {s['shape']}; pass "
                                 "--inputs FILE.npz with concrete arrays")
        if s["dtype"].startswith("int"):
            arrays.append(rng.integers(0, 100, size=s["shape"]).astype(s["dtype"]))
        else:
            arrays.append(rng.standard_normal(s["shape"]).astype(s["dtype"]))
    return arrays


def cmd_run(args) -> int:
    import attnforge

    cm = attnforge.load(args.artifact, device=args.device)
    if args.inputs:
        data = np.load(args.inputs)
        arrays = [data[s["name"]] if s["name"] in data else data[f"arr_{i}"]
                  for i, s in enumerate(cm.input_specs)]
    else:
        arrays = _random_inputs(cm.input_specs, np.random.default_rng(0))
    out = cm.run_flat(*arrays)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        cm.run_flat(*arrays)
        times.append(time.perf_counter() - t0)
    for i, o in enumerate(out):
        print(f"output[{i}]: shape={list(o.shape)} dtype={o.dtype} mean={float(o.mean()):.6g}")
    if times:
        print(f"median latency: {1e3 * float(np.median(times)):.3f} ms over {len(times)} runs")
    return 0


def cmd_inspect(args) -> int:
    from .artifact import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"artifact: {args.artifact}")
    print(f"created:  {manifest['created']}  versions: {manifest['versions']}")
    print(f"target:   {manifest['target_tag']}")
    for s in manifest["inputs"]:
        print(f"input:    {s['name']} {s['shape']} {s['dtype']}")
    print(f"outputs:  {manifest['outputs']}")
    print(_summary(manifest["report"]))
    return 0


def _summary(report: dict) -> str:
    lines = [f"target {report.get('target_tag')}, precision {report.get('precision')}"]
    for site in report.get("attention", []):
        if not site.get("fused", True):
            lines.append(f"  not fused ({site.get('var')}): {site.get('reason')}")
            continue
        frac = site.get("visited_fraction")
        lines.append(f"  attention #{site.get('site')} {site.get('source') or ''}: "
                     f"{site.get('lowered_to') or 'not lowered (' + str(site.get('reason')) + ')'}"
                     f", mask {site.get('mask')}"
                     + (f", {100 * frac:.1f}% of blocks computed" if frac is not None else ""))
    tuning = report.get("tuning") or {}
    if tuning.get("applied"):
        lines.append(f"  tuning records applied to: {', '.join(tuning.get('tuned', [])) or '-'}")
    elif tuning.get("reason"):
        lines.append(f"  tuning: {tuning['reason']}")
    v = report.get("verification", {})
    if v.get("skipped"):
        lines.append("  verification: skipped")
    else:
        lines.append(f"  verification: {'PASSED' if v.get('passed') else 'FAILED'} max rel err "
                     f"{v.get('max_rel_err', float('nan')):.2e} (tol {v.get('rtol')}) on "
                     f"{v.get('ran_on')}" + (f" -- {v['note']}" if v.get("note") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnforge", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a model, verify it, optionally export it")
    c.add_argument("model")
    c.add_argument("--target", default="llvm")
    c.add_argument("--out", help="artifact directory to write")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--seq-len", type=int, default=None)
    c.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    c.add_argument("--no-verify", action="store_true")
    c.add_argument("--precision", choices=["float32", "float16", "bfloat16"], default="float32")
    logs = c.add_mutually_exclusive_group()
    logs.add_argument("--tuning-logs", help="MetaSchedule log directory to apply (default: the "
                      "logs shipped in tuning_logs/<target-tag>/ that match the model)")
    logs.add_argument("--no-tuning-logs", action="store_true",
                      help="default schedules only, no tuning records")
    r = sub.add_parser("run", help="run an exported artifact (numpy only, no torch needed)")
    r.add_argument("artifact")
    r.add_argument("--inputs", help=".npz with one array per input (by name or arr_i)")
    r.add_argument("--device", default=None)
    r.add_argument("--repeat", type=int, default=10)
    i = sub.add_parser("inspect", help="print an artifact's manifest and report")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    sub.add_parser("demo", help="compile, verify, export and reload a small GPT-2")
    from .cli_tune import add_tune_parser, cmd_tune

    add_tune_parser(sub)
    from .cli_generate import add_generate_parser, cmd_generate

    add_generate_parser(sub)
    args = p.parse_args(argv)
    try:
        if args.cmd == "demo":
            from .demo import run_demo

            return run_demo()
        return {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect,
                "tune": cmd_tune, "generate": cmd_generate}[args.cmd](args)
    except (AttnforgeError, ValueError) as e:
        print(f"attnforge {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
