"""Built-in tiny model specs: real Hugging Face architectures built from configs.

Weights are random (seeded), nothing is downloaded.  Used by the CLI (`attnforge compile gpt2`),
the demo, the tests and the benchmarks.  ``load_model_spec("pkg.module:factory")`` imports a
user factory returning ``(model, example_inputs)`` instead.
"""

from __future__ import annotations

import importlib
from typing import Callable

BUILTIN_MODELS = ("gpt2", "llama", "mistral", "bert", "vit")


def build_hf_model(
    name: str,
    *,
    batch: int = 1,
    seq_len: int = 64,
    attn_implementation: str = "sdpa",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab: int = 1000,
    sliding_window: int = 32,
    seed: int = 0,
):
    """Build a random-weight HF model and example inputs.

    Returns ``(model, example_inputs)``; the model is in eval mode, fp32, ``use_cache=False``,
    and returns its usual HF output object (``logits`` or ``last_hidden_state`` first).
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(attn_implementation=attn_implementation)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
                            n_positions=max(seq_len, 128), bos_token_id=vocab - 1,
                            eos_token_id=vocab - 1, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads or max(heads // 2, 1),
                             vocab_size=vocab, max_position_embeddings=max(seq_len, 128), **common)
        model = tf.LlamaForCausalLM(cfg)
    elif name == "mistral":
        cfg = tf.MistralConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                               num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=kv_heads or max(heads // 2, 1),
                               vocab_size=vocab, max_position_embeddings=max(seq_len, 128),
                               sliding_window=sliding_window, **common)
        model = tf.MistralForCausalLM(cfg)
    elif name == "bert":
        cfg = tf.BertConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            vocab_size=vocab, max_position_embeddings=max(seq_len, 128), **common)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    elif name == "vit":
        cfg = tf.ViTConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           image_size=32, patch_size=8, num_channels=3, **common)
        model = tf.ViTModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS} "
                         "or pass 'package.module:factory'")
    model.config.use_cache = False
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    if name == "vit":
        inputs = (torch.randn(batch, 3, 32, 32, generator=g),)
    else:
        inputs = (torch.randint(0, vocab, (batch, seq_len), generator=g),)
    return model, inputs


def load_model_spec(spec: str, **kwargs):
    """Resolve a CLI model spec: a built-in name or ``module.path:factory``."""
    if spec in BUILTIN_MODELS:
        return build_hf_model(spec, **kwargs)
    if ":" not in spec:
        raise ValueError(f"model spec {spec!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) "
                         "nor 'package.module:factory'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        factory: Callable = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load model factory {spec!r}: {e}") from e
    out = factory(**kwargs) if kwargs else factory()
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"factory {spec!r} must return (model, example_inputs)")
    return out
