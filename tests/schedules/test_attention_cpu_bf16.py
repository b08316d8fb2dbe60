"""bf16 fused attention on vdpbf16ps (schedules/attention_cpu_bf16.py): numerics vs float64 and
vs the fp32-widening kernel, masks, GQA, ragged tails, asm, refusals."""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest
import tvm
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.attention_cpu_bf16 import fused_attention_cpu_bf16
from attnforge.schedules.block_mask import MaskSpec

torch = pytest.importorskip("torch")


def _has_bf16() -> bool:
    try:
        return "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


needs_bf16 = pytest.mark.skipif(not _has_bf16(), reason="no avx512_bf16 in /proc/cpuinfo")


@functools.lru_cache(maxsize=16)
def _build(gen, **kw):
    f, bm = gen(**kw)
    return tvm.compile(tvm.IRModule({"main": f}), target=default_cpu_target()), bm


def _reference(q, k, v, scale, allowed):
    """float64 masked softmax(scale q k^T) v, kv heads repeated (GQA); empty rows give 0."""
    q, k, v = (x.float().numpy().astype(np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.where(allowed, scale * q @ k.transpose(0, 1, 3, 2), -np.inf)
    m = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - np.where(np.isinf(m), 0.0, m))
        den = p.sum(-1, keepdims=True)
        return np.where(den == 0, 0.0, (p @ v) / den)


def _run(lib, bm, q, k, v, dv):
    o = torch.full((q.shape[0], q.shape[1], q.shape[2], dv), float("nan"), dtype=torch.bfloat16)
    arrays = [torch.from_numpy(np.ascontiguousarray(a)) for a in
              (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    lib["main"](q, k, v, *arrays, o)
    return o.float().numpy()


@needs_bf16
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,spec,blocks", [
    (1, 4, 2, 100, 100, 64, MaskSpec.causal(), (64, 64)),        # GQA, ragged tail
    (2, 2, 1, 37, 90, 32, MaskSpec.full(), (16, 16)),            # batch 2, Nq != Nk
    (1, 2, 2, 130, 130, 48, MaskSpec.sliding_window(20), (32, 32)),
    (1, 1, 1, 50, 70, 32, MaskSpec.causal(-60), (16, 32)),       # rows with no allowed key
])
def test_matches_float64_like_the_fp32_kernel(B, Hq, Hkv, Nq, Nk, D, spec, blocks):
    """Error vs float64 on the same bf16 inputs: the bf16 output rounding (2^-9) dominates the
    max error, as for the fp32-widening kernel; the mean error grows by P's bf16 rounding only."""
    torch.manual_seed(Nq + Nk)
    q, k, v = (torch.randn(B, h, n, D).bfloat16() for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    kw = dict(batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Nq, kv_len=Nk, head_dim=D,
              dtype="bfloat16", scale=D ** -0.5 * 1.3, mask=spec, block_q=blocks[0],
              block_kv=blocks[1])
    allowed = spec.dense(Nq, Nk)[None]  # [1, 1, Nq, Nk]
    ref = _reference(q, k, v, kw["scale"], allowed)
    got = _run(*_build(fused_attention_cpu_bf16, **kw), q, k, v, D)
    widened = _run(*_build(fused_attention_cpu, **kw), q, k, v, D)
    peak = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 4e-3 * peak  # output rounding is 2^-9 = 2e-3
    assert np.abs(got - ref).mean() <= 2.0 * np.abs(widened - ref).mean() + 1e-6
    empty = ~allowed.any(-1)[0, 0]  # query rows with no allowed key give 0
    assert np.all(got[:, :, empty] == 0) and np.all(np.isfinite(got))


@needs_bf16
def test_asm_has_vdpbf16ps_for_both_matmuls():
    lib, _ = _build(fused_attention_cpu_bf16, batch=1, q_heads=1, kv_heads=1, q_len=64,
                    kv_len=64, head_dim=64, dtype="bfloat16", mask=MaskSpec.causal())
    asm = lib.mod.inspect_source("asm")
    # Q K^T: 2 x 4 (rows) x 4 (vectors) per channel pair; P V: the same per key pair
    assert asm.count("vdpbf16ps") >= 32 and "attnforge_dpbf16ps" not in asm
    assert "expf" not in asm and "exp2f" not in asm


@pytest.mark.parametrize("kw, exc, match", [
    ({"dtype": "float32"}, NotImplementedError, "bfloat16"),
    ({"score_mod": object()}, NotImplementedError, "score_mod"),
    ({"block_q": 24, "block_kv": 24}, ValueError, "multiple of 16"),
    ({"head_dim": 33}, ValueError, "even"),
])
def test_refusals(kw, exc, match):
    base = dict(batch=1, q_heads=2, kv_heads=1, q_len=16, kv_len=16, head_dim=32,
                dtype="bfloat16")
    with pytest.raises(exc, match=match):
        fused_attention_cpu_bf16(**{**base, **kw})
