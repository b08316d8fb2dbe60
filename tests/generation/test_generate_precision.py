"""``compile_generator(precision="bfloat16" | "int8")``: both programs get compile_model's
lowering (bf16 weights / VNNI int8 matmuls), the decode step's skinny matmuls keep a real
schedule, and the accuracy against Hugging Face fp32 eager lands in ``gen.report``.

Thresholds are what we measured on these peaked random-weight Llamas (tiny_lms, hidden 64,
seeds 0 and 1, 4 prompts of 32 tokens, logits at 4 positions each, 16 greedy tokens), with a
margin:

=========  ==============  ==============  ========  ================================
precision  cosine mean     cosine min      top-1     identical greedy tokens
=========  ==============  ==============  ========  ================================
bfloat16   0.99972-0.99983  0.99896-0.99957  0.94-1.0  0.75-1.0
int8       0.99733-0.99814  0.98387-0.99558  0.94-1.0  0.31-0.56 (1-8 tokens in lockstep)
=========  ==============  ==============  ========  ================================

(Mistral / GPT-2 configs gave the same ranges, int8 top-1 down to 0.81; bf16 unchanged with
the ``vdpbf16ps`` prefill matmuls.)  A greedy run stops
agreeing at the first token whose top-2 logits are closer than the precision's error; after
that the continuations differ, so the int8 fraction is low although the logits are close.
"""

import pytest

PRECISIONS = {"bfloat16": dict(cos_mean=0.9995, cos_min=0.998, top1=0.9, same=0.6),
              "int8": dict(cos_mean=0.995, cos_min=0.98, top1=0.75, same=0.2)}


@pytest.fixture(scope="module")
def lowp():
    from tiny_lms import build_lm

    from attnforge import compile_generator

    model = build_lm("llama")
    return model, {p: compile_generator(model, max_batch_size=4, max_seq_len=64,
                                        prefill_buckets=[32], decode_buckets=[4], precision=p)
                   for p in PRECISIONS}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_accuracy_against_hf_fp32_eager_is_in_the_report(lowp, precision):
    want = PRECISIONS[precision]
    acc = lowp[1][precision].report["accuracy"]
    assert acc["precision"] == precision and acc["prompts"] == 4
    logits, greedy = acc["prefill_logits"], acc["greedy"]
    assert want["cos_mean"] <= logits["cosine_mean"] < 1 - 1e-6  # close, and not fp32
    assert logits["cosine_min"] >= want["cos_min"]
    assert logits["top1_agreement"] >= want["top1"]
    assert greedy["identical_token_fraction"] >= want["same"]


def test_bfloat16_stores_weights_in_bf16_and_schedules_the_decode_matvecs(lowp):
    import torch

    model, gens = lowp
    bf16 = gens["bfloat16"]
    rep = bf16.compile_reports["decode_4"]
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules()
                       if isinstance(m, torch.nn.Linear))
    assert rep["weight_bytes"] <= fp32_bytes - 0.99 * linear_bytes / 2  # every linear halves
    # the decode step's skinny matmuls (bf16 weights) keep the matvec schedule (fp32: 5 funcs)
    assert rep["schedules"]["DecodeMatvecCPU"] >= 4
    assert "MatmulCPU" not in rep["schedules"]
    prefill = bf16.compile_reports["prefill_32"]
    sites = [s for s in prefill["attention"] if s.get("fused", True)]
    assert len(sites) == 2 and all(s["lowered_to"] for s in sites)  # the fused kernel


def test_int8_lowers_every_linear_but_the_lm_head_in_both_programs(lowp):
    gen = lowp[1]["int8"]
    for name in ("prefill_32", "decode_4"):
        q = gen.compile_reports[name]["quantization"]
        assert q["vnni_matmuls"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
        assert [e["name"] for e in q["excluded"]] == ["lm_head"]
    assert gen.compile_reports["decode_4"]["schedules"]["DecodeMatvecCPU"] == 1  # the LM head
