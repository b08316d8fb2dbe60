"""Low-precision lowering of the generator's programs, the same steps ``compile_model`` runs.

After the attention passes (``compiler._lower(..., precision=)``, which also picks the fused
attention kernel's compute dtype), each prefill / decode program gets:

* ``"bfloat16"``: ``compiler._cpu_bfloat16`` (the very helper ``compile_model`` calls);
* ``"int8"``: ``quantization.quantize_int8`` with per-token activations computed at run time
  (no calibration data needed) or ``"none"`` (int8 weights only, diagnostic). Per-tensor
  activations are refused: they need calibration batches of real prompts, which a generator
  does not have (its example inputs are zeros).

The paged KV cache stays fp32; the paged decode attention kernel is not quantised.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

PRECISIONS = ("float32", "bfloat16", "int8")
INT8_ACTIVATIONS = ("per_token", "none")


def check_precision(precision: str, int8_exclude, int8_options: dict | None) -> None:
    """Raise for an unknown precision or int8 options a generator cannot honour."""
    if precision not in PRECISIONS:
        raise InputError(f"compile_generator: precision={precision!r} is not supported; choose "
                         f"one of {PRECISIONS}")
    if precision != "int8" and (int8_exclude is not None or int8_options):
        raise InputError("compile_generator: int8_exclude / int8_options need precision='int8'")
    opts = dict(int8_options or {})
    opts.pop("attention_qk", None)  # checked by split_int8_options
    act = opts.get("activations", "per_token")
    if act not in INT8_ACTIVATIONS:
        raise InputError(f"compile_generator: int8_options activations={act!r} is not supported "
                         f"for generation (choose one of {INT8_ACTIVATIONS}): per-tensor scales "
                         "need calibration prompts")
    if precision == "int8":
        from ..quantization import check_int8_target
        from ..target import host_target

        check_int8_target(host_target())


def split_int8_options(precision: str, target, int8_options: dict | None):
    """``(quantize_int8 keywords, attention_qk)``: ``int8_options={"attention_qk": "int8"}``
    (int8 Q Kᵀ inside the prefill's fused attention) is split off as ``compile_model`` does."""
    from ..passes._attention_qk import split_attention_qk

    return split_attention_qk(precision, target, int8_options)


def lower_precision(mod, target, precision: str, example_inputs, model, sites, *,
                    int8_exclude=None, int8_options: dict | None = None,
                    attention_qk: str = "float32"):
    """``(module, report entries)`` for one program after ``_lower``: ``bf16_matmuls`` (sites
    on the ``vdpbf16ps`` kernel) or ``quantization`` (``quantize_int8``'s summary)."""
    if precision == "bfloat16":
        from ..compiler import _cpu_bfloat16
        from ..passes.lower_bf16_matmul import count_bf16_matmuls

        mod = _cpu_bfloat16(mod, target)
        return mod, {"bf16_matmuls": count_bf16_matmuls(mod)}
    if precision != "int8":
        return mod, {}
    from ..passes._attention_qk import attention_qk_summary
    from ..quantization import quantize_int8

    summary: dict = {}
    batch = [np.asarray(x.detach().cpu().numpy()) for x in example_inputs]
    mod = quantize_int8(mod, [batch], target, exclude=int8_exclude, model=model,
                        summary=summary, **dict(int8_options or {}))
    summary["attention_qk"] = attention_qk_summary(sites, attention_qk)
    return mod, {"quantization": summary}
