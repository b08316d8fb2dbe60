"""``index_put`` with one index tensor and sliced dims (HF static-cache writes) imports and
matches eager; forms TVM already handles still go to TVM's converter."""

import numpy as np
import pytest
import torch

from attnforge.frontends import import_torch_model
from attnforge.frontends.converters import CONVERTERS
from attnforge.frontends.index_put import convert_index_put


class CacheWrite(torch.nn.Module):
    def __init__(self, axis_prefix: int, accumulate: bool):
        super().__init__()
        self.n, self.acc = axis_prefix, accumulate

    def forward(self, cache, pos, new):
        return torch.ops.aten.index_put(cache, [None] * self.n + [pos], new, self.acc)


class SetItem(torch.nn.Module):
    """The form HF's StaticLayer uses: ``keys[:, :, cache_position] = key_states``."""

    def forward(self, cache, pos, new):
        out = cache.clone()
        out[:, :, pos] = new
        return out


def _run(model, xs):
    import tvm
    from tvm import relax

    from attnforge.compiler import _build, _schedule
    from attnforge.target import parse_target

    imp = import_torch_model(model, xs)  # frontends.converters.CONVERTERS has ours
    tgt = parse_target("llvm")
    mod, _, _ = _schedule(imp.mod, tgt)
    vm = relax.VirtualMachine(_build(mod, tgt), tvm.cpu())
    out = vm["main"](*[tvm.runtime.from_dlpack(x.contiguous()) for x in xs])
    return (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()


@pytest.mark.parametrize("axis,accumulate", [(2, False), (1, False), (2, True)])
def test_single_index_put_matches_eager(axis, accumulate):
    g = torch.Generator().manual_seed(axis)
    cache = torch.randn(2, 3, 9, 4, generator=g)
    pos = torch.tensor([7, 1, 4])
    shape = list(cache.shape)
    shape[axis] = 3
    new = torch.randn(*shape, generator=g)
    if axis == 1:
        pos = torch.tensor([2, 0, 1])
    model = CacheWrite(axis, accumulate)
    np.testing.assert_allclose(_run(model, (cache, pos, new)), model(cache, pos, new).numpy(),
                               rtol=0, atol=1e-6)


def test_setitem_cache_write_matches_eager():
    g = torch.Generator().manual_seed(5)
    cache, new = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    pos = torch.tensor([5, 6, 7])
    np.testing.assert_allclose(_run(SetItem(), (cache, pos, new)),
                               SetItem()(cache, pos, new).numpy(), rtol=0, atol=0)


def test_registered_in_attnforge_converters():
    assert CONVERTERS["index_put.default"] is convert_index_put


def test_hf_static_cache_export_imports_and_matches():
    """transformers' own static-cache export (``TorchExportableModuleForDecoderOnlyLM``): its
    cache writes are ``index_put`` with broadcast indices; with our converter it imports and the
    first call (prefill into an empty cache) matches HF.  (The cache buffers' mutations are not
    carried between calls by TVM's importer; generation uses :mod:`attnforge.generation`.)"""
    import transformers as tf
    import tvm
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM
    from tvm import relax

    from attnforge.compiler import _build, _schedule
    from attnforge.frontends.decompose import decompose
    from attnforge.frontends.translate import translate
    from attnforge.target import parse_target

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=32)
    ids, pos = torch.tensor([[5, 9, 2, 77]]), torch.arange(4)
    ep = decompose(wrapper.export(input_ids=ids, cache_position=pos))
    ops = [n.target.__name__ for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count("index_put.default") == 2  # K and V writes of the one layer
    tgt = parse_target("llvm")
    mod, _, _ = _schedule(translate(ep), tgt)
    vm = relax.VirtualMachine(_build(mod, tgt), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(ids.numpy()), tvm.runtime.tensor(pos.numpy()))
    out = out if isinstance(out, tvm.runtime.Tensor) else out[0]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)
