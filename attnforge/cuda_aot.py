"""Ahead-of-time CUDA binaries for built TVM modules: no compiler on the deployment box.

A module built by ``tvm.compile(..., target=cuda)`` keeps CUDA C++ source; TVM 0.27's CUDA
runtime compiles it when the module is loaded by calling the global function
``tvm_callback_cuda_compile(code) -> bytes`` (cubin or fatbin).  Here:

* :func:`build_gpu_binaries` extracts every CUDA source module of a built executable and
  compiles each with ``nvcc`` for several archs: ``{sha256(source): {arch: fatbin bytes}}``;
* :func:`save_binaries` / :func:`load_binaries` store them as ``<dir>/index.json`` plus
  ``<dir>/<sha256>.<arch>.fatbin``;
* :func:`install_aot_callback` registers a ``tvm_callback_cuda_compile`` that returns the
  prebuilt binary for the source's hash and the GPU's arch (call it before the module is
  loaded / ``relax.VirtualMachine`` is created).

No torch import; ``tvm`` is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "AOTBinaryMissing",
    "build_gpu_binaries",
    "compile_source",
    "cuda_sources",
    "current_gpu_arch",
    "fatbin_archs",
    "find_cuda_tool",
    "install_aot_callback",
    "is_fatbin",
    "load_binaries",
    "ptxas_report",
    "sass",
    "save_binaries",
    "source_key",
    "uninstall_aot_callback",
]

_NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-w",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]
_FATBIN_MAGIC = b"\x50\xed\x55\xba"


class AOTBinaryMissing(RuntimeError):
    """No prebuilt binary for a kernel source / GPU arch (and no source fallback)."""


def source_key(code: str) -> str:
    """Key of a CUDA source: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def _module_of(obj):
    """The runtime module of a Relax ``Executable``, a ``tvm.runtime.Module`` or similar."""
    return getattr(obj, "mod", obj)


def cuda_sources(executable_or_lib) -> list[str]:
    """CUDA C++ sources of every ``cuda`` module imported (recursively) by a built module."""
    seen, out, stack = set(), [], [_module_of(executable_or_lib)]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            src = m.inspect_source("cuda") or m.inspect_source("")
            if src and src not in out:
                out.append(src)
        stack.extend(m.imports)
    return out


def find_cuda_tool(name: str) -> str | None:
    """Path of a CUDA tool (``nvcc``, ``cuobjdump``, ``nvdisasm``): PATH, CUDA_HOME, PyPI wheels."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    try:
        import nvidia  # PyPI nvidia-cuda-* wheels: nvidia/cu13/bin

        roots += [str(Path(p) / sub) for p in nvidia.__path__ for sub in ("cu13", "cu12")]
    except ImportError:
        pass
    for root in roots:
        cand = Path(root) / "bin" / name
        if root and cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _tool_env() -> dict:
    """Environment with the directories of nvdisasm/cuobjdump on PATH (cuobjdump needs both)."""
    env = dict(os.environ)
    dirs = {str(Path(p).parent) for p in (find_cuda_tool("nvdisasm"), find_cuda_tool("cuobjdump"))
            if p}
    env["PATH"] = os.pathsep.join([*sorted(dirs), env.get("PATH", "")])
    return env


def _arch_num(arch: str) -> str:
    m = re.fullmatch(r"sm_(\d+[a-z]?)", arch)
    if not m:
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return m.group(1)


def compile_source(code: str, arch: str, fmt: str = "fatbin", verbose: bool = False,
                   options: Sequence[str] = ()):
    """Compile CUDA source with nvcc to ``fatbin`` (SASS + PTX), ``cubin`` or ``ptx``.

    Returns the bytes, or ``(bytes, ptxas_log)`` when ``verbose``.  Raises ``RuntimeError`` with
    nvcc's message on failure and ``FileNotFoundError`` when nvcc is missing.
    """
    nvcc = find_cuda_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME/bin): install the CUDA toolkit")
    if fmt not in ("fatbin", "cubin", "ptx"):
        raise ValueError(f"fmt must be fatbin, cubin or ptx, got {fmt!r}")
    n = _arch_num(arch)
    if fmt == "fatbin":
        gen = ["-gencode", f"arch=compute_{n},code=sm_{n}",
               "-gencode", f"arch=compute_{n},code=compute_{n}"]
    else:
        gen = [f"-arch=sm_{n}"]
    with tempfile.TemporaryDirectory(prefix="attnforge_nvcc_") as tmp:
        src, out = Path(tmp) / "k.cu", Path(tmp) / f"k.{fmt}"
        src.write_text(code)
        cmd = [nvcc, f"--{fmt}", *gen, *_NVCC_FLAGS, *options, "-o", str(out), str(src)]
        if verbose and fmt != "ptx":
            cmd.insert(1, "-Xptxas=-v")
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch} ({fmt}):\n{r.stderr[-4000:]}")
        data = out.read_bytes()
    return (data, r.stderr) if verbose else data


def ptxas_report(log: str) -> dict[str, dict]:
    """Parse ``ptxas -v`` output: ``{kernel: {registers, spill_stores, spill_loads, stack,
    smem_static}}`` (dynamic shared memory is not in the report)."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": 0, "spill_stores": 0,
                                              "spill_loads": 0, "stack": 0, "smem_static": 0})
            continue
        if cur is None:
            continue
        for key, pat in (("stack", r"(\d+) bytes stack frame"),
                         ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"),
                         ("registers", r"Used (\d+) registers"),
                         ("smem_static", r"(\d+) bytes smem")):
            m = re.search(pat, line)
            if m:
                cur[key] = int(m.group(1))
    return out


def is_fatbin(data: bytes) -> bool:
    """True when ``data`` starts with the CUDA fatbin magic."""
    return data[:4] == _FATBIN_MAGIC


def fatbin_archs(path_or_bytes) -> list[str] | None:
    """SASS archs in a fatbin/cubin per ``cuobjdump --list-elf`` (None without cuobjdump)."""
    tool = find_cuda_tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = path_or_bytes
        if isinstance(path_or_bytes, (bytes, bytearray)):
            path = Path(tmp) / "b.fatbin"
            path.write_bytes(path_or_bytes)
        r = subprocess.run([tool, "--list-elf", str(path)], capture_output=True, text=True,
                           check=False, env=_tool_env())
    return sorted(set(re.findall(r"sm_\d+[a-z]?", r.stdout)))


def sass(path_or_bytes) -> str | None:
    """SASS text of a cubin/fatbin via cuobjdump (+nvdisasm); None when the tools are missing."""
    tool = find_cuda_tool("cuobjdump")
    if tool is None or find_cuda_tool("nvdisasm") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = path_or_bytes
        if isinstance(path_or_bytes, (bytes, bytearray)):
            path = Path(tmp) / "b.cubin"
            path.write_bytes(path_or_bytes)
        r = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=False,
                           env=_tool_env())
    return r.stdout if r.returncode == 0 else None


def build_gpu_binaries(executable_or_lib, archs: Sequence[str] = ("sm_80", "sm_90"),
                       ) -> dict[str, dict[str, bytes]]:
    """``{sha256(source): {arch: fatbin}}`` for every CUDA source module of a built module."""
    sources = cuda_sources(executable_or_lib)
    if not sources:
        raise ValueError("the module has no CUDA source modules (was it built for target cuda?)")
    return {source_key(s): {a: compile_source(s, a, "fatbin") for a in archs} for s in sources}


def save_binaries(binaries: dict[str, dict[str, bytes]], directory) -> Path:
    """Write ``index.json`` and ``<sha>.<arch>.fatbin`` files into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    index = {}
    for key, per_arch in binaries.items():
        index[key] = {}
        for arch, data in per_arch.items():
            name = f"{key}.{arch}.fatbin"
            (d / name).write_bytes(data)
            index[key][arch] = name
    (d / "index.json").write_text(json.dumps({"format": 1, "binaries": index}, indent=1))
    return d


def load_binaries(directory) -> dict[str, dict[str, bytes]]:
    """Inverse of :func:`save_binaries`."""
    d = Path(directory)
    index = json.loads((d / "index.json").read_text())["binaries"]
    return {k: {a: (d / n).read_bytes() for a, n in v.items()} for k, v in index.items()}


def current_gpu_arch() -> str:
    """``sm_XY`` of GPU 0 (``ATTNFORGE_CUDA_ARCH`` overrides)."""
    env = os.environ.get("ATTNFORGE_CUDA_ARCH")
    if env:
        return env
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        raise AOTBinaryMissing("no CUDA device found to choose a prebuilt binary for")
    return "sm_" + dev.compute_version.replace(".", "")


def _pick(per_arch: dict[str, bytes], arch: str) -> bytes | None:
    """Exact arch, else the newest same-major arch not above it (SASS is binary-compatible)."""
    if arch in per_arch:
        return per_arch[arch]
    n = _arch_num(arch)
    same = [a for a in per_arch if _arch_num(a)[:-1] == n[:-1] and _arch_num(a) <= n]
    return per_arch[max(same)] if same else None


_REGISTRY: dict[str, dict[str, bytes]] = {}  # every installed artifact's binaries


def install_aot_callback(binaries: dict[str, dict[str, bytes]],
                         allow_source_fallback: bool = False, arch: str | None = None):
    """Register ``tvm_callback_cuda_compile`` (override) serving prebuilt binaries.

    ``binaries`` are merged into a process-wide registry, so several loaded artifacts share the
    callback.  It maps ``sha256(code)`` and the GPU arch (``arch`` or :func:`current_gpu_arch`)
    to a binary; when none fits it raises :class:`AOTBinaryMissing`, or with
    ``allow_source_fallback`` compiles the source (nvcc, else TVM's nvrtc path).
    Call it before ``tvm.runtime.load_module`` / ``relax.VirtualMachine``.  Returns the callback.
    """
    import tvm_ffi

    for key, per_arch in binaries.items():
        _REGISTRY.setdefault(key, {}).update(per_arch)

    def callback(code, *_):
        want = arch or current_gpu_arch()
        per_arch = _REGISTRY.get(source_key(code))
        data = _pick(per_arch, want) if per_arch else None
        if data is not None:
            return data
        if allow_source_fallback:
            if find_cuda_tool("nvcc"):
                return compile_source(code, want, "fatbin")
            import tvm
            from tvm.support import nvcc

            with tvm.target.Target({"kind": "cuda", "arch": want}):
                return nvcc.compile_cuda(code, target_format="cubin", compiler="nvrtc")
        have = sorted({a for v in _REGISTRY.values() for a in v})
        what = "this kernel source" if per_arch is None else f"arch {want}"
        raise AOTBinaryMissing(
            f"attnforge AOT: no prebuilt CUDA binary for {what} (source sha256 "
            f"{source_key(code)[:16]}..., GPU arch {want}; loaded artifacts have "
            f"{len(_REGISTRY)} source(s) for archs {have}). Rebuild the artifact with this arch "
            "in build_gpu_binaries(archs=...) or load with allow_source_fallback=True (needs nvcc "
            "or nvrtc on this machine).")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", callback, override=True)
    return callback


def uninstall_aot_callback() -> None:
    """Restore TVM's default ``tvm_callback_cuda_compile`` (nvcc / nvrtc); forget binaries."""
    import tvm_ffi
    from tvm.support import nvcc

    _REGISTRY.clear()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", nvcc.tvm_callback_cuda_compile,
                                 override=True)
