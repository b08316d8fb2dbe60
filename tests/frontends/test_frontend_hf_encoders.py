"""HF encoders (tiny, random weights) import, build on llvm and match eager fp32."""

from __future__ import annotations

import pytest

CASES = [(name, 2, impl) for name in ("bert", "vit") for impl in ("eager", "sdpa")]


@pytest.mark.parametrize("name, batch, impl", CASES, ids=[f"{n}-b{b}-{i}" for n, b, i in CASES])
def test_hf_encoder_matches_eager(fe, name, batch, impl):
    fe.check_hf_model(name, batch, impl, 64)
