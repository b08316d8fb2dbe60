"""Chunked prefill (``compile_generator(prefill_chunk=C)``): a prompt longer than ``C`` is
prefilled ``C`` tokens per ``step()``, each chunk attending to the pages already cached, so a
step can mix prefill chunks with the decode of running requests; tokens stay identical to
Hugging Face ``generate`` (also for Mistral's sliding window, smaller than a chunk)."""

import pytest
import torch

CHUNK = 16


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 511, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def chunked():
    from tiny_lms import build_lm

    from attnforge import compile_generator

    out = {}
    for name in ("llama", "mistral"):
        model = build_lm(name)
        out[name] = (model, compile_generator(model, max_batch_size=2, max_seq_len=64,
                                              prefill_buckets=[CHUNK], decode_buckets=[2],
                                              prefill_chunk=CHUNK, verify=False))
    return out


@pytest.mark.parametrize("name,n", [("llama", 45), ("mistral", 37)])
def test_chunked_prefill_matches_hf_generate(chunked, hf_ref, name, n):
    model, gen = chunked[name]
    prompt = _prompt(n, 1)
    want, gap = hf_ref(model, prompt, 12)
    assert gap > 1e-4
    assert gen.generate([prompt], 12, eos_token_id=None)[0] == prompt + want
    assert gen.free_pages == gen.num_pages
    sites = gen.compile_reports[f"chunk_{CHUNK}"]["attention"]
    assert len(sites) == 2 and all(s["lowered_to"] == "attnforge.fused_attention_cpu"
                                   for s in sites)  # the fused kernel, run-time mask


def test_a_step_mixes_prefill_chunks_with_decode(chunked, hf_ref):
    model, gen = chunked["llama"]
    short, long = _prompt(5, 2), _prompt(40, 3)  # 40 tokens: 3 chunks
    a = gen.add(short, 8, eos_token_id=None)
    gen.step()  # prefill a (one chunk-free prefill)
    b = gen.add(long, 6, eos_token_id=None)
    for expect_b in (False, False, True):  # b's first token comes with its last chunk
        produced = gen.step()
        assert a in produced and (b in produced) == expect_b
    assert gen.result(b).prefilled == 40
    while gen.active():
        gen.step()
    assert gen.remove(a) == short + hf_ref(model, short, 8)[0]
    assert gen.remove(b) == long + hf_ref(model, long, 6)[0]
    assert gen.free_pages == gen.num_pages


def test_bad_chunk_size_is_refused(chunked):
    from attnforge import compile_generator
    from attnforge.errors import InputError

    model, _ = chunked["llama"]
    with pytest.raises(InputError, match="prefill_chunk=0"):
        compile_generator(model, max_batch_size=1, max_seq_len=32, prefill_chunk=0)
