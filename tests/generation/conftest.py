"""Fixtures of the generation tests: compiled generators over :mod:`tiny_lms` models."""

import pytest
from tiny_lms import build_lm, hf_greedy


@pytest.fixture(scope="module")
def generators():
    """``{name: (model, generator)}``; programs compile on first use (prefill bucket 32,
    decode batch 3)."""
    from attnforge import compile_generator

    out = {}
    for name in ("llama", "mistral", "gpt2"):
        model = build_lm(name)
        out[name] = (model, compile_generator(model, max_batch_size=3, max_seq_len=64,
                                              prefill_buckets=[32], decode_buckets=[3]))
    return out


@pytest.fixture(scope="session")
def hf_ref():
    """:func:`hf_greedy` as a fixture (test modules here are not a package)."""
    return hf_greedy
