"""``attnforge generate``: compile a built-in decoder (gpt2, llama, mistral) into a generator
and stream tokens from it, printing each token as it is produced and the timings.

    attnforge generate llama --prompt-len 32 --max-new-tokens 20
    attnforge generate gpt2 --prompt 5,17,42 --sample --temperature 0.8 --top-p 0.9 --seed 1
    attnforge generate mistral --precision int8 --sparsity window:32 --max-new-tokens 64

``--sparsity window:W`` is ``attnforge.sparsity.SlidingWindow(W)`` (the one policy family the
paged decode kernel runs; ``none`` for dense).
"""

from __future__ import annotations

import sys
import time

GENERATIVE_MODELS = ("gpt2", "llama", "mistral")


def add_generate_parser(subparsers):
    """Register the ``generate`` subcommand on an argparse ``subparsers`` object."""
    g = subparsers.add_parser("generate", help="stream tokens from a compiled generator",
                              description=__doc__.split("\n\n")[0])
    g.add_argument("model", help=f"built-in decoder: {', '.join(GENERATIVE_MODELS)}")
    g.add_argument("--prompt", default=None, help="comma-separated token ids")
    g.add_argument("--prompt-len", type=int, default=16, help="random prompt of N tokens")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--max-seq-len", type=int, default=256)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--target", default="llvm")
    g.add_argument("--precision", choices=["float32", "bfloat16", "int8"], default="float32")
    g.add_argument("--sparsity", default="none",
                   help="window:W (causal sliding window of W keys) or none")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the accuracy check against Hugging Face fp32 eager")
    g.set_defaults(func=cmd_generate)
    return g


def parse_sparsity(spec: str):
    """``--sparsity``: ``none`` -> None, ``window:W`` -> ``SlidingWindow(W)``."""
    from .errors import InputError
    from .sparsity import SlidingWindow

    spec = (spec or "none").strip().lower()
    if spec == "none":
        return None
    kind, _, value = spec.partition(":")
    if kind in ("window", "sliding_window") and value.isdigit() and int(value) > 0:
        return SlidingWindow(int(value))
    raise InputError(f"--sparsity {spec!r}: use window:W (W a positive integer) or none")


def cmd_generate(args) -> int:
    import torch

    import attnforge

    from .errors import InputError
    from .models import build_hf_model

    if args.model not in GENERATIVE_MODELS:
        raise InputError(f"generate: {args.model!r} is not a built-in decoder; choose one of "
                         f"{', '.join(GENERATIVE_MODELS)}")
    policy = parse_sparsity(args.sparsity)
    model, _ = build_hf_model(args.model, hidden=args.hidden, layers=args.layers,
                              seq_len=args.max_seq_len)
    vocab = model.get_output_embeddings().weight.shape[0]
    if args.prompt:
        try:
            prompt = [int(t) for t in args.prompt.split(",")]
        except ValueError as e:
            raise InputError(f"--prompt must be comma-separated integers: {e}") from e
    else:
        prompt = torch.randint(0, vocab, (args.prompt_len,),
                               generator=torch.Generator().manual_seed(args.seed)).tolist()
    t0 = time.perf_counter()
    gen = attnforge.compile_generator(model, max_batch_size=1, max_seq_len=args.max_seq_len,
                                      page_size=args.page_size, target=args.target,
                                      decode_buckets=[1], precision=args.precision,
                                      sparsity=policy, verify=not args.no_verify)
    gen.warmup([len(prompt)], [1])
    print(f"compiled {args.model} ({args.precision}"
          f"{', ' + policy.describe() if policy else ''}) in {time.perf_counter() - t0:.1f} s "
          f"(KV pool: {gen.num_pages} pages of {args.page_size} tokens)", file=sys.stderr)
    acc = gen.report.get("accuracy")
    if acc:
        lg, gr = acc["prefill_logits"], acc["greedy"]
        print(f"accuracy vs Hugging Face fp32 eager: prefill logits cosine "
              f"{lg['cosine_mean']:.6f} (min {lg['cosine_min']:.6f}), top-1 "
              f"{lg['top1_agreement']:.2f}; greedy tokens identical "
              f"{gr['identical_token_fraction']:.2f}", file=sys.stderr)
    print(f"prompt ({len(prompt)} tokens): {prompt}", file=sys.stderr)
    t0 = time.perf_counter()
    first, n = None, 0
    for tok in gen.stream(prompt, args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, eos_token_id=None):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
        print(tok, end=" ", flush=True)
    total = time.perf_counter() - t0
    print()
    rate = (n - 1) / (total - first) if n > 1 and total > first else float("nan")
    print(f"time to first token {first * 1e3:.1f} ms, {n} tokens in {total * 1e3:.1f} ms, "
          f"decode {rate:.1f} tokens/s", file=sys.stderr)
    return 0
