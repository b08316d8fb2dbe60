"""AVX-512 BF16 tensor intrinsic: ``C[16] += A[2] . B[16, 2]`` in bf16 -> fp32 (``vdpbf16ps``).

bf16 values travel as their bit patterns in ``uint16`` buffers; ``bf16_to_f32(x)`` (a shift
into the high half of a float) is their exact value. One ``vdpbf16ps`` multiplies 16 output
columns x 2 k of B (one 64-byte vector) by A's two k values broadcast to every lane and adds
the pair sums to 16 fp32 accumulators (32 MACs per instruction).

Why the detour through an imported LLVM function: LLVM 22 declares
``llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)``, and TVM's
``BF16ComputeLegalize`` widens every bf16-typed argument of a call to fp32 (``<32 x float>``,
which LLVM rejects), while ``int16``/``int32`` vectors do not match the signature either. So
:data:`LLVM_WRAPPER` defines ``attnforge_dpbf16ps(<16 x float>, <16 x i32>, <16 x i32>)``, which
bitcasts to ``<32 x bfloat>`` and calls the intrinsic; :func:`with_llvm_import` attaches it to a
PrimFunc (TVM's ``pragma_import_llvm``: the codegen links it and marks it always-inline), so the
built code holds a plain ``vdpbf16ps`` with no call. The intrinsic body is one expression
(local temporaries would become heap workspaces).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["BF16_DOT_INTRIN", "LLVM_WRAPPER", "bf16_to_f32", "f32_to_bf16_bits",
           "register_bf16_dot_intrin", "with_llvm_import"]

BF16_DOT_INTRIN = "attnforge_dot_16x2_bf16"
WRAPPER_SYMBOL = "attnforge_dpbf16ps"

LLVM_WRAPPER = f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define <16 x float> @{WRAPPER_SYMBOL}(<16 x float> %c, <16 x i32> %a, <16 x i32> %b) {{
  %a1 = bitcast <16 x i32> %a to <32 x bfloat>
  %b1 = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(
      <16 x float> %c, <32 x bfloat> %a1, <32 x bfloat> %b1)
  ret <16 x float> %r
}}
"""


def bf16_to_f32(bits: tirx.PrimExpr) -> tirx.PrimExpr:
    """Exact fp32 value of a bf16 bit pattern (a ``uint16`` TIR expression)."""
    return tirx.reinterpret("float32", tirx.Cast("uint32", bits) << tirx.const(16, "uint32"))


def f32_to_bf16_bits(x):
    """fp32 TIR expression -> bf16 bits (``uint16``), round to nearest even; NaN stays NaN.

    Same rounding as ``torch.Tensor.to(torch.bfloat16)`` and ``ml_dtypes``; vectorises to
    integer AVX-512 ops.
    """
    def u32(v: int) -> tirx.PrimExpr:
        return tirx.const(v, "uint32")

    bits = tirx.reinterpret("uint32", x)
    rounded = (bits + u32(0x7FFF) + ((bits >> u32(16)) & u32(1))) >> u32(16)
    is_nan = (bits & u32(0x7FFFFFFF)) > u32(0x7F800000)
    return tirx.Cast("uint16", tirx.Select(is_nan, u32(0x7FC0), rounded))


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((2,), "uint16", offset_factor=1),
    B: T.Buffer((16, 2), "uint16", offset_factor=1),
    C: T.Buffer((16,), "float32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + bf16_to_f32(A[vk]) * bf16_to_f32(B[vi, vk])


@T.prim_func(s_tir=True)
def _impl(
    A: T.Buffer((2,), "uint16", offset_factor=1),
    B: T.Buffer((16, 2), "uint16", offset_factor=1),
    C: T.Buffer((16,), "float32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_pure_extern(
            "float32x16",
            WRAPPER_SYMBOL,
            C.vload([0], dtype="float32x16"),
            T.broadcast(T.reinterpret(A.vload([0], "uint16x2"), dtype="int32"), 16),
            T.reinterpret(B.vload([0, 0], dtype="uint16x32"), dtype="int32x16"),
        )


def with_llvm_import(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with :data:`LLVM_WRAPPER` attached (``pragma_import_llvm`` around its body)."""
    body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm",
                         tvm.ir.StringImm(LLVM_WRAPPER), func.body)
    return func.with_body(body)


_REGISTERED = False


def register_bf16_dot_intrin() -> str:
    """Register :data:`BF16_DOT_INTRIN` once per process and return its name."""
    global _REGISTERED
    if not _REGISTERED:
        try:
            TensorIntrin.register(BF16_DOT_INTRIN, _desc, _impl)
        except Exception:  # noqa: BLE001 - already registered (e.g. module reloaded)
            TensorIntrin.get(BF16_DOT_INTRIN)
        _REGISTERED = True
    return BF16_DOT_INTRIN

