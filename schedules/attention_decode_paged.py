"""Decode attention over a paged KV cache for the ``llvm`` (CPU) target.

One query row per sequence (the token being generated) attends to its cached keys, which live
in fixed-size pages of a pool shared by all sequences, plus its own new key (not yet in the
pool).  Layouts (chosen for this kernel; the generator owns the pool):

* ``K_pool[L, P, KVH, D, S]``: keys *transposed inside a page*, so that 16 keys of one page and
  one feature ``d`` are one contiguous vector (``S = page_size`` lanes);
* ``V_pool[L, P, KVH, S, D]``: values row-major (lanes over ``D``);
* ``page_table[B, max_pages]`` int32 (page ids of each sequence, in position order; entries of
  pages outside the sliding window may be stale: they are never read), ``ctx_lens[B]`` int32
  (cached tokens; the new token sits at position ``ctx_lens[b]``);
* ``layer`` is a scalar argument (a ``R.prim_value`` in ``call_tir``'s args), so every layer shares
  one kernel and the pool is never sliced or copied.

Algorithm (flash-decoding): one ``T.parallel`` task per (sequence, kv head, split).  A task
walks its share of the sequence's pages; for each page it computes the ``G x S`` score tile of
the ``G = H / KVH`` query heads of its group (GQA: every K/V row is read once per group, not
once per query head), masks positions outside ``[lo, ctx_len)`` (``lo`` = sliding-window
start), and runs the online softmax in the log2 domain with the vectorised polynomial ``exp2``
(:mod:`.attention_cpu_exp`).  The last split also takes the new token's key/value.  Partial
``(max, sum, acc)`` per split are merged in a second parallel loop.  Splitting one sequence
over several tasks keeps all cores busy at batch 1.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from .attention_cpu_exp import exp2_poly

__all__ = ["paged_decode_attention_cpu", "default_num_splits"]

_LOG2E = 1.4426950408889634


def default_num_splits(batch: int, kv_heads: int, max_pages: int, threads: int) -> int:
    """Splits per (sequence, kv head) so that every thread gets a task (more splits only add
    merge work: at batch 1 with 2 threads and 2 kv heads, 2 splits made the kernel 20x slower
    than 1 on this machine)."""
    return max(1, min(max_pages, -(-threads // (batch * kv_heads))))


def paged_decode_attention_cpu(*, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                               num_layers: int, num_pages: int, page_size: int, max_pages: int,
                               scale: float, window: int = 0, num_splits: int = 1,
                               dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc ``(Q[B,H,D], K_new[B,KVH,D], V_new[B,KVH,D], K_pool, V_pool, page_table,
    ctx_lens, layer, O[B,H,D])``; ``window`` 0 = full causal, else keys with
    ``pos > ctx_len - window`` (Hugging Face's sliding-window rule)."""
    if dtype != "float32":
        raise ValueError(f"paged decode attention: dtype {dtype!r} is not supported (float32)")
    if q_heads % kv_heads:
        raise ValueError(f"paged decode attention: q_heads={q_heads} is not a multiple of "
                         f"kv_heads={kv_heads}")
    B, H, KVH, D, L, P, S, MP = (batch, q_heads, kv_heads, head_dim, num_layers, num_pages,
                                 page_size, max_pages)
    G, NC, W = H // KVH, num_splits, int(window)
    f32 = "float32"
    qmul = float(scale) * _LOG2E
    neg_inf = tirx.const(-math.inf, f32)
    zero = tirx.const(0.0, f32)

    @T.prim_func(private=True)
    def func(Q: T.Buffer((B, H, D), f32), KN: T.Buffer((B, KVH, D), f32),
             VN: T.Buffer((B, KVH, D), f32), KP: T.Buffer((L, P, KVH, D, S), f32),
             VP: T.Buffer((L, P, KVH, S, D), f32), PT: T.Buffer((B, MP), "int32"),
             CL: T.Buffer((B,), "int32"), layer: T.int64, O: T.Buffer((B, H, D), f32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "attnforge.kernel": "paged_decode_attention_cpu"})
        Mp = T.alloc_buffer((B, KVH, NC, G), f32)
        Lp = T.alloc_buffer((B, KVH, NC, G), f32)
        Op = T.alloc_buffer((B, KVH, NC, G, D), f32)
        for task in T.parallel(B * KVH * NC):
            # "global" scope: small ones become stack arrays LLVM keeps in registers
            # (docs/tvm_notes.md); "local" would be a heap workspace per task.
            qs = T.alloc_buffer((G, D), f32, scope="global")
            sc = T.alloc_buffer((G, S), f32, scope="global")
            acc = T.alloc_buffer((G, D), f32, scope="global")
            m = T.alloc_buffer((G,), f32, scope="global")
            mu = T.alloc_buffer((G,), f32, scope="global")
            lsum = T.alloc_buffer((G,), f32, scope="global")
            alpha = T.alloc_buffer((G,), f32, scope="global")
            b = T.bind(task // (KVH * NC))
            g = T.bind(task // NC % KVH)
            c = T.bind(task % NC)
            n = T.bind(CL[b])
            lo = T.bind(T.max(n + 1 - W, 0) if W > 0 else 0)
            p0 = T.bind(lo // S)
            p1 = T.bind((n + S - 1) // S)
            per = T.bind((p1 - p0 + NC - 1) // NC)
            c0 = T.bind(T.min(p0 + c * per, p1))
            c1 = T.bind(T.min(c0 + per, p1))
            for r in range(G):
                for d in T.vectorized(D):
                    qs[r, d] = Q[b, g * G + r, d] * T.float32(qmul)
                    acc[r, d] = zero
                m[r] = neg_inf
                lsum[r] = zero
            for pj in range(c1 - c0):
                pos0 = T.bind((c0 + pj) * S)
                pg = T.bind(PT[b, c0 + pj])
                for r in range(G):
                    for kk in T.vectorized(S):
                        sc[r, kk] = zero
                for d in range(D):
                    for r in T.unroll(G):
                        for kk in T.vectorized(S):
                            sc[r, kk] = sc[r, kk] + qs[r, d] * KP[layer, pg, g, d, kk]
                for r in range(G):
                    for kk in T.vectorized(S):
                        sc[r, kk] = T.Select(pos0 + kk >= lo and pos0 + kk < n, sc[r, kk],
                                             neg_inf)
                    mu[r] = m[r]
                    for kk in range(S):
                        mu[r] = T.max(mu[r], sc[r, kk])
                    alpha[r] = exp2_poly(m[r] - mu[r])  # every page holds a visible key
                    m[r] = mu[r]
                    lsum[r] = lsum[r] * alpha[r]
                    for kk in T.vectorized(S):
                        sc[r, kk] = exp2_poly(sc[r, kk] - mu[r])
                    for kk in range(S):
                        lsum[r] = lsum[r] + sc[r, kk]
                    for d in T.vectorized(D):
                        acc[r, d] = acc[r, d] * alpha[r]
                for kk in range(S):
                    for r in T.unroll(G):
                        for d in T.vectorized(D):
                            acc[r, d] = acc[r, d] + sc[r, kk] * VP[layer, pg, g, kk, d]
            if c == NC - 1:  # the new token's own key/value
                for r in range(G):
                    mu[r] = zero
                    for d in range(D):
                        mu[r] = mu[r] + qs[r, d] * KN[b, g, d]
                    alpha[r] = T.max(m[r], mu[r])
                    sc[r, 0] = exp2_poly(m[r] - alpha[r])
                    sc[r, 1] = exp2_poly(mu[r] - alpha[r])
                    m[r] = alpha[r]
                    lsum[r] = lsum[r] * sc[r, 0] + sc[r, 1]
                    for d in T.vectorized(D):
                        acc[r, d] = acc[r, d] * sc[r, 0] + sc[r, 1] * VN[b, g, d]
            for r in range(G):
                Mp[b, g, c, r] = m[r]
                Lp[b, g, c, r] = lsum[r]
                for d in T.vectorized(D):
                    Op[b, g, c, r, d] = acc[r, d]
        for t in T.parallel(B * H):
            mx = T.alloc_buffer((1,), f32, scope="global")
            tot = T.alloc_buffer((1,), f32, scope="global")
            wt = T.alloc_buffer((1,), f32, scope="global")
            ob = T.alloc_buffer((D,), f32, scope="global")
            bb = T.bind(t // H)
            gg = T.bind(t % H // G)
            rr = T.bind(t % G)
            mx[0] = neg_inf
            for cc in range(NC):
                mx[0] = T.max(mx[0], Mp[bb, gg, cc, rr])
            tot[0] = zero
            for d in T.vectorized(D):
                ob[d] = zero
            for cc in range(NC):
                wt[0] = exp2_poly(Mp[bb, gg, cc, rr] - mx[0])
                tot[0] = tot[0] + wt[0] * Lp[bb, gg, cc, rr]
                for d in T.vectorized(D):
                    ob[d] = ob[d] + wt[0] * Op[bb, gg, cc, rr, d]
            for d in T.vectorized(D):
                O[bb, t % H, d] = ob[d] / tot[0]

    return func
