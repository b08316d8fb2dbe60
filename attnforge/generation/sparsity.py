"""``compile_generator(sparsity=...)``: which ``attnforge.sparsity`` policies generation can run.

A policy must hold for *both* programs: the prefill's fused attention (where
``compiler._lower(..., sparsity=policy)`` ANDs it into every site, exactly as ``compile_model``
does) and the paged decode kernel, which supports one rule only: keys at positions
``> ctx_len - window`` (Hugging Face's sliding window, Mistral's). So the policies accepted are

* ``SlidingWindow(w)`` (causal): window ``w`` on every layer;
* ``Layers({i: SlidingWindow(w_i), ...})``: a window on the listed layers, dense elsewhere
  (pages are then kept for the dense layers: no page reclamation).

Anything else (block-sparse layouts, BigBird, Longformer's global tokens, ``MaskMod``,
``Dispatch``, non-causal windows, ``&`` / ``|``) raises ``InputError`` naming the policy: the
decode kernel cannot express it, and a prefill/decode mismatch would be a silent wrong answer.
Attention sinks (always-visible first tokens) are not in ``attnforge.sparsity`` and the decode
kernel has no sink pages, so they are not offered.
"""

from __future__ import annotations

from ..errors import InputError


def _window(policy, where: str) -> int:
    from ..sparsity import SlidingWindow

    if type(policy) is SlidingWindow and policy.causal:
        return int(policy.window)
    desc = policy.describe() if hasattr(policy, "describe") else repr(policy)
    raise InputError(
        f"compile_generator: sparsity policy {desc}{where} cannot run in the paged decode "
        "kernel, which supports only a causal sliding window; use attnforge.sparsity."
        "SlidingWindow(w) (optionally per layer with Layers / .on_layers), or compile_model "
        "for a single forward pass with this policy")


def policy_windows(policy) -> dict[int, int] | int:
    """The decode window the policy imposes: one int for every layer, or ``{layer: window}``
    (unlisted layers: none). Raises ``InputError`` for policies decode cannot run."""
    from ..sparsity import Layers

    if isinstance(policy, Layers):
        return {int(i): _window(p, f" (inside {policy.describe()}, layer {i})")
                for i, p in policy.per_layer.items()}
    return _window(policy, "")


def effective_window(model_window: int, windows, layer: int) -> int:
    """The tighter of the model's own window and the policy's (0 = none)."""
    w = windows.get(layer, 0) if isinstance(windows, dict) else int(windows or 0)
    return min(x for x in (model_window, w) if x) if (model_window or w) else 0
