"""Accuracy of a compiled generator against the Hugging Face model in fp32 eager mode.

:func:`measure_accuracy` (``compile_generator(verify=True)`` stores it in
``gen.report["accuracy"]``) runs seeded random prompts through both:

* prefill logits: our prefill program vs ``model(ids).logits`` at several positions of each
  prompt (the program's ``last`` input): cosine similarity (mean / min), top-1 agreement, and
  the smallest top-1 / top-2 logit gap of the reference (flat logits make top-1 fragile);
* greedy generation: ``new_tokens`` tokens per prompt from ``gen.generate`` and from
  ``model.generate`` (greedy, ``eos`` off): the fraction of positions with the same token, and
  how many tokens the two agree on before the first difference (mean / min). After one
  difference the continuations differ, so these measure how long the two stay in lockstep.

For a generator with a sparsity policy the reference is still the dense model: the numbers
then include what the policy changes.
"""

from __future__ import annotations

import numpy as np
import torch


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float((a * b).sum() / den) if den > 0 else float(np.array_equal(a, b))


def measure_accuracy(gen, *, num_prompts: int = 4, prompt_len: int | None = None,
                     positions: int = 4, new_tokens: int = 16, seed: int = 0) -> dict:
    """Compare ``gen`` with its model's fp32 eager forward / greedy ``generate``."""
    model = gen.model
    new_tokens = max(1, min(new_tokens, gen.max_seq_len // 2))
    n = prompt_len or min(gen.prefill_buckets[0], gen.max_seq_len - new_tokens)
    rng = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, gen.vocab_size, (num_prompts, n), generator=rng)
    nb, prefill = gen.prefill_program(n)
    lasts = sorted({int(x) for x in np.linspace(n // 4, n - 1, positions)})
    cos, top1, gaps = [], [], []
    for p in prompts:
        with torch.no_grad():
            ref = model(p[None]).logits[0].float().numpy()
        ids = torch.zeros(1, nb, dtype=torch.long)
        ids[0, :n] = p
        for last in lasts:
            got = np.asarray(prefill.run_flat(ids, torch.arange(nb)[None],
                                              torch.tensor([last]))[0])[0]
            cos.append(_cosine(ref[last], got))
            top1.append(int(ref[last].argmax() == got.argmax()))
            two = np.sort(ref[last])[-2:]
            gaps.append(float(two[1] - two[0]))
    same, lockstep = [], []
    ours = gen.generate([p.tolist() for p in prompts], new_tokens, eos_token_id=None)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            want = model.generate(p[None], max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, n:].tolist()
        got = o[n:]
        eq = [a == b for a, b in zip(got, want)]
        same.append(sum(eq) / len(want))
        lockstep.append(next((i for i, e in enumerate(eq) if not e), len(eq)))
    return {
        "reference": "Hugging Face model, fp32 eager (model(ids).logits, model.generate "
                     "greedy)" + (" -- dense: includes the sparsity policy's change"
                                  if gen.sparsity is not None else ""),
        "precision": gen.precision,
        "prompts": num_prompts, "prompt_len": n, "positions_per_prompt": len(lasts),
        "prefill_logits": {"cosine_mean": float(np.mean(cos)), "cosine_min": float(min(cos)),
                           "top1_agreement": float(np.mean(top1)),
                           "reference_min_top2_gap": float(min(gaps))},
        "greedy": {"new_tokens": new_tokens, "identical_token_fraction": float(np.mean(same)),
                   "tokens_before_first_difference_mean": float(np.mean(lockstep)),
                   "tokens_before_first_difference_min": int(min(lockstep))},
    }
