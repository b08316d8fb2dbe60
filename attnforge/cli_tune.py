"""``attnforge tune``: MetaSchedule-tune a model and write its tuning log.

    attnforge tune MODEL --target T --trials N [--work-dir DIR] [--rpc HOST:PORT --device-key K]
                   [--batch B] [--seq-len N] [--hidden H] [--layers L] [--max-trials-per-task M]
                   [--only SUBSTR] [--attention-blocks] [--precision P]

MODEL is a built-in tiny config (gpt2, llama, mistral, bert, vit) or ``package.module:factory``.
``--target cuda...`` measures on this machine's GPU, or with ``--rpc`` on the GPU servers of an
RPC tracker; without either it stops with an error before doing anything.  On CUDA the fused
attention kernel exists in fp16/bf16 only: ``--precision float16`` tunes it (its design space:
``schedules/attention_cuda_space.py``) and the log then matches
``compile_model(..., precision="float16")``.
The log goes to ``--work-dir`` (default ``tuning_logs/<target-tag>/<model>-...``); rerunning
the same command resumes an interrupted job.  Apply it with
``compile_model(..., tuning_logs=DIR)``.
"""

from __future__ import annotations

import sys


def add_tune_parser(subparsers):
    """Register the ``tune`` subcommand on an argparse ``subparsers`` object."""
    t = subparsers.add_parser("tune", help="tune a model with MetaSchedule, write a tuning log",
                              description=__doc__.split("\n\n")[0])
    t.add_argument("model")
    t.add_argument("--target", default="llvm")
    t.add_argument("--trials", type=int, required=True,
                   help="total trial budget of the work dir (records already there count)")
    t.add_argument("--work-dir", default=None, help="log directory (default: tuning_logs/...)")
    t.add_argument("--rpc", default=None, help="HOST:PORT of an RPC tracker")
    t.add_argument("--device-key", default=None, help="key the RPC servers registered with")
    t.add_argument("--max-trials-per-task", type=int, default=None)
    t.add_argument("--only", action="append", default=None, metavar="SUBSTR",
                   help="tune only tasks whose name contains SUBSTR (repeatable), e.g. matmul")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--seq-len", type=int, default=None)
    t.add_argument("--hidden", type=int, default=None)
    t.add_argument("--layers", type=int, default=None)
    t.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    t.add_argument("--precision", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="compile_model precision the log is for (cuda: float16/bfloat16 tune "
                        "the fused attention kernel too)")
    t.add_argument("--attention-blocks", action="store_true",
                   help="also search the fused attention kernel's block sizes (llvm)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_tune)
    return t


def _workload_name(args) -> str | None:
    from .models import BUILTIN_MODELS

    if args.model not in BUILTIN_MODELS:
        return None
    parts = [args.model, f"b{args.batch}"]
    for flag, val in (("s", args.seq_len), ("h", args.hidden), ("l", args.layers)):
        if val:
            parts.append(f"{flag}{val}")
    if getattr(args, "precision", "float32") != "float32":
        parts.append(args.precision)
    return "-".join(parts)


def _check_device(args) -> str | None:
    """Error text when the job could not measure anything (cuda, no GPU here, no --rpc)."""
    from .errors import AttnforgeError
    from .target import parse_target
    from .tuning import TuningError, _check_local_device

    if args.rpc:
        return None
    try:
        tgt = parse_target(args.target)
    except (AttnforgeError, ValueError) as e:
        if not str(args.target).strip().lower().startswith("cuda"):
            return None  # tune() reports a bad target itself
        return (f"{e}. Tuning for CUDA measures candidates on a CUDA device: run on a machine "
                "with a GPU, or pass --rpc HOST:PORT --device-key KEY of an RPC tracker with a "
                "GPU server registered (and name the arch, e.g. --target cuda:sm_90)")
    try:
        _check_local_device(tgt)
    except TuningError as e:
        return str(e)
    return None


def cmd_tune(args) -> int:
    """Run ``attnforge tune``; returns the exit code (2: bad input, 130: interrupted)."""
    from .errors import AttnforgeError
    from .models import BUILTIN_MODELS, load_model_spec
    from .tuning import tune

    if args.rpc and not args.device_key:
        print("attnforge tune: error: --rpc needs --device-key", file=sys.stderr)
        return 2
    why = _check_device(args)  # before the model is built: fail in a second, not minutes
    if why is not None:
        print(f"attnforge tune: error: {why}", file=sys.stderr)
        return 2
    kw = {}
    if args.model in BUILTIN_MODELS:
        kw = {"batch": args.batch, "attn_implementation": args.attn}
        for k in ("seq_len", "hidden", "layers"):
            if getattr(args, k):
                kw[k] = getattr(args, k)
    try:
        model, inputs = load_model_spec(args.model, **kw)
        res = tune(model, inputs, args.target, trials=args.trials, work_dir=args.work_dir,
                   rpc=args.rpc, device_key=args.device_key,
                   max_trials_per_task=args.max_trials_per_task,
                   progress=not args.no_progress, workload=_workload_name(args),
                   only=args.only, precision=args.precision)
    except KeyboardInterrupt:
        print("attnforge tune: interrupted; the records so far are kept, rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    except (AttnforgeError, ValueError) as e:
        print(f"attnforge tune: error: {e}", file=sys.stderr)
        return 2
    print(f"tuning log: {res.work_dir} ({res.target_tag}, {res.trials_in_db} trials recorded, "
          f"{res.trials_run} run now, {res.wall_time_s:.0f} s)")
    for t in res.tasks:
        best = f"{t['best_us']:.1f} us" if t["best_us"] is not None else "-"
        dflt = t.get("default_us")
        vs = "" if dflt is None else f", default schedule {dflt:.1f} us" + (
            " (tuned record not faster: it will not be applied)"
            if t["best_us"] is None or t["best_us"] >= dflt else "")
        print(f"  {t['name']}: {t['trials']} trials, best {best}{vs}")
    if args.attention_blocks:
        _tune_blocks(args, model, inputs, res.work_dir)
    return 0


def _tune_blocks(args, model, inputs, work_dir) -> None:
    from .tuning_attention import tune_attention_blocks

    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (heads and hidden) or not hasattr(inputs[0], "shape") or inputs[0].dim() < 2:
        print("  attention blocks: skipped (model has no HF attention config)")
        return
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    r = tune_attention_blocks(batch=int(inputs[0].shape[0]), q_heads=heads, kv_heads=kv,
                              q_len=int(inputs[0].shape[1]), head_dim=hidden // heads,
                              causal=args.model in ("gpt2", "llama", "mistral"),
                              target=args.target, work_dir=work_dir,
                              progress=not args.no_progress)
    b = r["best"]
    print(f"  attention blocks {r['signature']}: best block_q={b['block_q']} "
          f"block_kv={b['block_kv']} rows={b['rows']} {b['ms']:.2f} ms "
          f"(default 64/64/4: {r['default_ms']} ms)")


def main(argv=None) -> int:
    """Standalone entry (``python -m attnforge.cli_tune``) until cli.py wires the subcommand."""
    import argparse

    p = argparse.ArgumentParser(prog="attnforge")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_tune_parser(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
