"""The attention function attnforge plugs into Hugging Face models for generation.

Transformers routes every attention call of its decoder models (Llama, Mistral, GPT-2, ...)
through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.  We register
:func:`attnforge_attention` there under :data:`ATTN_IMPLEMENTATION`, so the model's own code
(embeddings, RoPE, norms, projections, MLP, LM head) is exported unchanged and only the
attention boundary is ours:

* ``prefill``: causal (or sliding-window) SDPA over the prompt, written in the form
  ``FuseAttention`` recognises, so it lowers to the block-skipping fused kernel; the layer's
  K/V are returned as extra outputs to be written into the page pool;
* ``decode``: one query row per sequence; the custom op ``attnforge::paged_decode_attention``
  reads the cached K/V through a page table (the frontend converts it to the paged decode TIR
  kernel, ``schedules/attention_decode_paged.py``) and includes the new token's K/V, which are
  returned as extra outputs as well.

A model whose mask builder is not registered for this implementation gets ``attention_mask=None``
(transformers skips mask creation for custom attention functions); the masks are ours.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .sparsity import effective_window

ATTN_IMPLEMENTATION = "attnforge_paged"
_LOCAL = threading.local()


@dataclass
class AttentionContext:
    """What the attention function needs during one traced/eager forward."""

    mode: str  # "prefill" | "chunk" (chunked prefill over the cache) | "decode"
    k_pool: torch.Tensor | None = None  # [L, P, KVH, D, page]
    v_pool: torch.Tensor | None = None  # [L, P, KVH, page, D]
    page_table: torch.Tensor | None = None  # [B, max_pages] int32
    ctx_lens: torch.Tensor | None = None  # [B] int32: cached tokens before this one
    keys: list = field(default_factory=list)  # new K per layer, [B, KVH, N, D]
    values: list = field(default_factory=list)
    windows: list = field(default_factory=list)  # sliding window per layer (0 = none)
    # compile_generator(sparsity=): the policy's decode window, int or {layer: window}
    # (generation/sparsity.py); the prefill gets the policy through the attention passes
    policy_windows: dict | int = 0


@contextlib.contextmanager
def attention_context(ctx: AttentionContext):
    prev = getattr(_LOCAL, "ctx", None)
    _LOCAL.ctx = ctx
    try:
        yield ctx
    finally:
        _LOCAL.ctx = prev


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def prefill_attention(q, k, v, scale: float, window: int | None) -> torch.Tensor:
    """Causal (sliding-window when ``window``) attention of a fresh prompt, [B, H, N, D]."""
    n = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if not window or window >= n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (j <= i) & (i - j < window)  # HF: kv_idx > q_idx - sliding_window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def chunk_attention(q, k, v, k_pool, v_pool, page_table, ctx_lens, layer: int, scale: float,
                    window: int) -> torch.Tensor:
    """Chunked prefill: ``C`` new queries (positions ``ctx_len + i``) over the sequence's cached
    K/V (gathered from its pages, ``page_table[0]`` in logical order) and the chunk's own K/V
    (causal), ``[1, H, C, D]``. The keep-mask depends on the run-time ``ctx_len``: the fused
    kernel applies it as a run-time mask on every block (dense over the cache)."""
    c = q.shape[2]
    pages = page_table[0].long()
    kc = k_pool[layer].index_select(0, pages)  # [MP, KVH, D, S]
    vc = v_pool[layer].index_select(0, pages)  # [MP, KVH, S, D]
    mp, kvh, d, s = kc.shape
    kc = kc.permute(1, 0, 3, 2).reshape(1, kvh, mp * s, d)
    vc = vc.permute(1, 0, 2, 3).reshape(1, kvh, mp * s, d)
    cached = mp * s
    groups = q.shape[1] // kvh
    keys = _repeat_kv(torch.cat([kc, k], 2), groups)
    values = _repeat_kv(torch.cat([vc, v], 2), groups)
    j = torch.arange(cached + c)[None, :]
    i = torch.arange(c)[:, None]
    n = ctx_lens[0]
    keep = torch.where(j < cached, j < n, j - cached <= i)
    if window:  # HF: key position > query position - window
        kpos = torch.where(j < cached, j, j - cached + n)
        keep = keep & (kpos > i + n - window)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep[None, None],
                                          scale=scale)


@torch.library.custom_op("attnforge::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                           k_pool: torch.Tensor, v_pool: torch.Tensor,
                           page_table: torch.Tensor, ctx_lens: torch.Tensor,
                           layer: int, scale: float, window: int) -> torch.Tensor:
    """One query row per sequence over its paged K/V plus the new token (eager reference).

    q ``[B, H, D]``, k_new/v_new ``[B, KVH, D]``, ``k_pool[L, P, KVH, D, page]`` (keys transposed
    inside a page), ``v_pool[L, P, KVH, page, D]``, page_table
    ``[B, max_pages]`` int32, ctx_lens ``[B]`` int32 (cached tokens; the new token sits at
    position ``ctx_lens[b]``), window 0 = none else keys ``pos > ctx_len - window``.
    Returns ``[B, H, D]``.
    """
    b_count, heads, d = q.shape
    kvh = k_new.shape[1]
    page = v_pool.shape[3]
    out = torch.zeros_like(q)
    for b in range(b_count):
        n = int(ctx_lens[b])
        lo = max(0, n + 1 - window) if window > 0 else 0
        pos = torch.arange(lo, n)
        pages = page_table[b, pos // page].long()
        k = torch.cat([k_pool[layer, pages, :, :, pos % page], k_new[b][None]], 0)  # [T,KVH,D]
        v = torch.cat([v_pool[layer, pages, :, pos % page], v_new[b][None]], 0)
        k = k.repeat_interleave(heads // kvh, dim=1)
        v = v.repeat_interleave(heads // kvh, dim=1)
        s = torch.einsum("hd,thd->ht", q[b], k) * scale
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(s, -1), v)
    return out


@paged_decode_attention.register_fake
def _(q, k_new, v_new, k_pool, v_pool, page_table, ctx_lens, layer, scale, window):
    return torch.empty_like(q)


def attnforge_attention(module, query, key, value, attention_mask, scaling=None,
                        dropout=0.0, sliding_window=None, **kwargs):
    """``ALL_ATTENTION_FUNCTIONS`` entry: q/k/v ``[B, H, N, D]`` -> ``([B, N, H, D], None)``."""
    ctx: AttentionContext | None = getattr(_LOCAL, "ctx", None)
    if ctx is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION!r} attention runs only inside an attnforge "
                           "generator forward (no AttentionContext is active)")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    model_window = int(sliding_window or 0)
    window = effective_window(model_window, ctx.policy_windows,
                              int(getattr(module, "layer_idx", len(ctx.keys))))
    ctx.keys.append(key)
    ctx.values.append(value)
    ctx.windows.append(window)
    if ctx.mode == "prefill":  # a sparsity policy is ANDed in by the attention passes
        out = prefill_attention(query, key, value, scale, model_window or None)
    elif ctx.mode == "chunk":  # the policy's window is part of the run-time mask here
        out = chunk_attention(query, key, value, ctx.k_pool, ctx.v_pool, ctx.page_table,
                              ctx.ctx_lens, int(module.layer_idx), scale, window)
    else:
        out = torch.ops.attnforge.paged_decode_attention(
            query[:, :, 0], key[:, :, 0], value[:, :, 0], ctx.k_pool, ctx.v_pool,
            ctx.page_table, ctx.ctx_lens, int(module.layer_idx), scale, window)[:, :, None]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`attnforge_attention` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attnforge_attention)
    return ATTN_IMPLEMENTATION
