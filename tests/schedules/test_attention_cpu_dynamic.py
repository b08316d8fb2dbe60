"""Symbolic-length CPU kernel and its run-time block layout vs BlockMask.from_spec and SDPA."""

import numpy as np
import pytest
import torch
import tvm

from attnforge.schedules.attention_cpu import default_cpu_target
from attnforge.schedules.attention_cpu_dynamic import fused_attention_cpu_dynamic
from attnforge.schedules.block_mask import BlockMask, MaskSpec
from attnforge.schedules.block_mask_runtime import DispatchMask

SPECS = [MaskSpec.causal(),
         pytest.param(MaskSpec.full(), marks=pytest.mark.slow),
         pytest.param(MaskSpec.sliding_window(100, 0), marks=pytest.mark.slow),
         MaskSpec.chunked(48, causal=True),
         DispatchMask(200, MaskSpec.causal(), MaskSpec.sliding_window(63, 0))]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: getattr(s, "describe", str)())
def test_dynamic_kernel_and_layout(spec):
    kernel, layout = fused_attention_cpu_dynamic(None, 4, 2, None, None, 16, mask=spec)
    tgt = default_cpu_target()
    fk = tvm.compile(tvm.IRModule({"k": kernel.with_attr("global_symbol", "k")}), target=tgt)
    fl = tvm.compile(tvm.IRModule({"l": layout.with_attr("global_symbol", "l")}), target=tgt)
    rng = np.random.default_rng(0)
    for b, n in [(2, 5), (1, 64), (2, 131), (1, 300)]:
        q = rng.standard_normal((b, 4, n, 16), dtype=np.float32)
        k, v = (rng.standard_normal((b, 2, n, 16), dtype=np.float32) for _ in range(2))
        nb = -(-n // 64)
        arrs = [_t(np.zeros(s, "int32")) for s in ((1, nb), (1, nb, nb), (1, nb, nb))]
        fl["l"](_t(q), _t(k), *arrs)
        side = spec if not isinstance(spec, DispatchMask) else (
            spec.long if n >= spec.threshold else spec.short)
        ref = BlockMask.from_spec(side, n, n, 64, 64)
        knb, kidx, kfull = (a.numpy() for a in arrs)
        np.testing.assert_array_equal(knb, ref.kv_num_blocks)
        for qb in range(nb):
            c = ref.kv_num_blocks[0, qb]
            np.testing.assert_array_equal(kidx[0, qb, :c], ref.kv_indices[0, qb, :c])
            np.testing.assert_array_equal(kfull[0, qb, :c], ref.kv_is_full[0, qb, :c])
        o = _t(np.zeros((b, 4, n, 16), "float32"))
        fk["k"](_t(q), _t(k), _t(v), *arrs, o)
        mask = torch.from_numpy(side.dense(n, n)[0])
        want = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=mask,
            enable_gqa=True).numpy()
        np.testing.assert_allclose(o.numpy(), want, atol=2e-5, rtol=1e-4)


def test_dynamic_kernel_bad_input():
    with pytest.raises(ValueError, match="static layouts and mask tensors need compile-time"):
        fused_attention_cpu_dynamic(None, 4, 2, None, None, 16,
                                    mask=MaskSpec.static(np.eye(8, dtype=bool)))
    with pytest.raises(ValueError, match="threshold must be positive"):
        DispatchMask(0, MaskSpec.causal(), MaskSpec.causal())
    with pytest.raises(ValueError, match="full or structured"):
        DispatchMask(8, MaskSpec.causal(), MaskSpec.dynamic())
    with pytest.raises(NotImplementedError, match="dtype"):
        fused_attention_cpu_dynamic(None, 4, 2, None, None, 16, dtype="float16")
