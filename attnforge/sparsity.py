"""Sparsity policies: attention masks a user imposes on a model at compile time.

Each policy turns into a :class:`~attnforge.schedules.block_mask.MaskSpec` for a site's shape
(structured when it can be, else a static bool ``[Hm, Nq, Nk]`` layout) that the fused kernel
consumes and skips blocks with.  ``passes.InsertSparsity(policy)`` ANDs it with each site's own
mask (a causal model stays causal).  Positions: ``SlidingWindow``, ``BlockLocal`` and
``Longformer`` align the last query with the last key (``q_offset = kv_len - q_len``; 0 for
self-attention); ``BlockSparse``, ``BigBird`` and ``MaskMod`` use raw indices, as FlexAttention.

>>> policy = SlidingWindow(256) | BigBird(64, 3, 2, 3)          # union
>>> policy = Layers({0: SlidingWindow(128)})                    # layer 0 only
>>> policy = BlockLocal(512).on_layers([0, 2])                  # local / global alternate
>>> policy = MaskMod(lambda b, h, q, k: (q - k).abs() < 64)     # FlexAttention-style
>>> policy = Dispatch(512, long=SlidingWindow(256))  # dense below 512 keys, window above

``evaluate(model, policy, inputs)`` measures what a policy does to a model's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from .passes.insert_sparsity import intersect_specs, simplify_static
from .schedules.block_mask import MaskSpec

__all__ = ["And", "BigBird", "BlockLocal", "BlockSparse", "Dispatch", "Layers", "Longformer",
           "MaskMod",
           "Or", "Policy", "SlidingWindow", "and_masks", "evaluate", "or_masks"]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Policy:
    """Base class: ``mask_spec``/``describe`` (the protocol ``InsertSparsity`` uses), ``&``,
    ``|``, ``on_layers`` and ``dense`` (the policy's bool mask, for checks and references)."""

    layer_indices: set | None = None  # layers a per-layer policy names (None: every layer)

    def mask_spec(self, q_len: int, kv_len: int, num_heads: int = 1,
                  layer: int = 0) -> MaskSpec | None:
        """The mask for one site (None: leave the site alone)."""
        q_len, kv_len = _positive_int("q_len", q_len), _positive_int("kv_len", kv_len)
        return self._spec(q_len, kv_len, _positive_int("num_heads", num_heads),
                          _positive_int("layer", layer, 0))

    def _spec(self, q_len, kv_len, num_heads, layer) -> MaskSpec | None:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.describe()

    def dense(self, q_len: int, kv_len: int, num_heads: int = 1, layer: int = 0) -> np.ndarray:
        """Bool ``[Hm, q_len, kv_len]`` (all True where the policy leaves the site alone)."""
        spec = self.mask_spec(q_len, kv_len, num_heads, layer)
        return MaskSpec.full().dense(q_len, kv_len) if spec is None else spec.dense(q_len, kv_len)

    def __and__(self, other: Policy) -> Policy:
        return And(self, other)

    def __or__(self, other: Policy) -> Policy:
        return Or(self, other)

    def on_layers(self, layers: Iterable[int]) -> Layers:
        """This policy on ``layers`` only (site index in program order), others unchanged."""
        return Layers({int(i): self for i in layers})


class SlidingWindow(Policy):
    """Each query sees ``window`` keys: ``q - window < k <= q`` (``causal=True``), or the
    centred band ``|q - k| <= window // 2`` (``causal=False``)."""

    def __init__(self, window: int, causal: bool = True):
        self.window, self.causal = _positive_int("window", window), bool(causal)

    def _spec(self, q_len, kv_len, num_heads, layer):
        off = kv_len - q_len
        if self.causal:
            return MaskSpec.sliding_window(self.window - 1, 0, q_offset=off)
        half = self.window // 2
        return MaskSpec.sliding_window(half, half, q_offset=off)

    def describe(self):
        return f"SlidingWindow({self.window}{', causal' if self.causal else ''})"


class BlockLocal(Policy):
    """Tokens attend within their own block of ``block_size`` positions (chunked attention)."""

    def __init__(self, block_size: int):
        self.block_size = _positive_int("block_size", block_size)

    def _spec(self, q_len, kv_len, num_heads, layer):
        return MaskSpec.chunked(self.block_size, q_offset=kv_len - q_len)

    def describe(self):
        return f"BlockLocal({self.block_size})"


def _expand_layout(layout: np.ndarray, bs: int, q_len: int, kv_len: int) -> np.ndarray:
    """Block layout ``[Hm, nqb, nkb]`` -> element mask ``[Hm, q_len, kv_len]``."""
    return np.repeat(np.repeat(layout, bs, axis=1), bs, axis=2)[:, :q_len, :kv_len]


class BlockSparse(Policy):
    """A bool block layout ``[nqb, nkb]`` (or per head ``[H, nqb, nkb]``): query block ``i``
    sees key block ``j`` iff ``layout[.., i, j]``; ``nqb = ceil(q_len / block_size)``."""

    def __init__(self, layout, block_size: int):
        self.block_size = _positive_int("block_size", block_size)
        arr = np.asarray(layout)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise ValueError(f"layout must be a non-empty [nqb, nkb] or [H, nqb, nkb] array, got "
                             f"shape {arr.shape}")
        if arr.dtype != np.bool_ and not np.isin(arr, (0, 1)).all():
            raise ValueError("layout must be boolean (or 0/1)")
        self.layout = np.ascontiguousarray(arr.astype(bool).reshape((-1,) + arr.shape[-2:]))

    def _spec(self, q_len, kv_len, num_heads, layer):
        bs, lay = self.block_size, self.layout
        want = (-(-q_len // bs), -(-kv_len // bs))
        if lay.shape[1:] != want:
            raise ValueError(f"layout has {lay.shape[1:]} blocks, but q_len={q_len}, "
                             f"kv_len={kv_len} with block_size={bs} need {want}")
        if lay.shape[0] not in (1, num_heads):
            raise ValueError(f"layout has {lay.shape[0]} heads; the site has {num_heads}")
        return simplify_static(_expand_layout(lay, bs, q_len, kv_len))

    def describe(self):
        return f"BlockSparse({'x'.join(map(str, self.layout.shape))}, {self.block_size})"


class BigBird(Policy):
    """BigBird (ITC): in blocks of ``block_size``, a window of ``num_window_blocks`` (odd,
    centred), the first ``num_global_blocks`` blocks as global rows and columns, and
    ``num_random_blocks`` random key blocks per other query block, drawn from ``seed`` and the
    layer index at compile time (reproducible).  The lengths must be multiples of
    ``block_size``."""

    def __init__(self, block_size: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
                 num_random_blocks: int = 3, seed: int = 0):
        self.block_size = _positive_int("block_size", block_size)
        self.num_window_blocks = _positive_int("num_window_blocks", num_window_blocks)
        if self.num_window_blocks % 2 == 0:
            raise ValueError(f"num_window_blocks must be odd (a centred window), got "
                             f"{num_window_blocks}")
        self.num_global_blocks = _positive_int("num_global_blocks", num_global_blocks, 0)
        self.num_random_blocks = _positive_int("num_random_blocks", num_random_blocks, 0)
        self.seed = _positive_int("seed", seed, 0)

    def random_blocks(self, nqb: int, nkb: int, layer: int = 0) -> list[np.ndarray]:
        """The random key blocks of each query block (empty for global rows)."""
        rng = np.random.default_rng([self.seed, layer])
        g, half = self.num_global_blocks, self.num_window_blocks // 2
        out = []
        for i in range(nqb):
            cand = [j for j in range(g, nkb) if abs(i - j) > half]
            n = min(self.num_random_blocks, len(cand)) if i >= g else 0
            out.append(np.sort(rng.choice(cand, size=n, replace=False)) if n else
                       np.zeros(0, dtype=np.int64))
        return out

    def layout(self, nqb: int, nkb: int, layer: int = 0) -> np.ndarray:
        """Bool block layout ``[nqb, nkb]``."""
        if self.num_global_blocks > min(nqb, nkb):
            raise ValueError(f"num_global_blocks={self.num_global_blocks} exceeds the "
                             f"{min(nqb, nkb)} blocks of the sequence")
        i, j = np.arange(nqb)[:, None], np.arange(nkb)[None, :]
        g = self.num_global_blocks
        lay = (np.abs(i - j) <= self.num_window_blocks // 2) | (i < g) | (j < g)
        for qb, ks in enumerate(self.random_blocks(nqb, nkb, layer)):
            lay[qb, ks] = True
        return lay

    def _spec(self, q_len, kv_len, num_heads, layer):
        bs = self.block_size
        if q_len % bs or kv_len % bs:
            raise ValueError(f"block_size={bs} must divide q_len={q_len} and kv_len={kv_len}")
        lay = self.layout(q_len // bs, kv_len // bs, layer)
        return simplify_static(_expand_layout(lay[None], bs, q_len, kv_len))

    def describe(self):
        return (f"BigBird({self.block_size}, window={self.num_window_blocks}, "
                f"global={self.num_global_blocks}, random={self.num_random_blocks}, "
                f"seed={self.seed})")


class Longformer(Policy):
    """Longformer: a centred window ``|q - k| <= window // 2`` plus global tokens (the first
    ``global_tokens`` positions, or the listed indices) that see, and are seen by, everyone."""

    def __init__(self, window: int, global_tokens: int | Sequence[int] = 0):
        self.window = _positive_int("window", window, 2)
        if self.window % 2:
            raise ValueError(f"window must be even (window // 2 on each side), got {window}")
        if isinstance(global_tokens, (int, np.integer)):
            n = _positive_int("global_tokens", global_tokens, 0)
            self.global_tokens = np.arange(n)
        else:
            self.global_tokens = np.unique(np.asarray(list(global_tokens), dtype=np.int64))
            if self.global_tokens.size and self.global_tokens[0] < 0:
                raise ValueError("global_tokens must be non-negative indices")

    def _spec(self, q_len, kv_len, num_heads, layer):
        gt = self.global_tokens
        if gt.size and gt[-1] >= kv_len:
            raise ValueError(f"global_tokens index {int(gt[-1])} is beyond kv_len={kv_len}")
        half = self.window // 2
        off = kv_len - q_len
        keep = MaskSpec.sliding_window(half, half, q_offset=off).dense(q_len, kv_len).copy()
        keep[0][:, gt] = True
        rows = gt - off
        keep[0][rows[(rows >= 0) & (rows < q_len)], :] = True
        return simplify_static(keep)

    def describe(self):
        return f"Longformer({self.window}, global_tokens={self.global_tokens.size})"


class MaskMod(Policy):
    """FlexAttention-style ``fn(b, h, q_idx, kv_idx) -> bool tensor`` in PyTorch ops, evaluated
    once at compile time on broadcast index tensors (``b`` is 0, ``h`` ``[1,H,1,1]``, ``q_idx``
    ``[1,1,Nq,1]``, ``kv_idx`` ``[1,1,1,Nk]``).  Python ``if``/``and``/``or`` on the indices,
    ``.item()`` and other data-dependent code cannot be evaluated that way: use ``&``, ``|``,
    ``torch.where``."""

    def __init__(self, fn: Callable, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"mask_mod must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "mask_mod")

    def _spec(self, q_len, kv_len, num_heads, layer):
        import torch

        idx = [torch.zeros((1, 1, 1, 1), dtype=torch.int64),
               torch.arange(num_heads).view(1, num_heads, 1, 1),
               torch.arange(q_len).view(1, 1, q_len, 1), torch.arange(kv_len).view(1, 1, 1, kv_len)]
        try:
            with torch.no_grad():
                out = self.fn(*idx)
        except Exception as e:  # any failure of user code is reported the same way
            raise ValueError(
                f"mask_mod {self.name!r} could not be evaluated on broadcast index tensors "
                f"({type(e).__name__}: {e}); it must be built from element-wise tensor ops "
                "(&, |, ~, comparisons, torch.where), not data-dependent Python control flow"
            ) from e
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            what = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"mask_mod {self.name!r} must return a bool tensor, got {what}")
        try:
            out = torch.broadcast_to(out, (1, num_heads, q_len, kv_len))
        except RuntimeError as e:
            raise ValueError(f"mask_mod {self.name!r} returned shape {tuple(out.shape)}, not "
                             f"broadcastable to [1, {num_heads}, {q_len}, {kv_len}]") from e
        return simplify_static(out[0].numpy())

    def describe(self):
        return f"MaskMod({self.name})"


def _spec_or_full(p: Policy, args) -> MaskSpec:
    spec = p.mask_spec(*args)
    return MaskSpec.full() if spec is None else spec


class _Combine(Policy):
    def __init__(self, *policies: Policy):
        if len(policies) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two policies")
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"{type(self).__name__}: {p!r} is not a sparsity policy")
        self.policies = policies
        sets = [p.layer_indices for p in policies if p.layer_indices is not None]
        self.layer_indices = set().union(*sets) if sets else None

    def describe(self):
        op = " & " if isinstance(self, And) else " | "
        return "(" + op.join(p.describe() for p in self.policies) + ")"


class And(_Combine):
    """Allowed where every policy allows (a policy leaving the site alone allows all)."""

    def _spec(self, q_len, kv_len, num_heads, layer):
        specs = [p.mask_spec(q_len, kv_len, num_heads, layer) for p in self.policies]
        specs = [s for s in specs if s is not None]
        if not specs:
            return None
        out = specs[0]
        for s in specs[1:]:
            out = intersect_specs(out, s, q_len, kv_len)
        return out


class Or(_Combine):
    """Allowed where any policy allows (a policy leaving the site alone makes it full)."""

    def _spec(self, q_len, kv_len, num_heads, layer):
        args = (q_len, kv_len, num_heads, layer)
        specs = [_spec_or_full(p, args) for p in self.policies]
        if any(s.kind == "full" for s in specs):
            return None
        keep = specs[0].dense(q_len, kv_len)
        for s in specs[1:]:
            keep = keep | s.dense(q_len, kv_len)
        return simplify_static(keep)


def and_masks(*policies: Policy) -> Policy:
    """FlexAttention's ``and_masks`` for policies."""
    return And(*policies)


def or_masks(*policies: Policy) -> Policy:
    """FlexAttention's ``or_masks`` for policies."""
    return Or(*policies)


class Layers(Policy):
    """Per-layer policies ``{layer: policy}`` (site index in program order); other layers are
    left alone.  E.g. GPT-Neo / Gemma alternate local and global attention."""

    def __init__(self, per_layer: Mapping[int, Policy]):
        if not isinstance(per_layer, Mapping) or not per_layer:
            raise ValueError("Layers needs a non-empty {layer index: policy} mapping")
        self.per_layer = {}
        for k, p in per_layer.items():
            self.per_layer[_positive_int("layer index", k, 0)] = p
            if not isinstance(p, Policy):
                raise TypeError(f"Layers: the value for layer {k} is not a policy: {p!r}")
        self.layer_indices = set(self.per_layer)

    def _spec(self, q_len, kv_len, num_heads, layer):
        p = self.per_layer.get(layer)
        return None if p is None else p.mask_spec(q_len, kv_len, num_heads, layer)

    def describe(self):
        return "Layers({" + ", ".join(f"{k}: {p.describe()}"
                                      for k, p in sorted(self.per_layer.items())) + "})"


class Dispatch(Policy):
    """Length-based dispatch: ``short`` below ``threshold`` keys (None: the model's own mask,
    dense), ``long`` at or above it.  Compiled with ``dynamic_shapes=`` (a symbolic sequence
    length) it is ONE kernel that chooses at run time, also after ``cm.export`` /
    ``attnforge.load``; both sides must be structured (``SlidingWindow``, ``BlockLocal``, their
    ``&``), since static layouts (``BigBird``, ``BlockSparse``, ...) need a known length.
    With static shapes the side is picked at compile time (the report says so)."""

    def __init__(self, threshold: int = 512, short: Policy | None = None,
                 long: Policy | None = None):
        self.dispatch_threshold = _positive_int("threshold", threshold)
        long = SlidingWindow(256) if long is None else long
        for name, p in (("short", short), ("long", long)):
            if p is not None and not isinstance(p, Policy):
                raise TypeError(f"Dispatch: {name}={p!r} is not a sparsity policy")
            if isinstance(p, Dispatch):
                raise TypeError(f"Dispatch: {name} cannot itself be a Dispatch")
        self.short_policy, self.long_policy = short, long

    def _spec(self, q_len, kv_len, num_heads, layer):
        side = self.long_policy if kv_len >= self.dispatch_threshold else self.short_policy
        return None if side is None else side.mask_spec(q_len, kv_len, num_heads, layer)

    def describe(self):
        short = "model's own mask" if self.short_policy is None else self.short_policy.describe()
        return (f"Dispatch(threshold={self.dispatch_threshold}, short={short}, "
                f"long={self.long_policy.describe()})")


def evaluate(model, policy: Policy, inputs, **kwargs) -> dict:
    """Error of ``model`` compiled with ``policy`` against the dense eager model
    (:func:`attnforge.sparsity_eval.evaluate`)."""
    from .sparsity_eval import evaluate as _evaluate

    return _evaluate(model, policy, inputs, **kwargs)
