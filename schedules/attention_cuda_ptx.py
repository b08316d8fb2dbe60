"""Warp-level PTX building blocks for the CUDA fused attention kernel, in two flavours.

``cuda``
    Each op is one call of a small ``__device__`` helper (inline PTX) emitted through
    ``T.cuda.func_call``: ``ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16``,
    ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32``, ``cp.async.cg`` (16 B,
    ``src-size`` zero fill), ``cp.async.commit_group``/``wait_group N``, quad shuffles and
    ``ex2.approx``.  Register arrays are per-thread ``local`` buffers ``[n]``.
``emu``
    The same ops written as plain TIR loops that follow the PTX ISA fragment layouts, for an
    ``llvm`` build: thread bindings become serial loops and every register array gets a
    leading thread axis ``[NT, n]``, so cross-lane ops read other lanes' registers.  The kernel
    body is shared, so an ``llvm`` run checks the index maps, the pipeline and the softmax.

Fragment layouts (PTX ISA, ``mma.m16n8k16``; ``g = lane // 4``, ``t = lane % 4``):
A (16x16, row) regs ``a0..a7``: ``(row, k) = (g + 8*((i//2)%2), 2t + i%2 + 8*(i//4))``;
B (16x8, col) regs ``b0..b3``: ``(k, n) = (2t + i%2 + 8*(i//2), g)``;
C/D (16x8) regs ``c0..c3``: ``(row, n) = (g + 8*(i//2), 2t + i%2)``.
``ldmatrix`` x4: lanes ``8m..8m+7`` give the row addresses of matrix ``m``; lane ``L`` gets
``M_m[L//4][2(L%4) + h]`` (``.trans``: ``M_m[2(L%4) + h][L//4]``) in register half ``2m + h``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["Ops", "helper_source", "lane_offset"]

_MMA_TYPE = {"float16": "f16", "bfloat16": "bf16"}


def helper_source(dtype: str, max_wait: int) -> dict[str, str]:
    """CUDA source of each ``__device__`` helper by name (TVM emits each name's source once)."""
    ty = _MMA_TYPE[dtype]
    fi = "__device__ __forceinline__"
    smem = "(unsigned)__cvta_generic_to_shared"
    src = {}
    for name, tr in (("af_ldsm_x4", ""), ("af_ldsm_x4_t", ".trans")):
        src[name] = (
            f"{fi} void {name}(void* dst, const void* src) {{\n  unsigned* d = (unsigned*)dst;\n"
            f'  asm volatile("ldmatrix.sync.aligned.m8n8.x4{tr}.shared.b16 "\n'
            '               "{%0,%1,%2,%3}, [%4];\\n"\n'
            '               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])\n'
            f'               : "r"({smem}(src)) : "memory");\n}}\n')
    src["af_mma"] = (
        f"{fi} void af_mma(float* c, const void* a, const void* b) {{\n"
        "  const unsigned* A = (const unsigned*)a;\n  const unsigned* B = (const unsigned*)b;\n"
        f'  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 "\n'
        '               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"\n'
        '               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])\n'
        '               : "r"(A[0]), "r"(A[1]), "r"(A[2]), "r"(A[3]), "r"(B[0]), "r"(B[1]));\n}\n')
    src["af_cp16"] = (
        f"{fi} void af_cp16(void* dst, const void* src, int valid) {{\n"
        '  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\\n"\n'
        f'               :: "r"({smem}(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");\n}}\n')
    src["af_cp_commit"] = (
        f'{fi} void af_cp_commit() {{ asm volatile("cp.async.commit_group;\\n" ::: "memory"); }}\n')
    for n in range(max_wait + 1):
        src[f"af_cp_wait_{n}"] = (
            f"{fi} void af_cp_wait_{n}() "
            f'{{ asm volatile("cp.async.wait_group {n};\\n" ::: "memory"); }}\n')
    for name, op in (("af_quad_max", "fmaxf(v, {})"), ("af_quad_sum", "v + {}")):
        body = "".join(f"  v = {op.format(f'__shfl_xor_sync(0xffffffffu, v, {m})')};\n"
                       for m in (1, 2))
        src[name] = f"{fi} float {name}(float v) {{\n{body}  return v;\n}}\n"
    src["af_exp2"] = (f"{fi} float af_exp2(float x) {{\n  float y;\n"
                      '  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));\n  return y;\n}\n')
    return src


def lane_offset(lane, stride: int, b_op: bool):
    """Offset of the smem row that ``lane`` addresses in an ldmatrix x4 of a 16x16 tile."""
    if b_op:  # matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        return (lane % 8 + 8 * (lane // 16)) * stride + 8 * (lane // 8 % 2)
    # matrices: (r 0-7, c 0-7), (r 8-15, c 0-7), (r 0-7, c 8-15), (r 8-15, c 8-15)
    return (lane % 8 + 8 * (lane // 8 % 2)) * stride + 8 * (lane // 16)


class Ops:
    """The op set for one kernel: ``emu=False`` emits PTX helpers, ``emu=True`` plain TIR."""

    def __init__(self, dtype: str, num_threads: int, max_wait: int, emu: bool):
        self.dtype, self.nt, self.emu = dtype, num_threads, emu
        self.src = helper_source(dtype, max_wait)

    # ------------------------------------------------------------------ structure
    def threads(self):
        """Loop over the threads of a block: ``threadIdx.x`` on cuda, serial in emu."""
        if self.emu:
            return T.serial(self.nt)
        return T.thread_binding(self.nt, thread="threadIdx.x")

    def grid(self, n: int, tag: str):
        return T.serial(n) if self.emu else T.thread_binding(n, thread=tag)

    def reg(self, tx, i):
        """Index of register ``i`` of thread ``tx`` in a register array."""
        return (tx, i) if self.emu else (i,)

    def reg_shape(self, n: int) -> tuple:
        return (self.nt, n) if self.emu else (n,)

    def _call(self, name, *args, ret="void"):
        return T.cuda.func_call(name, *args, source_code=self.src[name], return_type=ret)

    # ------------------------------------------------------------------ scalar ops
    def exp2(self, x):
        return tirx.exp2(x) if self.emu else self._call("af_exp2", x, ret="float32")

    def quad_max(self, buf, tx, i):
        """Max of register ``i`` over the 4 lanes of a quad (same mma row)."""
        if not self.emu:
            return self._call("af_quad_max", buf[i], ret="float32")
        q = tx - tx % 4
        return tirx.max(tirx.max(buf[q, i], buf[q + 1, i]), tirx.max(buf[q + 2, i], buf[q + 3, i]))

    def quad_sum(self, buf, tx, i):
        if not self.emu:
            return self._call("af_quad_sum", buf[i], ret="float32")
        q = tx - tx % 4
        return (buf[q, i] + buf[q + 1, i]) + (buf[q + 2, i] + buf[q + 3, i])

    # ------------------------------------------------------------------ statements
    def sync(self):
        """``__syncthreads()`` (a no-op in emu: phases already run one after another)."""
        return tirx.const(0, "int32") if self.emu else T.tvm_storage_sync("shared")

    def commit(self):
        return tirx.const(0, "int32") if self.emu else self._call("af_cp_commit")

    def wait(self, n: int):
        return tirx.const(0, "int32") if self.emu else self._call(f"af_cp_wait_{n}")

    def make_macros(self):
        """Statement macros ``cp16``, ``ldsm``, ``mma`` for this flavour."""
        dt, emu = self.dtype, self.emu
        call = self._call

        @T.macro(hygienic=True)
        def cp16(smem, soff, gbuf, gidx, valid):
            """Copy 8 elements ``gbuf[gidx...:+8]`` to ``smem[soff:+8]`` (zeros if not valid)."""
            if emu:
                for e in range(8):
                    smem[soff + e] = T.Select(valid, gbuf[tuple(gidx[:-1]) + (gidx[-1] + e,)],
                                              T.Cast(dt, 0))
            else:
                T.evaluate(call("af_cp16", smem.access_ptr("w", offset=soff),
                                T.address_of(gbuf[tuple(gidx)]), T.Cast("int32", valid)))

        @T.macro(hygienic=True)
        def ldsm(dst, tx, doff, smem, base, stride, b_op, trans):
            """ldmatrix x4 of a 16x16 tile at ``smem[base]`` (row stride ``stride``).

            ``b_op``: the lane map of a non-transposed B operand (two n-tiles of 8 rows);
            otherwise that of an A operand, also used for the ``.trans`` B load of V.
            """
            if emu:
                lane = tx % 32
                for i in range(8):
                    if trans:
                        dst[tx, doff + i] = smem[base + lane_offset(
                            8 * (i // 2) + 2 * (lane % 4) + i % 2, stride, b_op) + lane // 4]
                    else:
                        dst[tx, doff + i] = smem[base + lane_offset(
                            8 * (i // 2) + lane // 4, stride, b_op) + 2 * (lane % 4) + i % 2]
            else:
                T.evaluate(call("af_ldsm_x4_t" if trans else "af_ldsm_x4",
                                dst.access_ptr("w", offset=doff),
                                smem.access_ptr("r", offset=base + lane_offset(
                                    tx % 32, stride, b_op))))

        @T.macro(hygienic=True)
        def mma(c, tx, coff, a, aoff, b, boff):
            """``c[coff:+4] += A(16x16) @ B(16x8)`` with fp32 accumulation."""
            if emu:
                w0 = tx - tx % 32
                g = tx % 32 // 4
                t4 = tx % 4
                for e in range(4):
                    for k in range(16):
                        c[tx, coff + e] = c[tx, coff + e] + T.Cast(
                            "float32", a[w0 + ((g + 8 * (e // 2)) % 8) * 4 + (k % 8) // 2,
                                         aoff + (k // 8) * 4 + (e // 2) * 2 + k % 2]
                        ) * T.Cast(
                            "float32", b[w0 + (2 * t4 + e % 2) * 4 + (k % 8) // 2,
                                         boff + (k // 8) * 2 + k % 2])
            else:
                T.evaluate(call("af_mma", c.access_ptr("rw", offset=coff),
                                a.access_ptr("r", offset=aoff), b.access_ptr("r", offset=boff)))

        return cp16, ldsm, mma
