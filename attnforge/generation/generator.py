"""``Generator``: greedy/sampled generation and a request API with continuous batching.

Each :meth:`Generator.step` first prefills every newly added request (one compiled prefill
per prompt, its K/V written into the paged cache, its first token chosen from the prefill
logits), then runs *one* compiled decode over all requests that were already running (a
batch bucket >= their count; padding rows have no pages and are ignored).  With
``prefill_chunk=C`` a prompt longer than ``C`` is prefilled ``C`` tokens per step instead
(each chunk attends to the pages already cached) and yields its first token with its last
chunk, so a long prompt does not stall the running requests' decode.  Requests finish
on ``eos_token_id`` or after ``max_new_tokens``; their pages go back to the pool at once and
their record stays until :meth:`remove` (or until :meth:`generate`/:meth:`stream` collect it).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .paged_kv import PagedKVCache
from .programs import ChunkProgram, DecodeProgram, PrefillProgram, compile_program
from .sampling import SamplingParams, choose_token
from .sparsity import policy_windows


@dataclass
class Request:
    id: int
    tokens: list[int]
    prompt_len: int
    max_new_tokens: int
    params: SamplingParams
    eos: frozenset
    rng: np.random.Generator
    state: str = "waiting"  # waiting -> running -> finished
    prefilled: int = 0  # prompt tokens already in the cache (chunked prefill)
    finish_reason: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class Generator:
    """Compiled prefill + paged decode for one Hugging Face causal LM (see
    :func:`attnforge.compile_generator`)."""

    def __init__(self, model, *, max_batch_size: int, max_seq_len: int, page_size: int = 16,
                 target="llvm", num_pages: int | None = None,
                 prefill_buckets: Sequence[int] | None = None,
                 decode_buckets: Sequence[int] | None = None, precision: str = "float32",
                 sparsity=None, int8_exclude=None, int8_options: dict | None = None,
                 prefill_chunk: int | None = None):
        from ..target import is_cuda, parse_target
        from .hf_attention import AttentionContext, attention_context, register

        self.target = parse_target(target)
        if is_cuda(self.target):
            raise InputError("compile_generator supports target='llvm' only: the paged decode "
                             "kernel is a CPU kernel (no CUDA version yet)")
        if max_batch_size < 1 or max_seq_len < 2 or page_size < 1:
            raise InputError(f"need max_batch_size >= 1, max_seq_len >= 2, page_size >= 1; got "
                             f"{max_batch_size}, {max_seq_len}, {page_size}")
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            raise InputError(f"compile_generator needs a float32 model, got {dtype}; call "
                             "model.float() first (other precisions are not supported yet)")
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit is not None and max_seq_len > limit:
            raise InputError(f"max_seq_len={max_seq_len} exceeds the model's "
                             f"max_position_embeddings={limit}")
        self.model = model.eval()
        self.sparsity = sparsity
        self._policy_windows = 0 if sparsity is None else policy_windows(sparsity)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_batch_size, self.max_seq_len, self.page_size = (max_batch_size, max_seq_len,
                                                                 page_size)
        # One eager forward on a tiny prompt: K/V shapes and the sliding windows the model
        # passes to its attention (e.g. Mistral's config.sliding_window).
        prev = cfg._attn_implementation
        cfg._attn_implementation = register()
        try:
            ctx = AttentionContext("prefill", policy_windows=self._policy_windows)
            with torch.no_grad(), attention_context(ctx):
                model.base_model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=False)
        finally:
            cfg._attn_implementation = prev
        self.num_layers = len(ctx.keys)
        if isinstance(self._policy_windows, dict) and max(self._policy_windows) >= self.num_layers:
            raise InputError(f"compile_generator: sparsity policy {sparsity.describe()} names "
                             f"layer {max(self._policy_windows)}; the model has "
                             f"{self.num_layers} layers")
        _, self.kv_heads, _, self.head_dim = ctx.keys[0].shape
        windows = set(ctx.windows)
        self.window = windows.pop() if len(windows) == 1 else 0  # mixed: keep every page
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        self.kv = PagedKVCache(num_layers=self.num_layers, kv_heads=self.kv_heads,
                               head_dim=self.head_dim, page_size=page_size,
                               num_pages=num_pages or max_batch_size * self._pages_per_seq(),
                               max_pages_per_seq=self.max_pages_per_seq, window=self.window)
        self.prefill_buckets = sorted(set(prefill_buckets or _buckets(max_seq_len, 64)))
        self.decode_buckets = sorted(set(decode_buckets or _buckets(max_batch_size, 1)))
        if self.prefill_buckets[-1] < max_seq_len:
            self.prefill_buckets.append(max_seq_len)
        if self.decode_buckets[-1] < max_batch_size:
            self.decode_buckets.append(max_batch_size)
        self.precision = precision
        self._compile_kw = dict(precision=precision, int8_exclude=int8_exclude,
                                int8_options=int8_options)
        if prefill_chunk is not None and not 1 <= prefill_chunk <= max_seq_len:
            raise InputError(f"prefill_chunk={prefill_chunk!r}: need 1 <= prefill_chunk <= "
                             f"max_seq_len={max_seq_len}")
        self.prefill_chunk = prefill_chunk
        self._chunk = None
        self._prefill: dict[int, object] = {}
        self._decode: dict[int, object] = {}
        self.compile_reports: dict[str, dict] = {}
        self.report: dict = {
            "precision": precision, "target": "llvm",
            "sparsity": None if sparsity is None else sparsity.describe(),
            "window": self.window, "kv_pool_bytes": self.kv.k.nbytes + self.kv.v.nbytes,
            "kv_dtype": str(self.kv.k.dtype).replace("torch.", ""),
            "programs": self.compile_reports}  # + "accuracy" (compile_generator(verify=True))
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        self.default_eos = eos

    def _pages_per_seq(self) -> int:
        if self.window:
            return min(self.max_pages_per_seq, -(-self.window // self.page_size) + 1)
        return self.max_pages_per_seq

    # -- compiled programs ---------------------------------------------------------------
    def _bucket(self, n: int, buckets: list[int]) -> int:
        return next(b for b in buckets if b >= n)

    def prefill_program(self, n: int):
        """The compiled prefill for prompts of up to ``n`` tokens (compiled on first use)."""
        nb = self._bucket(n, self.prefill_buckets)
        if nb not in self._prefill:
            ex = (torch.zeros(1, nb, dtype=torch.long), torch.arange(nb)[None],
                  torch.tensor([nb - 1]))
            cm, rep = compile_program(PrefillProgram(self.model, self._policy_windows), ex,
                                      self.target, sparsity=self.sparsity, **self._compile_kw)
            cm.run_flat(*ex)  # the VM's first call costs ~1 s (loading constants): pay it now
            self._prefill[nb], self.compile_reports[f"prefill_{nb}"] = cm, rep
        return nb, self._prefill[nb]

    def chunk_program(self):
        """The compiled chunked-prefill program (``prefill_chunk`` tokens over the cache)."""
        if self._chunk is None:
            c = self.prefill_chunk
            ex = (torch.zeros(1, c, dtype=torch.long), torch.arange(c)[None], self.kv.k,
                  self.kv.v, torch.zeros(1, self.max_pages_per_seq, dtype=torch.int32),
                  torch.zeros(1, dtype=torch.int32), torch.tensor([c - 1]))
            # no sparsity= here: the policy's window is part of the chunk's run-time mask
            cm, rep = compile_program(ChunkProgram(self.model, self._policy_windows), ex,
                                      self.target, **self._compile_kw)
            cm.run_flat(*ex)  # first call (see above); ctx_len 0: no cached key is read
            self._chunk, self.compile_reports[f"chunk_{c}"] = cm, rep
        return self._chunk

    def decode_program(self, batch: int):
        """The compiled decode for ``batch`` rows (bucketed; compiled on first use)."""
        bb = self._bucket(batch, self.decode_buckets)
        if bb not in self._decode:
            ex = (torch.zeros(bb, 1, dtype=torch.long), torch.zeros(bb, 1, dtype=torch.long),
                  self.kv.k, self.kv.v,
                  torch.zeros(bb, self.max_pages_per_seq, dtype=torch.int32),
                  torch.zeros(bb, dtype=torch.int32))
            cm, rep = compile_program(DecodeProgram(self.model, self._policy_windows), ex,
                                      self.target, **self._compile_kw)
            cm.run_flat(*ex)  # first call (see above); empty page tables: the pool is not read
            self._decode[bb], self.compile_reports[f"decode_{bb}"] = cm, rep
        return bb, self._decode[bb]

    def warmup(self, prompt_lens: Sequence[int] = (), batch_sizes: Sequence[int] = ()):
        """Compile the programs these prompt lengths / batch sizes will use."""
        for n in prompt_lens:
            self.prefill_program(n)
        for b in batch_sizes:
            self.decode_program(b)

    # -- request API ---------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return self.kv.free_pages

    @property
    def num_pages(self) -> int:
        return self.kv.num_pages

    def active(self) -> list[int]:
        return [r.id for r in self._requests.values() if r.state != "finished"]

    def add(self, prompt_ids, max_new_tokens: int = 16, *, do_sample: bool = False,
            temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            eos_token_id=..., seed: int | None = None) -> int:
        """Admit a request; its prefill runs on the next :meth:`step`. Returns its id.

        Raises ``InputError`` (a ``ValueError``) for an empty prompt, token ids outside
        ``[0, vocab_size)``, ``max_new_tokens <= 0``, prompt + new tokens over ``max_seq_len``,
        a full batch (``max_batch_size`` unfinished requests) or a full KV cache; the
        generator's state is unchanged then."""
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            if prompt_ids.dim() != 1:
                raise InputError(f"prompt_ids must be 1-D (one prompt), got shape "
                                 f"{tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        tokens = [int(t) for t in prompt_ids]
        if not tokens:
            raise InputError("prompt_ids is empty: a request needs at least one token")
        bad = [(i, t) for i, t in enumerate(tokens) if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"prompt_ids has token ids outside [0, {self.vocab_size}) "
                             f"(vocab_size): {bad[:5]} (position, id)")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if len(tokens) + max_new_tokens > self.max_seq_len:
            raise InputError(f"prompt of {len(tokens)} tokens + max_new_tokens={max_new_tokens} "
                             f"exceeds max_seq_len={self.max_seq_len}; shorten the prompt, "
                             "lower max_new_tokens or compile with a larger max_seq_len")
        if len(self.active()) >= self.max_batch_size:
            raise InputError(f"batch full: {self.max_batch_size} requests are active "
                             "(max_batch_size); step() until one finishes, or remove() one")
        params = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        params.check()
        eos = self.default_eos if eos_token_id is ... else eos_token_id
        eos_set = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else eos))
        rid = next(self._ids)
        self.kv.add_sequence(rid, len(tokens) + max_new_tokens)  # may raise: KV cache full
        self._requests[rid] = Request(rid, tokens, len(tokens), max_new_tokens, params,
                                      eos_set, np.random.default_rng(seed))
        return rid

    def fork(self, rid: int, max_new_tokens: int | None = None, **sampling) -> int:
        """A new request continuing from running request ``rid``'s tokens, sharing its
        cached pages (the prefix is not recomputed)."""
        parent = self._get(rid)
        if parent.state != "running":
            raise InputError(f"request {rid} is {parent.state}: only running requests fork")
        if len(self.active()) >= self.max_batch_size:
            raise InputError("batch full: cannot fork")
        new = max_new_tokens or parent.max_new_tokens - len(parent.generated)
        if len(parent.tokens) + new > self.max_seq_len:
            raise InputError("fork: tokens + max_new_tokens exceed max_seq_len")
        child = next(self._ids)
        self.kv.fork(rid, child, len(parent.tokens) + new)
        params = SamplingParams(**{**parent.params.__dict__, **sampling})
        params.check()
        self._requests[child] = Request(child, list(parent.tokens), len(parent.tokens), new,
                                        params, parent.eos, np.random.default_rng(params.seed),
                                        state="running")
        return child

    def _get(self, rid: int) -> Request:
        if rid not in self._requests:
            raise InputError(f"unknown request id {rid}")
        return self._requests[rid]

    def remove(self, rid: int) -> list[int]:
        """Forget request ``rid`` (cancelling it if unfinished), freeing its pages; returns its
        tokens (prompt + generated)."""
        req = self._get(rid)
        if req.state != "finished":
            self.kv.remove_sequence(rid)
        del self._requests[rid]
        return req.tokens

    def result(self, rid: int) -> Request:
        return self._get(rid)

    def _finish_if_done(self, req: Request, tok: int) -> None:
        if tok in req.eos or len(req.generated) >= req.max_new_tokens:
            req.state = "finished"
            req.finish_reason = "eos" if tok in req.eos else "length"
            self.kv.remove_sequence(req.id)

    def step(self) -> dict[int, int]:
        """Prefill new requests and decode running ones by one token each (continuous
        batching). Returns ``{request id: new token}``."""
        out: dict[int, int] = {}
        running = [r for r in self._requests.values() if r.state == "running"]
        if running:
            out.update(self._decode_step(running))
        for req in [r for r in self._requests.values() if r.state == "waiting"]:
            if self.prefill_chunk and len(req.tokens) > self.prefill_chunk:
                tok = self._prefill_chunk(req)  # one chunk per step; a token after the last
                if tok is not None:
                    out[req.id] = tok
            else:
                out[req.id] = self._prefill_one(req)
        return out

    def _prefill_chunk(self, req: Request) -> int | None:
        t0 = time.perf_counter()
        req.timings.setdefault("prefill_start", t0)
        c, n0, n = self.prefill_chunk, req.prefilled, len(req.tokens)
        n1 = min(n0 + c, n)
        cm = self.chunk_program()
        ids, pos = torch.zeros(1, c, dtype=torch.long), torch.full((1, c), n0, dtype=torch.long)
        ids.numpy()[0, :n1 - n0] = req.tokens[n0:n1]
        pos.numpy()[0, :n1 - n0] = np.arange(n0, n1)  # padding rows: any valid position
        table = torch.zeros(1, self.max_pages_per_seq, dtype=torch.int32)
        row = self.kv.tables[req.id]
        table.numpy()[0, :len(row)] = np.maximum(row, 0) if row else []
        lens = torch.tensor([n0], dtype=torch.int32)
        logits, k, v = cm.run_flat(ids, pos, self.kv.k, self.kv.v, table, lens,
                                   torch.tensor([n1 - n0 - 1]))
        self.kv.write(req.id, np.asarray(k)[:, 0, :, :n1 - n0], np.asarray(v)[:, 0, :, :n1 - n0],
                      n0)
        req.prefilled = n1
        if n1 < n:
            return None
        tok = choose_token(np.asarray(logits)[0], req.params, req.rng)
        req.tokens.append(tok)
        req.state = "running"
        req.timings["ttft_s"] = time.perf_counter() - req.timings.pop("prefill_start")
        self._finish_if_done(req, tok)
        return tok

    def _prefill_one(self, req: Request) -> int:
        t0 = time.perf_counter()
        n = len(req.tokens)
        nb, cm = self.prefill_program(n)
        ids = torch.zeros(1, nb, dtype=torch.long)
        ids[0, :n] = torch.tensor(req.tokens)
        logits, k, v = cm.run_flat(ids, torch.arange(nb)[None], torch.tensor([n - 1]))
        self.kv.write(req.id, np.asarray(k)[:, 0, :, :n], np.asarray(v)[:, 0, :, :n], 0)
        tok = choose_token(np.asarray(logits)[0], req.params, req.rng)
        req.tokens.append(tok)
        req.state = "running"
        req.timings["ttft_s"] = time.perf_counter() - t0
        self._finish_if_done(req, tok)
        return tok

    def _decode_step(self, reqs: list[Request]) -> dict[int, int]:
        bb, cm = self.decode_program(len(reqs))
        # Inputs filled through numpy views (no torch kernels on the hot path: see
        # PagedKVCache.__init__ on torch's thread pool); torch allocates them 64-byte aligned,
        # as TVM's DLPack import requires.
        t_ids, t_pos = torch.zeros(bb, 1, dtype=torch.long), torch.zeros(bb, 1, dtype=torch.long)
        t_table = torch.zeros(bb, self.max_pages_per_seq, dtype=torch.int32)
        t_lens = torch.zeros(bb, dtype=torch.int32)
        ids, pos, table, lens = t_ids.numpy(), t_pos.numpy(), t_table.numpy(), t_lens.numpy()
        for i, r in enumerate(reqs):
            n = self.kv.lengths[r.id]
            ids[i, 0], pos[i, 0], lens[i] = r.tokens[-1], n, n
            row = self.kv.tables[r.id]
            table[i, :len(row)] = row
        np.maximum(table, 0, out=table)  # -1 (pages out of a sliding window): never read
        logits, k, v = cm.run_flat(t_ids, t_pos, self.kv.k, self.kv.v, t_table, t_lens)
        m = len(reqs)
        self.kv.write_rows([r.id for r in reqs], np.asarray(k)[:, :m, :, 0],
                           np.asarray(v)[:, :m, :, 0])
        logits = np.asarray(logits)
        out = {}
        for i, r in enumerate(reqs):
            tok = choose_token(logits[i], r.params, r.rng)
            r.tokens.append(tok)
            out[r.id] = tok
            self._finish_if_done(r, tok)
        return out

    # -- convenience ---------------------------------------------------------------------
    def stream(self, input_ids, max_new_tokens: int, **kwargs) -> Iterator[int]:
        """Generate for one prompt, yielding each new token as it is produced."""
        rid = self.add(input_ids, max_new_tokens, **kwargs)
        try:
            while True:
                if self._requests[rid].state == "finished":
                    return
                produced = self.step()
                if rid in produced:
                    yield produced[rid]
        finally:
            if rid in self._requests:
                self.remove(rid)

    def generate(self, input_ids, max_new_tokens: int, **kwargs):
        """Generate for a batch of prompts (a ``[B, N]`` tensor or a list of token lists of
        any lengths), as many at once as ``max_batch_size`` allows. Returns the same kind:
        a tensor ``[B, N + new]`` (finished rows padded with the eos id, as Hugging Face
        does) or a list of token lists (prompt + generated)."""
        as_tensor = isinstance(input_ids, torch.Tensor)
        if as_tensor and input_ids.dim() == 1:
            input_ids = input_ids[None]
        prompts = [list(map(int, p)) for p in (input_ids.tolist() if as_tensor else input_ids)]
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        pending = list(enumerate(prompts))
        ids: dict[int, int] = {}
        results: dict[int, list[int]] = {}
        try:
            while pending or ids:
                while pending and len(self.active()) < self.max_batch_size:
                    i, p = pending.pop(0)
                    ids[self.add(p, max_new_tokens, **kwargs)] = i
                self.step()
                for rid in [r for r in ids if self._requests[r].state == "finished"]:
                    results[ids.pop(rid)] = self.remove(rid)
        finally:
            for rid in ids:
                self.remove(rid)
        out = [results[i] for i in range(len(prompts))]
        if not as_tensor:
            return out
        width = max(len(t) for t in out)
        eos = kwargs.get("eos_token_id", self.default_eos)
        pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
        return torch.tensor([t + [pad] * (width - len(t)) for t in out], dtype=torch.long)
