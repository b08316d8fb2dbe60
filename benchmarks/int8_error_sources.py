"""Where the int8 accuracy loss comes from: quantise one part of the model at a time.

A fake-quantisation simulation in eager PyTorch with our quantisers (fast enough to try a dozen
splits in one benchmark run; ``precision_cpu.py`` checks it against the compiled int8 row):

* weights: ``attnforge.passes.quantize_weights.quantize_weight`` (s8 per output channel,
  round-to-nearest, or GPTQ with the per-site setting ``attnforge.quantization_gptq.gptq_plan``
  picks from the calibration batches, as ``quantize_int8`` does);
* activations: u8 asymmetric per token, the formula of ``InsertDynamicQuantize``;
* embedding table: ``attnforge.passes.quantize_embedding.quantize_rows`` (s8, one scale per
  ``EMBEDDING_GROUP`` = 32 values of a row, as ``quantize_int8``).

Each split is compared with eager fp32 on held-out batches (``attnforge.accuracy``).
Run alone: ``TVM_NUM_THREADS=2 python benchmarks/int8_error_sources.py`` (prints JSON).
"""

from __future__ import annotations

import numpy as np

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def per_token_u8(x):
    """Fake-quantise ``x`` as ``InsertDynamicQuantize`` does (u8, per row of the last dim)."""
    import torch

    x2 = x.reshape(-1, x.shape[-1])
    lo = torch.clamp(x2.amin(1, keepdim=True), max=0.0)
    hi = torch.clamp(x2.amax(1, keepdim=True), min=0.0)
    s = torch.clamp((hi - lo) / 255.0, min=1e-30)
    z = torch.clamp(torch.round(-lo / s), 0, 255)
    q = torch.clamp(torch.round(x2 / s) + z, 0, 255)
    return ((q - z) * s).reshape(x.shape)


def _linears(model):
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def calibration_grams(model, calib) -> tuple[dict, dict]:
    """Per Linear ``(X^T X even batches, odd batches)`` and row counts, from eager fp32."""
    import torch

    grams, tokens, hooks = {}, {}, []

    def hook(name):
        def fn(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            pair = grams.setdefault(name, [0.0, 0.0])
            pair[state["b"] % 2] = pair[state["b"] % 2] + (x.T @ x).numpy()
            tokens.setdefault(name, [0, 0])[state["b"] % 2] += x.shape[0]
        return fn

    state = {"b": 0}
    for name, mod in _linears(model).items():
        hooks.append(mod.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for b, xs in enumerate(calib):
            state["b"] = b
            model(*xs)
    for h in hooks:
        h.remove()
    names = list(grams)  # linears reading one tensor (q/k/v, gate/up) share one pair, as in
    for i, n in enumerate(names):  # quantize_int8: gptq_plan then factorises it once
        same = next((m for m in names[:i] if all(np.array_equal(a, b) for a, b in
                                                 zip(grams[m], grams[n]))), None)
        if same is not None:
            grams[n] = grams[same]
    return grams, tokens


def quantized_weights(model, calib, rounding: str) -> dict:
    """``{linear name: dequantised fp32 weight [out, in]}`` (round-to-nearest or GPTQ)."""
    import torch
    from attnforge.passes.quantize_weights import quantize_weight

    from attnforge.quantization_gptq import gptq_plan

    weights = {n: m.weight.detach().numpy().T.astype(np.float32) for n, m in
               _linears(model).items()}  # [K, N] as in the Relax sites
    hessians, damping = {}, {}
    if rounding == "gptq":
        grams, tokens = calibration_grams(model, calib)
        hessians, damping, _ = gptq_plan(grams, tokens, weights)
    out = {}
    for n, w in weights.items():
        q, s = quantize_weight(w, hessians.get(n), damping.get(n, 0.01))
        out[n] = torch.from_numpy(np.ascontiguousarray((q * s).T.astype(np.float32)))
    return out


def run_split(model, held, ref: np.ndarray, qweights: dict, *, types=(), weights=True,
              activations=True, embedding=False) -> dict:
    """Accuracy of the model with only ``types`` (Linear name suffixes) / the embedding int8."""
    import torch
    from attnforge.passes.quantize_embedding import quantize_rows

    from attnforge.accuracy import accuracy_metrics
    from attnforge.quantization import EMBEDDING_GROUP

    saved, hooks = {}, []
    with torch.no_grad():
        for n, m in _linears(model).items():
            if n.split(".")[-1] not in types:
                continue
            if weights:
                saved[m] = m.weight.detach().clone()
                m.weight.copy_(qweights[n])
            if activations:
                hooks.append(m.register_forward_pre_hook(lambda _m, a: (per_token_u8(a[0]),)))
        emb = model.get_input_embeddings()
        if embedding:
            saved[emb] = emb.weight.detach().clone()
            q, s = quantize_rows(emb.weight.numpy(), EMBEDDING_GROUP)
            step = np.repeat(s, q.shape[1] // s.shape[1], axis=1)
            emb.weight.copy_(torch.from_numpy(q.astype(np.float32) * step))
        try:
            got = np.concatenate([model(*xs).logits.numpy() for xs in held])
        finally:
            for h in hooks:
                h.remove()
            for m, w in saved.items():
                m.weight.copy_(w)
    o = accuracy_metrics([ref], [got], ["logits"])["outputs"][0]
    return {"top1_agreement": o["top1_agreement"], "one_minus_cosine": 1.0 - o["cosine"],
            "kl_divergence": o["kl_divergence"]}


def error_sources(model, calib, held) -> dict:
    """The splits (rows) and a short reading of them."""
    import torch

    with torch.no_grad():
        ref = np.concatenate([model(*xs).logits.numpy() for xs in held])
    rtn = quantized_weights(model, calib, "nearest")
    gptq = quantized_weights(model, calib, "gptq")
    rows = {
        "default: all 14 linears w+a (GPTQ) + embedding": run_split(
            model, held, ref, gptq, types=TYPES, embedding=True),
        "all 14 linears w+a, GPTQ": run_split(model, held, ref, gptq, types=TYPES),
        "all 14 linears w+a, round-to-nearest": run_split(model, held, ref, rtn, types=TYPES),
        "weights only, round-to-nearest": run_split(model, held, ref, rtn, types=TYPES,
                                                    activations=False),
        "weights only, GPTQ": run_split(model, held, ref, gptq, types=TYPES, activations=False),
        "activations only (per token u8)": run_split(model, held, ref, rtn, types=TYPES,
                                                     weights=False),
    }
    for t in TYPES:
        rows[f"only {t} (w+a, GPTQ)"] = run_split(model, held, ref, gptq, types=(t,))
    rows["only lm_head (w+a, GPTQ)"] = run_split(model, held, ref, gptq, types=("lm_head",))
    rows["only the embedding table (s8, group 32)"] = run_split(model, held, ref, gptq,
                                                               embedding=True)
    rows["all but down_proj (fp32), w+a GPTQ"] = run_split(
        model, held, ref, gptq, types=tuple(t for t in TYPES if t != "down_proj"))
    rows["only q/k/gate/up (v/o/down fp32), w+a GPTQ"] = run_split(
        model, held, ref, gptq, types=("q_proj", "k_proj", "gate_proj", "up_proj"))
    rows["default + lm_head int8 (GPTQ)"] = run_split(
        model, held, ref, gptq, types=TYPES + ("lm_head",), embedding=True)
    return {"method": "eager PyTorch fake quantisation with attnforge's quantisers, "
                      "vs eager fp32 on the held-out batches", "rows": rows}


if __name__ == "__main__":
    import json
    import os
    import sys

    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from attnforge.accuracy import held_out_inputs
    from attnforge.models import build_hf_model

    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    model, inputs = build_hf_model("llama", hidden=512, seq_len=512, layers=2, heads=8)
    print(json.dumps(error_sources(
        model, [held_out_inputs(inputs, seed=s) for s in range(8)],
        [held_out_inputs(inputs, seed=s) for s in range(100, 104)]), indent=1))
