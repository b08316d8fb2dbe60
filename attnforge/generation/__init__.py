"""Generation: compiled prefill + paged-KV decode, continuous batching (``compile_generator``).

See :mod:`.generator` for the request API, :mod:`.paged_kv` for the page pool,
:mod:`.hf_attention` for how the model's own code is exported, :mod:`.programs` for the
compiled prefill/decode programs.
"""

from __future__ import annotations

from .generator import Generator

__all__ = ["Generator", "compile_generator"]

from .precision import PRECISIONS, check_precision

__all__ += ["PRECISIONS"]


def compile_generator(hf_causal_lm, *, max_batch_size: int, max_seq_len: int,
                      page_size: int = 16, target="llvm", precision: str = "float32",
                      sparsity=None, num_pages: int | None = None, prefill_buckets=None,
                      decode_buckets=None, warmup: bool = False, verify: bool = True,
                      int8_exclude=None, int8_options: dict | None = None,
                      prefill_chunk: int | None = None) -> Generator:
    """Build a :class:`Generator` for a Hugging Face decoder-only LM (Llama, Mistral, GPT-2 and
    other models that route attention through ``ALL_ATTENTION_FUNCTIONS``).

    Args:
        hf_causal_lm: a ``PreTrainedModel`` with an LM head (``get_output_embeddings()``).
        max_batch_size: most unfinished requests at once (decode batch).
        max_seq_len: most tokens (prompt + generated) of one request.
        page_size: tokens per KV page.
        target: ``"llvm"`` only (the paged decode kernel is CPU-only).
        precision: ``"float32"``, ``"bfloat16"`` or ``"int8"``: both programs get
            ``compile_model``'s lowering for it (:mod:`.precision`): bf16 weights (CPU bf16 path
            of ``compile_model``), or int8 weights per output channel with u8 activations per
            token at run time (VNNI; LM head kept fp32 by default). The KV cache stays fp32.
        sparsity: an ``attnforge.sparsity`` policy the paged decode kernel can run too: a
            causal ``SlidingWindow(w)``, on every layer or per layer (``Layers``); the prefill
            gets it through the attention passes, decode reads only the window and pages
            outside it are freed. Other policies raise ``InputError`` (:mod:`.sparsity`).
        num_pages: KV pool size in pages (default: enough for ``max_batch_size`` requests of
            ``max_seq_len`` tokens, or of the sliding window for windowed models).
        prefill_buckets / decode_buckets: prompt lengths / batch sizes compiled (each one is
            a static-shape program, compiled on first use; default powers of two from 64 /
            1 up to ``max_seq_len`` / ``max_batch_size``).
        warmup: compile the smallest prefill and the largest decode program now.
        verify: measure accuracy against the model's fp32 eager forward / greedy ``generate``
            now (compiles the smallest prefill bucket and a decode bucket);
            ``gen.report["accuracy"]`` (:func:`.accuracy.measure_accuracy`).
        prefill_chunk: prefill prompts longer than this in chunks of this many tokens, one
            chunk per :meth:`Generator.step` (interleaved with the decode of running requests;
            each chunk attends to the cached pages: one extra compiled program).
        int8_exclude / int8_options: as ``compile_model``'s (``int8_options`` activations
            ``"per_token"`` or ``"none"``: there are no calibration prompts for per-tensor).
    """
    check_precision(precision, int8_exclude, int8_options)
    gen = Generator(hf_causal_lm, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                    page_size=page_size, target=target, num_pages=num_pages,
                    prefill_buckets=prefill_buckets, decode_buckets=decode_buckets,
                    precision=precision, sparsity=sparsity, int8_exclude=int8_exclude,
                    int8_options=int8_options, prefill_chunk=prefill_chunk)
    if warmup:
        gen.warmup([1], [max_batch_size])
    if verify:
        from .accuracy import measure_accuracy

        gen.report["accuracy"] = measure_accuracy(gen)
    return gen
