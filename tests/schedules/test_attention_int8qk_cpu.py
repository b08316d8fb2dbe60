"""The int8-QKᵀ fused attention kernel for llvm (schedules/attention_cpu_int8qk.py).

Two references on fresh random inputs: float64 SDPA (the quantisation error, bounded) and a
numpy emulation of the kernel's quantisation (same means, block scales, rounding), which the
kernel must match far more tightly than the quantisation error: that catches layout and
indexing bugs that a loose SDPA bound would hide.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from attnforge.schedules.attention_cpu import default_cpu_target, fused_attention_cpu
from attnforge.schedules.attention_cpu_int8qk import QK_ATTR, fused_attention_cpu_int8qk
from attnforge.schedules.block_mask import MaskSpec


ZNVER4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})  # compiles on any host


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


# running the kernels needs VNNI (building for a host without it would abort LLVM)
needs_vnni = pytest.mark.skipif(not _has_vnni(), reason="no avx512_vnni in /proc/cpuinfo")


@functools.cache
def _target():
    return default_cpu_target()


@functools.lru_cache(maxsize=32)
def _build(gen, **kw):
    f, bm = gen(**kw)
    return tvm.compile(tvm.IRModule({"main": f}), target=_target()), bm


def _softmax_pv(s, v, allowed, additive, empty_rows):
    if additive is not None:
        s = s + additive.astype(np.float64)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.exp(s - np.where(np.isinf(m), 0.0, m))
        den = p.sum(-1, keepdims=True)
        o = (p @ v) / den
    return np.where(den == 0, 0.0, o) if empty_rows == "zero" else o


def _rep(x, g):
    return np.repeat(x.astype(np.float64), g, axis=1)


def _sdpa64(q, k, v, scale, allowed=None, additive=None, empty_rows="zero"):
    g = q.shape[1] // k.shape[1]
    s = scale * q.astype(np.float64) @ _rep(k, g).transpose(0, 1, 3, 2)
    return _softmax_pv(s, _rep(v, g), allowed, additive, empty_rows)


def _blocks(x, axis_len, blk):
    """Symmetric per-block int8 of x[..., N, D] along N (last partial block on its own)."""
    xq, sc = np.empty_like(x, dtype=np.float64), np.empty(x.shape[:-2] + (-(-axis_len // blk),))
    for j in range(sc.shape[-1]):
        part = x[..., j * blk:(j + 1) * blk, :]
        amax = np.abs(part).max(axis=(-1, -2)).astype(np.float32)
        s = np.where(amax > 0, amax * np.float32(1 / 127.0), np.float32(1)).astype(np.float32)
        inv = (np.float32(1) / s).astype(np.float32)
        xq[..., j * blk:(j + 1) * blk, :] = np.clip(np.rint(part * inv[..., None, None]),
                                                    -127, 127) * s[..., None, None]
        sc[..., j] = s
    return xq


def _emulate(q, k, v, scale, BQ, BK, smooth, allowed=None, additive=None, empty_rows="zero",
             mod=None):
    """The kernel's numerics: K - mean(K), per-block int8 Q and K, exact products, fp64 rest;
    ``mod(s)``: a score mod, applied after adding the smoothing shift back."""
    g = q.shape[1] // k.shape[1]
    mean = k.mean(axis=2, keepdims=True, dtype=np.float64).astype(np.float32)
    kp = (k - mean if smooth else k).astype(np.float32)
    qd, kd = _blocks(q, q.shape[2], BQ), _blocks(kp, k.shape[2], BK)
    s = scale * qd @ _rep(kd, g).transpose(0, 1, 3, 2)
    if mod is not None:
        s = mod(s + (scale * q.astype(np.float64) @ _rep(mean, g).transpose(0, 1, 3, 2)
                     if smooth else 0.0))
    return _softmax_pv(s, _rep(v, g), allowed, additive, empty_rows)


def _run(B=1, Hq=2, Hkv=2, Nq=150, Nk=150, D=64, spec=None, mask_input=None, mtensor=None,
         empty_rows="zero", BQ=64, BK=64, smooth=True, k_offset=0.0, seed=0):
    spec = MaskSpec.full() if spec is None else spec
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Nq, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, Nk, D), dtype=np.float32)
    k += np.float32(k_offset) * rng.standard_normal(D).astype(np.float32)  # per-channel offset
    v = rng.standard_normal((B, Hkv, Nk, D), dtype=np.float32)
    scale = float(D) ** -0.5
    lib, bm = _build(fused_attention_cpu_int8qk, batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Nq,
                     kv_len=Nk, head_dim=D, scale=scale, mask=spec, block_q=BQ, block_kv=BK,
                     mask_input=mask_input, empty_rows=empty_rows, smooth_k=smooth,
                     mask_input_shape=None if mtensor is None else tuple(mtensor.shape))
    out = np.full((B, Hq, Nq, D), 7.0, dtype=np.float32)  # never zeros: catches missed stores
    args = [q, k, v, bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full]
    args += [mtensor] if mtensor is not None else []
    targs = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args + [out]]
    lib["main"](*targs)
    out = targs[-1].numpy()
    allowed = spec.dense(Nq, Nk)[None] if spec.kind == "structured" else None
    if mask_input == "bool":
        allowed = mtensor if allowed is None else allowed & mtensor
    additive = mtensor if mask_input == "additive" else None
    ref = _sdpa64(q, k, v, scale, allowed, additive, empty_rows)
    emu = _emulate(q, k, v, scale, BQ, BK, smooth, allowed, additive, empty_rows)
    return out, ref, emu


def _rel(a, b):
    fin = ~np.isnan(b)
    return float(np.abs(a[fin] - b[fin]).max() / np.abs(b[fin]).max())


# ---------------------------------------------------------------------------- structure
def test_kernel_signature_attrs_and_vnni_in_assembly():
    kw = {"batch": 2, "q_heads": 4, "kv_heads": 2, "q_len": 40, "kv_len": 50, "head_dim": 32,
          "mask": MaskSpec.causal(10), "block_q": 16, "block_kv": 16}
    f, bm = fused_attention_cpu_int8qk(**kw)
    f32, _ = fused_attention_cpu(**kw)
    # same call signature as the fp32 kernel: LowerAttentionToTIR swaps only the callee
    assert [(p.name, str(p.dtype), [int(x) for x in p.shape]) for p in f.params] == [
        (p.name, str(p.dtype), [int(x) for x in p.shape]) for p in f32.params]
    info = f.attrs[QK_ATTR]
    assert str(info["qk"]) == "int8" and bool(info["smooth_k"]) and int(f.attrs["op_pattern"]) == 8
    assert "llvm.x86.avx512.vpdpbusd.512" in f.script()
    asm = tvm.compile(tvm.IRModule({"main": f}), target=ZNVER4).mod.inspect_source("asm")
    # the QK^T inner loop: 512-bit VNNI on zmm registers
    dots = [ln for ln in asm.splitlines() if "vpdpbusd" in ln]
    assert dots and all("zmm" in ln for ln in dots), dots[:3]


def test_rejects_bad_score_mod_and_block_q():
    with pytest.raises(ValueError, match="multiple of 16"):
        fused_attention_cpu_int8qk(1, 2, 2, 64, 64, 32, block_q=40)
    with pytest.raises(ValueError, match="score_mod"):
        fused_attention_cpu_int8qk(1, 2, 2, 64, 64, 32, score_mod=object())


# ---------------------------------------------------------------------------- numerics
CASES = [
    {"spec": MaskSpec.causal(), "B": 2},  # causal, batch 2, N=150 (ragged blocks)
    {"spec": MaskSpec.full(), "Nq": 100, "Nk": 170},  # non-causal, Nq != Nk
    {"spec": MaskSpec.causal(), "Hq": 8, "Hkv": 2, "Nq": 90, "Nk": 90, "D": 80},  # GQA
    {"spec": MaskSpec.sliding_window(40), "Nq": 200, "Nk": 200, "D": 38},  # D % 4 != 0
    {"spec": MaskSpec.causal(), "Nq": 130, "Nk": 130, "BQ": 32, "BK": 16},
]


@needs_vnni
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['spec'].describe()}-{c.get('Nq', 150)}")
def test_matches_emulation_and_bounded_vs_float64(case):
    out, ref, emu = _run(**case)
    # the kernel computes exactly the emulated quantised attention (up to fp32 rounding) ...
    assert _rel(out, emu) < 2e-4, _rel(out, emu)
    # ... whose error against float64 SDPA is the int8 rounding of Q and K (max abs error /
    # max |ref|: measured 7.6e-3 to 1.9e-2 on these N(0, 1) inputs; fp32 kernel: ~5e-7)
    assert _rel(out, ref) < 2.5e-2, _rel(out, ref)


@needs_vnni
def test_smoothing_matters_for_k_with_a_channel_offset():
    """K with a large per-channel offset (as in trained LLMs): without smoothing the offset
    eats the int8 range of K; subtracting the mean restores the N(0, 1) accuracy."""
    kw = {"spec": MaskSpec.causal(), "Nq": 192, "Nk": 192, "k_offset": 8.0, "seed": 3}
    out_s, ref, emu_s = _run(smooth=True, **kw)
    out_n, _, emu_n = _run(smooth=False, **kw)
    err_s, err_n = _rel(out_s, ref), _rel(out_n, ref)
    assert _rel(out_s, emu_s) < 2e-4 and _rel(out_n, emu_n) < 2e-4
    assert err_s < 2.5e-2, err_s
    assert err_n > 3 * err_s, (err_s, err_n)


@needs_vnni
def test_mask_tensors_and_fully_masked_rows():
    rng = np.random.default_rng(5)
    B, H, N = 2, 2, 100
    keep = rng.random((B, 1, N, N)) < 0.7
    keep[0, 0, 3, :] = False  # a fully masked row
    out, ref, emu = _run(B=B, Hq=H, Hkv=H, Nq=N, Nk=N, spec=MaskSpec.dynamic(),
                         mask_input="bool", mtensor=keep)
    assert np.all(out[0, :, 3] == 0.0)
    assert _rel(out, emu) < 2e-4 and _rel(out, ref) < 2.5e-2
    out, ref, _ = _run(B=B, Hq=H, Hkv=H, Nq=N, Nk=N, spec=MaskSpec.dynamic(),
                       mask_input="bool", mtensor=keep, empty_rows="nan")
    assert np.isnan(out[0, :, 3]).all() and not np.isnan(out[1]).any()
    pad = np.ones((B, 1, 1, N), bool)
    pad[1, ..., 60:] = False  # key padding of the second sequence
    add = np.where(rng.random((N, N)) < 0.2, -1e4, rng.standard_normal((N, N))).astype(np.float32)
    for mi, m in (("bool", pad), ("additive", add)):
        out, ref, emu = _run(B=B, Hq=H, Hkv=H, Nq=N, Nk=N, spec=MaskSpec.causal(),
                             mask_input=mi, mtensor=m)
        assert _rel(out, emu) < 2e-4 and _rel(out, ref) < 2.5e-2, mi


@needs_vnni
def test_bfloat16_inputs_use_the_same_quantisation():
    """bf16 Q/K/V (widened on load): the same emulation on the bf16 values, fp32 P V."""
    torch = pytest.importorskip("torch")
    B, H, N, D = 1, 2, 100, 64
    lib, bm = _build(fused_attention_cpu_int8qk, batch=B, q_heads=H, kv_heads=H, q_len=N,
                     kv_len=N, head_dim=D, dtype="bfloat16", scale=0.125, mask=MaskSpec.causal())
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D).bfloat16() for _ in range(3))
    o = torch.full((B, H, N, D), 7.0, dtype=torch.bfloat16)
    arrays = [torch.from_numpy(a) for a in (bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full)]
    lib["main"](q, k, v, *arrays, o)
    q, k, v = (t.float().numpy() for t in (q, k, v))
    allowed = MaskSpec.causal().dense(N, N)[None]
    out = o.float().numpy()
    emu = _emulate(q, k, v, 0.125, 64, 64, True, allowed)
    assert _rel(out, emu) < 8e-3  # the bf16 rounding of the output
    assert _rel(out, _sdpa64(q, k, v, 0.125, allowed)) < 2.5e-2


@needs_vnni
def test_static_block_sparse_per_head_layout():
    """A static per-head layout (BigBird-like policies): skipped blocks, partial blocks with the
    element mask, a fully masked row; blocks of 16 rows (16 = one zmm of queries)."""
    rng = np.random.default_rng(3)
    nq, nk, bs = 100, 90, 16
    blocks = rng.random((2, -(-nq // bs), -(-nk // bs))) < 0.35
    dense = np.repeat(np.repeat(blocks, bs, 1), bs, 2)[:, :nq, :nk]
    dense &= rng.random(dense.shape) < 0.8
    dense[:, 5] = False
    out, ref, emu = _run(Hq=2, Hkv=1, Nq=nq, Nk=nk, spec=MaskSpec.static(dense),
                         mask_input="bool", mtensor=dense[None], BQ=bs, BK=bs)
    assert (out[:, :, 5] == 0).all()
    assert _rel(out, emu) < 2e-4 and _rel(out, ref) < 2.5e-2


@needs_vnni
def test_score_mod_sees_the_unsmoothed_score():
    """A non-linear FlexAttention score mod (tanh soft cap): the kernel adds q . mean back
    before the mod, so it gets q . k; K has a channel offset, where a missing add-back shows."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def softcap(score: T.float32, b: T.int32, h: T.int32, q: T.int32, k: T.int32) -> T.float32:
        return T.tanh(score / T.float32(5.0)) * T.float32(5.0)

    rng = np.random.default_rng(11)
    B, H, N, D = 1, 2, 150, 64
    q = rng.standard_normal((B, H, N, D), dtype=np.float32)
    k = (rng.standard_normal((B, H, N, D)) + 4 * rng.standard_normal(D)).astype(np.float32)
    v = rng.standard_normal((B, H, N, D), dtype=np.float32)
    f, bm = fused_attention_cpu_int8qk(B, H, H, N, N, D, mask=MaskSpec.causal(),
                                       score_mod=softcap)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=_target())
    args = [q, k, v, bm.kv_num_blocks, bm.kv_indices, bm.kv_is_full,
            np.full((B, H, N, D), 7.0, np.float32)]
    targs = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    lib["main"](*targs)
    out, scale, allowed = targs[-1].numpy(), D ** -0.5, MaskSpec.causal().dense(N, N)[None]

    def cap(s):
        return np.tanh(s / 5.0) * 5.0

    emu = _emulate(q, k, v, scale, 64, 64, True, allowed, mod=cap)
    g = 1
    ref = _softmax_pv(cap(scale * q.astype(np.float64) @ _rep(k, g).transpose(0, 1, 3, 2)),
                      _rep(v, g), allowed, None, "zero")
    assert _rel(out, emu) < 2e-4  # fast_tanh vs np.tanh included
    assert _rel(out, ref) < 2.5e-2, _rel(out, ref)
