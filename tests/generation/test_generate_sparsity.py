"""``compile_generator(sparsity=...)``: a causal sliding window imposed on a dense model gives
the tokens of Hugging Face's own sliding-window model (Mistral, ``sliding_window=w``) on the
same weights, frees pages outside the window, and policies the paged decode kernel cannot run
are refused by name."""

import pytest
import torch

from attnforge.errors import InputError
from attnforge.sparsity import BigBird, Dispatch, Layers, MaskMod, SlidingWindow

W = 8


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 511, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def windowed():
    """(dense Mistral compiled with SlidingWindow(8), HF Mistral with sliding_window=8): the
    same weights (same seed), only the window differs."""
    from tiny_lms import build_lm

    from attnforge import compile_generator

    dense = build_lm("mistral", sliding_window=None)
    ref = build_lm("mistral", sliding_window=W)
    for a, b in zip(dense.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # prompts over 16 tokens take the chunked prefill (the window is in its run-time mask),
    # shorter ones the prefill program (the window inserted by the attention passes)
    gen = compile_generator(dense, max_batch_size=2, max_seq_len=64, prefill_buckets=[32],
                            decode_buckets=[2], sparsity=SlidingWindow(W), verify=False,
                            prefill_chunk=16)
    return dense, ref, gen


def test_sliding_window_policy_matches_hf_sliding_window_model(windowed, hf_ref):
    dense, ref, gen = windowed
    assert dense.config.sliding_window is None and gen.window == W
    prompts = [_prompt(13, 1), _prompt(21, 2)]  # longer than the window; 21: chunked prefill
    got = gen.generate(prompts, 24, eos_token_id=None)
    for p, g in zip(prompts, got):
        want, gap = hf_ref(ref, p, 24)
        assert gap > 1e-4
        assert g[len(p):] == want
        assert g[len(p):] != hf_ref(dense, p, 24)[0]  # the window really changed the output
    assert gen.free_pages == gen.num_pages
    rep = gen.compile_reports["prefill_32"]
    assert all(s.get("sparsity_changed") for s in rep["attention"] if s.get("fused", True))


def test_window_bounds_the_pages_a_request_holds(windowed):
    _, _, gen = windowed
    assert gen.num_pages == 2 * 2  # ceil(8 / 16) + 1 pages per request, 2 requests
    rid = gen.add(_prompt(30, 3), 30, eos_token_id=None)
    held = []
    while gen.active():
        gen.step()
        if gen.active():
            held.append(gen.kv.held_pages(rid))
    assert max(held) <= 2 and len(held) > 20  # 60 tokens = 4 pages without the window
    gen.remove(rid)
    assert gen.free_pages == gen.num_pages


@pytest.mark.parametrize("policy,name", [
    (BigBird(16, 3, 2, 3), "BigBird"),
    (MaskMod(lambda b, h, q, k: k <= q, name="causal_mod"), "causal_mod"),
    (Dispatch(512, long=SlidingWindow(16)), "Dispatch"),
    (SlidingWindow(8, causal=False), "SlidingWindow"),
    (SlidingWindow(8) & SlidingWindow(4), " & "),
    (Layers({0: SlidingWindow(8), 1: BigBird(16, 3, 2, 3)}), "layer 1"),
])
def test_policies_decode_cannot_run_are_refused(policy, name):
    from tiny_lms import build_lm

    from attnforge import compile_generator

    model = build_lm("llama")
    with pytest.raises(InputError, match=f"sparsity policy .*{name}.*paged decode"):
        compile_generator(model, max_batch_size=1, max_seq_len=32, sparsity=policy)


def test_layers_policy_beyond_the_model_is_refused():
    from tiny_lms import build_lm

    from attnforge import compile_generator

    model = build_lm("llama")
    with pytest.raises(InputError, match="names layer 5; the model has 2 layers"):
        compile_generator(model, max_batch_size=1, max_seq_len=32,
                          sparsity=Layers({5: SlidingWindow(4)}))
