"""A working AVX-512 VNNI tensor intrinsic: ``C[16] += u8 A[4] . s8 B[16, 4]`` (``vpdpbusd``).

TVM ships ``dot_16x4_vnni`` (``tvm.s_tir.tensor_intrin.x86``) but its implementation passes
``<16 x i32>`` operands to ``llvm.x86.avx512.vpdpbusd.512``, which LLVM rejects ("Call
parameter type does not match function signature": the intrinsic wants ``<64 x i8>``). This
copy reinterprets A's broadcast and B's load as ``int8x64``. The body is one expression on
purpose: local temporaries would become heap workspaces. We do not import TVM's module (it
pulls the ~23 s ``tensor_intrin`` package in).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["VNNI_INTRIN", "register_vnni_intrin"]

VNNI_INTRIN = "attnforge_dot_16x4_vnni"


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                dtype="int8x64",
            ),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


_REGISTERED = False


def register_vnni_intrin() -> str:
    """Register :data:`VNNI_INTRIN` once per process and return its name."""
    global _REGISTERED
    if not _REGISTERED:
        try:
            TensorIntrin.register(VNNI_INTRIN, _desc, _impl)
        except Exception:  # noqa: BLE001 - already registered (e.g. module reloaded)
            TensorIntrin.get(VNNI_INTRIN)
        _REGISTERED = True
    return VNNI_INTRIN
