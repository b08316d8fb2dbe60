"""The two compiled programs of a generator: prefill (one prompt) and decode (a batch of rows).

Both wrap the Hugging Face model's *own* modules (``base_model`` then the output embedding)
with attention routed to :mod:`.hf_attention`; ``torch.export`` -> attnforge's frontend (with
the paged-decode converter) -> attnforge's attention passes -> CPU schedules -> ``tvm.compile``.

* prefill ``(input_ids[1, N], position_ids[1, N], last[1]) -> (logits[1, V], K[L, 1, KVH, N, D],
  V[...])``: ``N`` is a bucket length (the prompt is right-padded; causal attention keeps the
  padding out of the real rows), attention is the fused block-skipping kernel;
* decode ``(input_ids[B, 1], position_ids[B, 1], k_pool, v_pool, page_table[B, MP],
  ctx_lens[B]) -> (logits[B, V], K_new[L, B, KVH, 1, D], V_new[...])``: ``B`` is a batch
  bucket, attention is the paged decode kernel; the caller writes K_new/V_new into the pool.

Shapes are static (the attention passes need them), so each bucket is one compiled program.
"""

from __future__ import annotations

import time

import torch

from . import hf_attention as ha


class _Wrapper(torch.nn.Module):
    def __init__(self, model, policy_windows: dict | int = 0):
        super().__init__()
        self.model = model
        self.policy_windows = policy_windows  # sparsity policy's decode windows (.sparsity)

    def _hidden(self, ctx, input_ids, position_ids):
        with ha.attention_context(ctx):
            out = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                        use_cache=False)
        return out.last_hidden_state


class PrefillProgram(_Wrapper):
    def forward(self, input_ids, position_ids, last):
        ctx = ha.AttentionContext("prefill", policy_windows=self.policy_windows)
        h = self._hidden(ctx, input_ids, position_ids)
        logits = self.model.get_output_embeddings()(h[:, last])[:, 0]
        return logits, torch.stack(ctx.keys), torch.stack(ctx.values)


class ChunkProgram(_Wrapper):
    """Chunked prefill ``(input_ids[1, C], position_ids[1, C], k_pool, v_pool, page_table[1, MP],
    ctx_lens[1], last[1]) -> (logits[1, V], K[L, 1, KVH, C, D], V[...])``: ``C`` prompt tokens
    after the ``ctx_lens[0]`` already cached ones."""

    def forward(self, input_ids, position_ids, k_pool, v_pool, page_table, ctx_lens, last):
        ctx = ha.AttentionContext("chunk", k_pool, v_pool, page_table, ctx_lens,
                                  policy_windows=self.policy_windows)
        h = self._hidden(ctx, input_ids, position_ids)
        logits = self.model.get_output_embeddings()(h[:, last])[:, 0]
        return logits, torch.stack(ctx.keys), torch.stack(ctx.values)


class DecodeProgram(_Wrapper):
    def forward(self, input_ids, position_ids, k_pool, v_pool, page_table, ctx_lens):
        ctx = ha.AttentionContext("decode", k_pool, v_pool, page_table, ctx_lens,
                                  policy_windows=self.policy_windows)
        h = self._hidden(ctx, input_ids, position_ids)
        logits = self.model.get_output_embeddings()(h[:, 0])
        return logits, torch.stack(ctx.keys), torch.stack(ctx.values)


def compile_program(wrapper: torch.nn.Module, example_inputs: tuple, target, *,
                    precision: str = "float32", sparsity=None, int8_exclude=None,
                    int8_options: dict | None = None):
    """Compile one wrapper; returns ``(CompiledModel, report)``.

    ``precision`` / ``sparsity`` go through ``compile_model``'s own lowering (``_lower``: the
    policy is ANDed into the prefill's fused attention sites; the decode program has none, its
    window is set by the attention context) and :func:`.precision.lower_precision`."""
    from ..compiler import _build, _lower
    from ..frontends import import_torch_model
    from ..frontends.paged_attention import OP_KEY, convert_paged_decode_attention
    from ..quantization import constant_bytes
    from ..runtime import CompiledModel
    from .precision import lower_precision, split_int8_options

    t0 = time.perf_counter()
    model = wrapper.model
    prev, was_training = model.config._attn_implementation, model.training
    model.config._attn_implementation = ha.register()
    wrapper.eval()  # the importer restores the wrapper's mode: a fresh module is in train mode
    try:
        imp = import_torch_model(wrapper, example_inputs,
                                 custom_convert_map={OP_KEY: convert_paged_decode_attention})
    finally:
        model.config._attn_implementation = prev
        model.train(was_training)
    int8_options, attention_qk = split_int8_options(precision, target, int8_options)
    mod, sites = _lower(imp.mod, target, True, None, 64, precision=precision, sparsity=sparsity,
                        attention_qk=attention_qk)
    mod, extra = lower_precision(mod, target, precision, example_inputs, model, sites,
                                 int8_exclude=int8_exclude, int8_options=int8_options,
                                 attention_qk=attention_qk)
    mod, schedules = _schedule_generation(mod, target)
    weight_bytes = constant_bytes(mod)
    exe = _build(mod, target)
    report = {"precision": precision, "attention": sites, "schedules": schedules,
              "weight_bytes": weight_bytes, **extra,
              "compile_s": round(time.perf_counter() - t0, 3)}
    return CompiledModel(exe, target, imp.input_specs, imp.output_desc, report), report


def _schedule_generation(mod, target):
    """compile_model's CPU pipeline plus, first, the skinny-matmul rule for the decode / LM-head
    matmuls (``schedules/decode_matvec_cpu.py``) and the row-reduction rule for the norms
    (:mod:`.norm_schedule`); returns ``(module, per-rule counts)``."""
    from collections import Counter

    import tvm
    from tvm.s_tir import dlight as dl

    from ..schedules.cpu_schedule import cpu_legalize_passes, cpu_schedule_pass
    from ..schedules.decode_matvec_cpu import DecodeMatvecCPU
    from .norm_schedule import RowReductionCPU

    stats: Counter = Counter()
    with target:
        mod = tvm.transform.Sequential(cpu_legalize_passes())(mod)
        before = {gv for gv, f in mod.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled")}
        mod = dl.ApplyDefaultSchedule(DecodeMatvecCPU())(mod)
        stats["DecodeMatvecCPU"] = sum(
            1 for gv in before if mod[gv].attrs.get("tirx.is_scheduled"))
        before = {gv for gv in before if not mod[gv].attrs.get("tirx.is_scheduled")}
        mod = dl.ApplyDefaultSchedule(RowReductionCPU())(mod)
        stats["RowReductionCPU"] = sum(
            1 for gv in before if mod[gv].attrs.get("tirx.is_scheduled"))
        mod = cpu_schedule_pass(target, stats)(mod)
    return mod, dict(stats)
