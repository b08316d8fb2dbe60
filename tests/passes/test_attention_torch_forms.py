"""Hand-written PyTorch attention and F.scaled_dot_product_attention, through torch.export:
each form is fused, lowered with the expected mask and matches eager PyTorch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from attnforge.passes import attention_pipeline, attention_rejections, attention_report
from tvm import relax

B, H, HKV, N, D = 2, 4, 2, 40, 8
LLVM = tvm.target.Target({"kind": "llvm"})


class SdpaCausal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaCausalShortQ(torch.nn.Module):  # q_len < kv_len: SDPA's is_causal is top-left
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q[:, :, -16:], k, v, is_causal=True)


class SdpaBoolMask(torch.nn.Module):
    def forward(self, q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


class SdpaGqa(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k[:, :HKV], v[:, :HKV], enable_gqa=True,
                                              scale=0.3)


class MaskedFill(torch.nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        i = torch.arange(N)
        banned = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] > 7)
        s = s.masked_fill(banned, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class RepeatInterleave(torch.nn.Module):
    def forward(self, q, k, v):
        k = k[:, :HKV].repeat_interleave(H // HKV, dim=1)
        v = v[:, :HKV].repeat_interleave(H // HKV, dim=1)
        return torch.softmax((q * D**-0.5) @ k.transpose(2, 3), dim=-1) @ v


class Bmm3d(torch.nn.Module):
    def forward(self, q, k, v):
        q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.5, dim=-1), v)


CASES = [
    (SdpaCausal, "causal", False),
    (SdpaCausalShortQ, "causal", False),
    (SdpaBoolMask, "dense data-dependent", True),
    (SdpaGqa, "full", False),
    (MaskedFill, "sliding_window(left=7, right=0)", False),
    (RepeatInterleave, "full", False),
    (Bmm3d, "full", False),
]


@pytest.mark.parametrize("cls,mask,with_mask", CASES, ids=[c[0].__name__ for c in CASES])
def test_torch_form(cls, mask, with_mask):
    from tvm.relax.frontend.torch import from_exported_program

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    args = (q, k, v) + ((torch.rand(B, 1, N, N, generator=g) > 0.3,) if with_mask else ())
    model = cls().eval()
    mod = from_exported_program(torch.export.export(model, args))
    lowered = attention_pipeline(LLVM, block_q=16, block_kv=16)(mod)
    (e,) = attention_report(lowered)
    assert attention_rejections(lowered) == []
    assert e["lowered_to"] == "attnforge.fused_attention_cpu" and e["mask"] == mask, e
    vm = relax.VirtualMachine(tvm.compile(lowered, LLVM), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    while not hasattr(out, "numpy"):
        out = out[0]
    with torch.no_grad():
        ref = model(*args).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)
