"""INT8 ``Q Kᵀ`` for the fused attention: which kernel a site gets (``LowerAttentionToTIR``).

``LowerAttentionToTIR(target, attention_qk="int8")`` (llvm only) builds every static-shape site
with :func:`attnforge.schedules.attention_cpu_int8qk.fused_attention_cpu_int8qk` (same
signature and call as the fp32 kernel, so the Relax call is unchanged apart from the callee).
FlexAttention sites keep their ``score_mod`` (the kernel adds the smoothing shift back before
it).  A site that kernel rejects (e.g. ``block_q`` not a multiple of 16) and a symbolic-length
site keep the fp32 kernel; the report entry says which and why (``attention_qk``,
``attention_qk_note``).
"""

from __future__ import annotations

__all__ = ["ATTENTION_QK", "attention_qk_summary", "check_attention_qk", "select_qk_kernel",
           "split_attention_qk"]

ATTENTION_QK = ("float32", "int8")


def check_attention_qk(value, target) -> str:
    """Validate the ``attention_qk`` option for ``target`` (a ``tvm.target.Target``); returns
    it.  ``int8`` needs an llvm target with AVX-512 VNNI (LLVM aborts the process on
    ``vpdpbusd`` for a target without it, so this is checked before any kernel is built)."""
    from tvm.target.codegen import target_has_features

    if value not in ATTENTION_QK:
        raise ValueError(f"attention_qk={value!r} is not supported; choose one of "
                         f"{ATTENTION_QK}")
    kind = str(target.kind.name)
    if value == "int8" and kind != "llvm":
        raise ValueError(f"attention_qk='int8' is implemented for the llvm (CPU) fused "
                         f"attention kernel only, not target kind {kind!r}; use "
                         "attention_qk='float32'")
    if value == "int8" and not target_has_features("avx512vnni", target):
        raise ValueError(f"attention_qk='int8' needs an llvm target with AVX-512 VNNI "
                         f"(e.g. mcpu znver4 or icelake-server), got {target}; use "
                         "attention_qk='float32'")
    return value


def select_qk_kernel(lowerer, plan, attention_qk: str) -> None:
    """Point ``plan`` at the int8-QKᵀ kernel when it accepts the site (builds it once through
    ``lowerer._kernel``), else leave it on the fp32 kernel with the reason."""
    if attention_qk == "float32":  # the default: report entries unchanged
        return
    plan.qk_entry = {"attention_qk": "float32", "attention_qk_note": None}
    if getattr(plan, "dynamic", False):
        plan.qk_entry["attention_qk_note"] = ("symbolic lengths: int8 QK^T is built for "
                                              "static shapes only; fp32 kernel kept")
        return
    from ..schedules.attention_cpu_int8qk import fused_attention_cpu_int8qk

    plan.qk_kernel = (fused_attention_cpu_int8qk, "fused_attention_cpu_int8qk")
    try:
        lowerer._kernel(plan)
    except (ValueError, NotImplementedError) as e:
        plan.qk_kernel = None
        plan.qk_entry["attention_qk_note"] = f"int8 QK^T kernel rejected the site: {e}; " \
                                             "fp32 kernel kept"
        return
    plan.qk_entry["attention_qk"] = "int8"


def split_attention_qk(precision: str, target, int8_options: dict | None):
    """``compile_model``'s ``int8_options`` without ``"attention_qk"``, and its value.

    ``int8_options={"attention_qk": "int8"}`` is accepted with ``precision="int8"`` only (the
    other int8 options are ``quantize_int8`` keywords); default ``"float32"``."""
    options = dict(int8_options or {})
    value = options.pop("attention_qk", "float32")
    if value != "float32" and precision != "int8":
        raise ValueError(f"int8_options={{'attention_qk': {value!r}}} applies to "
                         f"precision='int8' only, got precision={precision!r}")
    try:
        check_attention_qk(value, target)
    except ValueError as e:
        raise ValueError(f"int8_options['attention_qk']: {e}") from None
    return options, value


def attention_qk_summary(sites: list[dict], attention_qk: str) -> dict:
    """``cm.report["quantization"]["attention_qk"]``: the mode and what each site got."""
    lowered = [s for s in sites if s.get("lowered_to")]
    int8 = [s["site"] for s in lowered if s.get("attention_qk") == "int8"]
    out = {"mode": attention_qk, "int8_sites": int8,
           "float32_sites": [s["site"] for s in lowered if s["site"] not in int8]}
    if attention_qk == "int8":
        out["scheme"] = ("SageAttention-style: K smoothed by its per-channel mean over tokens, "
                         "symmetric int8 Q per block_q rows and K per block_kv rows per head, "
                         "u8 x s8 -> s32 vpdpbusd, dequantised before the online softmax; "
                         "P V in fp32")
        out["notes"] = {s["site"]: s["attention_qk_note"] for s in lowered
                        if s.get("attention_qk_note")}
        if not int8:
            out["note"] = ("no attention site got the int8 QK^T kernel (fuse_attention=False, "
                           "no lowered site, or every site fell back: see notes)")
    return out
