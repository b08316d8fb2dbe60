"""The register-tile schedule shared by the packed-weight CPU matmul kernels (int8 VNNI,
bf16 ``vdpbf16ps``): block ``C`` with loops ``(i, jo, ji, ko, ki)`` (``ji`` x ``ki`` the
intrinsic's shape), block ``out`` its epilogue."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir


@dataclass
class RegisterTile:
    block: object  # the C block
    ko: object  # reduction loop outside the intrinsic (decompose_reduction point)
    ji: object  # the loop the intrinsic replaces
    i1: object  # mr rows of the tile
    j1: object  # nb column blocks of the tile
    out_loops: list  # the epilogue's loops inside each tile


def tile_registers(sch: s_tir.Schedule, mr: int, nb: int) -> RegisterTile:
    """``mr`` rows x ``nb`` column blocks per register tile, tiles in parallel, the epilogue
    computed per tile."""
    blk = sch.get_sblock("C")
    i, jo, ji, ko, ki = sch.get_loops(blk)
    i0, i1 = sch.split(i, [None, mr])
    j0, j1 = sch.split(jo, [None, nb])
    sch.reorder(j0, i0, ko, i1, j1, ji, ki)
    par = sch.fuse(j0, i0)
    sch.parallel(par)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, par, preserve_unit_loops=True)
    return RegisterTile(blk, ko, ji, i1, j1, list(sch.get_loops(out)))


def tensorize_tile(sch: s_tir.Schedule, tile: RegisterTile, intrin: str) -> None:
    """Zero-init vectorised, the inner product on ``intrin``, the tile unrolled."""
    init = sch.decompose_reduction(tile.block, tile.ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(tile.ji, intrin)
    sch.unroll(tile.i1)
    sch.unroll(tile.j1)
