"""Target parsing: the strings users type -> ``tvm.target.Target``.

Accepted: ``"llvm"``/``"cpu"`` (host CPU detected), ``"cuda"`` (arch read from the GPU; an
error when there is none), ``"cuda:sm_80"``/``"cuda:sm_90"``/``"cuda:sm_90a"``, a JSON dict as
TVM 0.27 wants it, or a ``tvm.target.Target``.
"""

from __future__ import annotations

import re

import tvm

from .errors import TargetError

_FORMS = ("'llvm' or 'cpu'", "'cuda' (needs a GPU)", "'cuda:sm_80'", "'cuda:sm_90'",
          "a JSON dict such as {'kind': 'cuda', 'arch': 'sm_90'}", "a tvm.target.Target")


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver4``)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})


def gpu_arch() -> str | None:
    """``sm_XY`` of GPU 0, or None when no CUDA device is visible."""
    try:
        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # no CUDA runtime in this TVM build / no driver
        return None


def parse_target(spec) -> tvm.target.Target:
    """Turn a user's target spec into a ``tvm.target.Target`` (see module docstring)."""
    if isinstance(spec, tvm.target.Target):
        return spec
    if isinstance(spec, dict):
        try:
            return tvm.target.Target(spec)
        except Exception as e:
            raise TargetError(f"invalid target dict {spec!r}: {e}") from e
    if not isinstance(spec, str):
        raise TargetError(f"target must be a string, dict or tvm.target.Target, got {type(spec)}")
    s = spec.strip().lower()
    if s in ("llvm", "cpu"):
        return host_target()
    if s == "cuda":
        arch = gpu_arch()
        if arch is None:
            raise TargetError("target 'cuda' needs a visible GPU to read its architecture, and "
                              "none was found; name the arch instead, e.g. target='cuda:sm_90' "
                              "(H100/H200) or 'cuda:sm_80' (A100)")
        return cuda_target(arch)
    m = re.fullmatch(r"cuda:(sm_\d+a?)", s)
    if m:
        return cuda_target(m.group(1))
    raise TargetError(f"unknown target {spec!r}; use one of: " + ", ".join(_FORMS))


def cuda_target(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch, "host": host_target().export()})


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def target_tag(target: tvm.target.Target) -> str:
    """Short directory-safe tag: ``llvm-znver4``, ``cuda-sm_90``."""
    if is_cuda(target):
        return f"cuda-{target.attrs.get('arch', 'unknown')}"
    return f"{target.kind.name}-{target.attrs.get('mcpu', 'generic')}"


def can_run_here(target: tvm.target.Target) -> bool:
    """Whether kernels built for ``target`` can execute on this machine."""
    if is_cuda(target):
        return gpu_arch() is not None
    return target.kind.name == "llvm"
