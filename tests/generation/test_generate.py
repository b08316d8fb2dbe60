"""End to end: greedy equality with Hugging Face ``generate`` (fp32), ragged batches,
streaming, sampling, request errors, and page accounting of the compiled generator."""

import pytest
import torch

from attnforge.errors import InputError

from tiny_lms import VOCAB  # the vocabulary of the tiny models the tests build


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (n,), generator=g).tolist()


@pytest.mark.parametrize("name,n,new", [("llama", 11, 20), ("mistral", 13, 24),
                                        ("gpt2", 7, 16)])
def test_greedy_matches_hf_generate(generators, name, n, new, hf_ref):
    model, gen = generators[name]
    prompt = _prompt(n, 1)
    want, gap = hf_ref(model, prompt, new)
    assert gap > 1e-4, f"HF's logits are too flat for a meaningful greedy test (gap {gap})"
    got = gen.generate(torch.tensor([prompt]), new, eos_token_id=None)
    assert got.shape == (1, n + new)
    assert got[0, :n].tolist() == prompt
    assert got[0, n:].tolist() == want
    assert gen.free_pages == gen.num_pages


def test_mistral_window_is_smaller_than_generated_length(generators):
    model, gen = generators["mistral"]
    assert model.config.sliding_window == 8 == gen.window
    # a windowed sequence holds at most ceil(8/16)+1 pages however long it runs
    assert gen.num_pages == 3 * 2


def test_ragged_batch_matches_hf_per_prompt(generators, hf_ref):
    model, gen = generators["llama"]
    prompts = [_prompt(n, 10 + n) for n in (3, 17, 9, 30)]  # 4 prompts > max_batch_size 3
    got = gen.generate(prompts, 12, eos_token_id=None)
    for p, g in zip(prompts, got):
        want, gap = hf_ref(model, p, 12)
        assert gap > 1e-4
        assert g == p + want
    assert gen.free_pages == gen.num_pages


def test_stream_yields_the_generated_tokens_one_by_one(generators, hf_ref):
    model, gen = generators["gpt2"]
    prompt = _prompt(5, 3)
    stream = gen.stream(prompt, 10, eos_token_id=None)
    first = next(stream)
    assert len(gen.active()) == 1  # produced while the request is still running
    tokens = [first, *stream]
    assert tokens == hf_ref(model, prompt, 10)[0]
    assert gen.active() == [] and gen.free_pages == gen.num_pages


def test_eos_stops_a_request_early(generators, hf_ref):
    model, gen = generators["llama"]
    prompt = _prompt(6, 4)
    want, _ = hf_ref(model, prompt, 10)
    eos = want[3]
    k = want.index(eos)
    got = gen.generate(torch.tensor([prompt]), 10, eos_token_id=eos)
    assert got[0, 6:6 + k + 1].tolist() == want[:k + 1]
    assert (got[0, 6 + k + 1:] == eos).all()  # padded with eos, like HF


def test_sampling_is_seeded_and_top_k_one_is_greedy(generators):
    _, gen = generators["llama"]
    prompt = _prompt(8, 5)
    kw = dict(do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=None)
    a = gen.generate([prompt], 12, seed=7, **kw)
    b = gen.generate([prompt], 12, seed=7, **kw)
    c = gen.generate([prompt], 12, seed=8, **kw)
    assert a == b and a != c
    greedy = gen.generate([prompt], 12, eos_token_id=None)
    assert gen.generate([prompt], 12, do_sample=True, top_k=1, seed=1,
                        eos_token_id=None) == greedy


def test_continuous_batching_step_mixes_prefill_and_decode(generators, hf_ref):
    model, gen = generators["llama"]
    p1, p2 = _prompt(10, 20), _prompt(4, 21)
    r1 = gen.add(p1, 6, eos_token_id=None)
    gen.step()  # prefill r1
    r2 = gen.add(p2, 6, eos_token_id=None)
    produced = gen.step()  # decode r1 + prefill r2 in one step
    assert set(produced) == {r1, r2}
    while gen.active():
        gen.step()
    assert gen.remove(r1) == p1 + hf_ref(model, p1, 6)[0]
    assert gen.remove(r2) == p2 + hf_ref(model, p2, 6)[0]
    assert gen.free_pages == gen.num_pages


def test_bad_requests_raise_and_the_generator_keeps_serving(generators, hf_ref):
    model, gen = generators["llama"]
    good = _prompt(5, 30)
    rid = gen.add(good, 8, eos_token_id=None)
    gen.step()
    with pytest.raises(InputError, match="exceeds max_seq_len=64"):
        gen.add(_prompt(60, 31), 8)
    with pytest.raises(InputError, match=r"outside \[0, 512\)"):
        gen.add([1, 2, VOCAB + 5], 4)
    with pytest.raises(InputError, match=r"outside \[0, 512\)"):
        gen.add([-1, 2], 4)
    for bad in (0, -3):
        with pytest.raises(InputError, match="max_new_tokens must be a positive int"):
            gen.add(good, bad)
    with pytest.raises(InputError, match="empty"):
        gen.add([], 4)
    others = [gen.add(_prompt(3, 40 + i), 4, eos_token_id=None) for i in range(2)]
    with pytest.raises(InputError, match="batch full"):
        gen.add(good, 4)
    with pytest.raises(InputError, match="unknown request id"):
        gen.remove(12345)
    while gen.active():
        gen.step()
    assert gen.remove(rid) == good + hf_ref(model, good, 8)[0]
    for r in others:
        gen.remove(r)
    assert gen.free_pages == gen.num_pages


def test_thousand_add_remove_cycles_leave_free_pages_unchanged(generators):
    _, gen = generators["mistral"]
    start = gen.free_pages
    for i in range(1000):
        rid = gen.add(_prompt(1 + i % 20, i), 1 + i % 7, eos_token_id=None)
        if i % 250 == 0:  # some of them really run (prefill + decode) before removal
            gen.step()
            gen.step()
        gen.remove(rid)
    assert gen.free_pages == start == gen.num_pages


def test_fork_shares_the_prefix_and_continues_identically(generators):
    _, gen = generators["llama"]
    prompt = _prompt(21, 50)  # 21 tokens: one full page of 16 + a partial page
    parent = gen.add(prompt, 10, eos_token_id=None)
    gen.step()
    gen.step()
    child = gen.fork(parent)  # greedy: the child must produce the parent's continuation
    shared = gen.kv.tables[child][0] == gen.kv.tables[parent][0]
    assert shared and gen.kv.tables[child][1] != gen.kv.tables[parent][1]
    while gen.active():
        gen.step()
    assert gen.remove(child) == gen.remove(parent)
    assert gen.free_pages == gen.num_pages


def test_compile_generator_rejects_unsupported_settings(generators):
    from attnforge import compile_generator

    model, _ = generators["gpt2"]
    with pytest.raises(InputError, match="precision='float16' is not supported"):
        compile_generator(model, max_batch_size=1, max_seq_len=32, precision="float16")
    with pytest.raises(InputError, match="per-tensor scales need calibration"):
        compile_generator(model, max_batch_size=1, max_seq_len=32, precision="int8",
                          int8_options={"activations": "per_tensor"})
    with pytest.raises(InputError, match="need precision='int8'"):
        compile_generator(model, max_batch_size=1, max_seq_len=32, int8_exclude=["lm_head"])
    with pytest.raises(InputError, match="max_position_embeddings=256"):
        compile_generator(model, max_batch_size=1, max_seq_len=4096)
    with pytest.raises(InputError, match="target='llvm' only"):
        compile_generator(model, max_batch_size=1, max_seq_len=32, target="cuda:sm_90")


def test_fp32_generator_accuracy_report_is_exact(generators):
    for name in ("llama", "mistral", "gpt2"):
        acc = generators[name][1].report["accuracy"]
        assert acc["precision"] == "float32"
        assert acc["prefill_logits"]["cosine_min"] > 1 - 1e-6
        assert acc["prefill_logits"]["top1_agreement"] == 1.0
        assert acc["greedy"]["identical_token_fraction"] == 1.0
