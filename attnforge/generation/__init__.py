"""Generation: compiled prefill + paged-KV decode, continuous batching (``compile_generator``).

See :mod:`.generator` for the request API, :mod:`.paged_kv` for the page pool,
:mod:`.hf_attention` for how the model's own code is exported, :mod:`.programs` for the
compiled prefill/decode programs.
"""

from __future__ import annotations

from .generator import Generator

__all__ = ["Generator", "compile_generator"]

PRECISIONS = ("float32",)


def compile_generator(hf_causal_lm, *, max_batch_size: int, max_seq_len: int,
                      page_size: int = 16, target="llvm", precision: str = "float32",
                      sparsity=None, num_pages: int | None = None, prefill_buckets=None,
                      decode_buckets=None, warmup: bool = False) -> Generator:
    """Build a :class:`Generator` for a Hugging Face decoder-only LM (Llama, Mistral, GPT-2 and
    other models that route attention through ``ALL_ATTENTION_FUNCTIONS``).

    Args:
        hf_causal_lm: a ``PreTrainedModel`` with an LM head (``get_output_embeddings()``).
        max_batch_size: most unfinished requests at once (decode batch).
        max_seq_len: most tokens (prompt + generated) of one request.
        page_size: tokens per KV page.
        target: ``"llvm"`` only (the paged decode kernel is CPU-only).
        precision: ``"float32"`` only for now.
        sparsity: not supported yet (must be None).
        num_pages: KV pool size in pages (default: enough for ``max_batch_size`` requests of
            ``max_seq_len`` tokens, or of the sliding window for windowed models).
        prefill_buckets / decode_buckets: prompt lengths / batch sizes compiled (each one is
            a static-shape program, compiled on first use; default powers of two from 64 /
            1 up to ``max_seq_len`` / ``max_batch_size``).
        warmup: compile the smallest prefill and the largest decode program now.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"compile_generator: precision={precision!r} is not supported yet; "
                         f"choose one of {PRECISIONS}")
    if sparsity is not None:
        raise ValueError("compile_generator: sparsity= is not supported yet (must be None)")
    gen = Generator(hf_causal_lm, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                    page_size=page_size, target=target, num_pages=num_pages,
                    prefill_buckets=prefill_buckets, decode_buckets=decode_buckets)
    if warmup:
        gen.warmup([1], [max_batch_size])
    return gen
