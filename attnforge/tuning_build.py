"""MetaSchedule builder for attnforge tuning jobs (runs inside TVM's popen workers).

TVM's default ``LocalBuilder`` build function imports ``tvm.s_tir.tensor_intrin`` in every
worker (~23 s here, mostly CUDA intrinsics), which trips its 30 s timeout on this machine.
:func:`fast_build` does the same build without that import.  This module must stay cheap to
import: workers unpickle :func:`fast_build` by reference and import it.
"""

from __future__ import annotations

import os


def fast_build(mod, target, _params=None):
    """``tvm.driver.build`` of a candidate, weight-layout rewrite blocks removed."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .tuning_space import build_candidate

    mod = build_candidate(mod)  # an attention design-space candidate -> its real kernel
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def make_builder(max_workers: int | None = None, timeout_sec: float = 60.0):
    """A ``LocalBuilder`` that uses :func:`fast_build`."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(f_build=fast_build, max_workers=max_workers,
                                   timeout_sec=timeout_sec)


def ensure_cpu_intrinsics() -> None:
    """Register only the x86 tensor intrinsics before MetaSchedule asks for all of them.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` (all targets; ~23-90 s here, mostly
    CUDA).  For llvm targets we pre-register a lightweight package object holding just
    ``x86`` (0.5 s); later submodule imports (``...tensor_intrin.cuda``) still work.
    """
    import os
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    pkg.__package__ = name
    sys.modules[name] = pkg
    try:
        import tvm.s_tir.tensor_intrin.x86
    except Exception:  # noqa: BLE001 - fall back to the full (slow) import
        del sys.modules[name]
        import tvm.s_tir.tensor_intrin


def tuning_target(target):
    """``target`` with ``num-cores`` set (MetaSchedule's CPU rules require it)."""
    import tvm

    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    cfg = {k: v for k, v in target.export().items() if k not in ("keys", "tag")}
    cfg["num-cores"] = int(cores)
    return tvm.target.Target(cfg)
