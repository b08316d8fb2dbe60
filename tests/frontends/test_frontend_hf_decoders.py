"""HF decoders (tiny, random weights) import, build on llvm and match eager fp32."""

from __future__ import annotations

import pytest

CASES = [("gpt2", 1, "eager"), ("gpt2", 1, "sdpa")] + [
    (name, 2, impl) for name in ("gpt2", "llama", "mistral") for impl in ("eager", "sdpa")
]


@pytest.mark.parametrize("name, batch, impl", CASES, ids=[f"{n}-b{b}-{i}" for n, b, i in CASES])
def test_hf_decoder_matches_eager(fe, name, batch, impl):
    seq = 128 if name == "mistral" else 64  # mistral: the sliding window (32) must matter
    fe.check_hf_model(name, batch, impl, seq)
