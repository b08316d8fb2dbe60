"""The paged decode kernel against the eager reference (``attnforge::paged_decode_attention``)
and float64 attention on the gathered keys: ragged lengths (0, inside the first page, not a
multiple of the page size), GQA, sliding window, flash-decoding splits."""

import numpy as np
import pytest
import torch
import tvm

from attnforge.generation.hf_attention import paged_decode_attention
from attnforge.schedules.attention_decode_paged import (
    default_num_splits,
    paged_decode_attention_cpu,
)
from attnforge.target import host_target


def _float64_reference(q, kn, vn, kp, vp, pt, cl, layer, scale, window):
    """Gather positions [lo, n) from the pages by hand, add the new token, softmax in fp64."""
    B, H, D = q.shape
    KVH, S = kn.shape[1], vp.shape[3]
    out = np.zeros((B, H, D))
    for b in range(B):
        n = int(cl[b])
        lo = max(0, n + 1 - window) if window else 0
        ks = [kp[layer, pt[b, p // S], :, :, p % S] for p in range(lo, n)] + [kn[b]]
        vs = [vp[layer, pt[b, p // S], :, p % S, :] for p in range(lo, n)] + [vn[b]]
        k, v = torch.stack(ks).double(), torch.stack(vs).double()  # [T, KVH, D]
        for h in range(H):
            s = k[:, h // (H // KVH)] @ q[b, h].double() * scale
            out[b, h] = (torch.softmax(s, 0) @ v[:, h // (H // KVH)]).numpy()
    return out


@pytest.mark.parametrize("heads,kv_heads,window,splits", [
    (8, 2, 0, 1), (8, 2, 0, 3), (4, 4, 20, 2), (6, 1, 7, 1)])
def test_paged_decode_kernel_matches_reference(heads, kv_heads, window, splits):
    B, D, L, P, S, MP = 4, 32, 2, 40, 16, 9
    g = torch.Generator().manual_seed(heads * 10 + window)
    q = torch.randn(B, heads, D, generator=g)
    kn, vn = torch.randn(2, B, kv_heads, D, generator=g)
    kp = torch.randn(L, P, kv_heads, D, S, generator=g)
    vp = torch.randn(L, P, kv_heads, S, D, generator=g)
    pt = torch.randperm(P, generator=g)[:B * MP].reshape(B, MP).int()
    cl = torch.tensor([0, 5, 37, 129], dtype=torch.int32)
    func = paged_decode_attention_cpu(batch=B, q_heads=heads, kv_heads=kv_heads, head_dim=D,
                                      num_layers=L, num_pages=P, page_size=S, max_pages=MP,
                                      scale=D ** -0.5, window=window, num_splits=splits)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=host_target())
    for layer in range(L):
        out = torch.full((B, heads, D), float("nan"))
        args = [tvm.runtime.from_dlpack(x) for x in (q, kn, vn, kp, vp, pt, cl)]
        lib["main"](*args, layer, tvm.runtime.from_dlpack(out))
        ref64 = _float64_reference(q, kn, vn, kp, vp, pt, cl, layer, D ** -0.5, window)
        eager = paged_decode_attention(q, kn, vn, kp, vp, pt, cl, layer, D ** -0.5, window)
        np.testing.assert_allclose(out.numpy(), ref64, rtol=0, atol=2e-6)
        np.testing.assert_allclose(eager.numpy(), ref64, rtol=0, atol=2e-6)


def test_default_num_splits_fills_threads():
    assert default_num_splits(1, 1, 64, 8) == 8
    assert default_num_splits(1, 2, 64, 2) == 1
    assert default_num_splits(8, 4, 64, 2) == 1
    assert default_num_splits(1, 1, 3, 8) == 3  # never more splits than pages


def test_kernel_rejects_bad_heads():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_decode_attention_cpu(batch=1, q_heads=6, kv_heads=4, head_dim=8, num_layers=1,
                                   num_pages=2, page_size=16, max_pages=2, scale=1.0)
