"""Tiny HF causal LMs with *peaked* logits, and their compiled generators (helpers).

Random weights at HF's default ``initializer_range=0.02`` give nearly flat logits over the
vocabulary (top-2 gaps of ~1e-4 relative), so greedy argmax could be decided by float
rounding differences between any two correct implementations (our fused kernels vs. HF's
SDPA).  ``initializer_range=0.3`` makes the logits peaked; ``hf_greedy`` also returns the
smallest top-1/top-2 gap HF saw, and the tests require it (> 1e-4) to be far above the fp32
difference between our logits and HF's (~5e-6 measured on these models), so an
equality test can only pass because the tokens really agree.
"""

import torch
import transformers as tf

VOCAB = 512


def build_lm(name: str, seed: int = 0, sliding_window: int = 8):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.3, attn_implementation="sdpa")
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **common)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cls_cfg, cls = ((tf.LlamaConfig, tf.LlamaForCausalLM) if name == "llama"
                        else (tf.MistralConfig, tf.MistralForCausalLM))
        extra = {"sliding_window": sliding_window} if name == "mistral" else {}
        cfg = cls_cfg(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, **extra, **common)
        model = cls(cfg)
    return model.eval()


def hf_greedy(model, prompt: list[int], new: int, eos=None):
    """HF ``generate`` (greedy, its own cache); returns (new tokens, min top-2 logit gap)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    gaps = [float(torch.topk(lg[0], 2).values.diff().abs()) for lg in out.logits]
    return out.sequences[0, len(prompt):].tolist(), min(gaps)
