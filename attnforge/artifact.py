"""Deployable artifacts: ``cm.export(path)`` and ``attnforge.load(path)``.

An artifact is a directory::

    model.afm/
      lib.so          TVM library (Relax VM executable + kernels), built by export_library
      manifest.json   format, versions, target, input/output signature, the compile report,
                      quantization parameters (int8), and the sha256 of every other file
      cuda_bin/       (CUDA targets) nvcc-built fatbins of every kernel source, per arch,
                      so the deployment box needs neither nvcc nor NVRTC (attnforge.cuda_aot)

Writing is atomic (a temporary directory renamed into place), so a crash never leaves a
half-written artifact or destroys the previous one at that path.  Loading verifies every
checksum and that the target fits this machine before any code is loaded.  No torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import tvm

from . import __version__
from .errors import ArtifactError
from .runtime import CompiledModel
from .target import gpu_arch, host_target

FORMAT = "attnforge-artifact/1"
LIB = "lib.so"
MANIFEST = "manifest.json"
CUDA_BIN = "cuda_bin"
# ISA feature prefixes compared between the artifact's CPU target and this host.
_ISA_PREFIXES = ("sse", "avx", "fma", "f16c", "bmi", "amx", "vnni", "popcnt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _isa_features(target: tvm.target.Target) -> set[str]:
    feats = tvm.target.codegen.llvm_get_cpu_features(target)
    return {f for f in feats if f.startswith(_ISA_PREFIXES)}


def _versions() -> dict:
    import numpy

    v = {"attnforge": __version__, "tvm": tvm.__version__, "numpy": numpy.__version__}
    try:
        import torch

        v["torch"] = torch.__version__
    except ImportError:
        v["torch"] = None
    return v


def _write_gpu_binaries(cm: CompiledModel, tmp: Path, archs) -> dict | None:
    """Build (or copy, for a loaded artifact) the AOT fatbins; returns the manifest entry."""
    if cm.target.kind.name != "cuda":
        return None
    from . import cuda_aot

    if cm.artifact_path is not None:
        src = Path(cm.artifact_path) / CUDA_BIN
        if not src.is_dir():
            return None
        shutil.copytree(src, tmp / CUDA_BIN)
        bins = cuda_aot.load_binaries(tmp / CUDA_BIN)
    else:
        archs = tuple(archs or (cm.target.attrs["arch"],))
        bins = cuda_aot.build_gpu_binaries(cm.executable, archs)
        cuda_aot.save_binaries(bins, tmp / CUDA_BIN)
    found = sorted({a for per_arch in bins.values() for a in per_arch})
    return {"dir": CUDA_BIN, "archs": found, "kernels_sources": len(bins)}


def export_artifact(cm: CompiledModel, path: str, gpu_archs=None) -> str:
    """Write ``cm`` to the directory ``path`` atomically; returns the path.

    For CUDA targets ``gpu_archs`` (default: the target's arch) selects the archs whose
    binaries are built with nvcc and stored beside the library.
    """
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if cm.artifact_path is not None:  # re-export of a loaded artifact: copy its library
            shutil.copy2(Path(cm.artifact_path) / LIB, tmp / LIB)
        else:
            cm.executable.export_library(str(tmp / LIB))
        cuda_bins = _write_gpu_binaries(cm, tmp, gpu_archs)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file()}
        host = cm.target.host if cm.target.kind.name == "cuda" else cm.target
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "target": json.loads(str(cm.target)),
            "target_tag": cm.report.get("target_tag"),
            "host_isa": sorted(_isa_features(host)) if host is not None else [],
            "inputs": cm.input_specs,
            "outputs": cm.output_desc,
            "report": cm.report,
            # precision="int8": calibration method, per-site scales, excluded layers
            "quantization": cm.report.get("quantization"),
            "cuda_binaries": cuda_bins,
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dest)


def read_manifest(path: str) -> dict:
    """Parse and checksum-verify an artifact's manifest; raises ArtifactError."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{path}: not an attnforge artifact directory (cm.export writes one)")
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{mpath}: missing; the artifact is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e}); the artifact is corrupt") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, this attnforge reads "
                            f"{FORMAT!r}; re-export the model with this version")
    files = manifest.get("files") or {}
    if LIB not in files:
        raise ArtifactError(f"{mpath}: lists no {LIB}; the artifact is corrupt")
    for name, digest in files.items():
        fpath = root / name
        if not fpath.is_file():
            raise ArtifactError(f"{fpath}: missing from the artifact")
        if _sha256(fpath) != digest:
            raise ArtifactError(f"{fpath}: sha256 does not match the manifest; the file was "
                                "modified or corrupted. Re-export the model; do not load it")
    return manifest


def _check_fits(manifest: dict, device: str, path: str) -> None:
    target = manifest["target"]
    kind = target.get("kind")
    if device.startswith("cuda"):
        if kind != "cuda":
            raise ArtifactError(f"{path} was built for {manifest.get('target_tag')}, not CUDA; "
                                "load it with device='cpu'")
        arch = gpu_arch()
        if arch is None:
            raise ArtifactError(f"{path} needs a CUDA GPU ({target.get('arch')}) and none is "
                                "visible here")
        bins = manifest.get("cuda_binaries") or {}
        archs = bins.get("archs") or [target.get("arch")]
        if arch not in archs:
            raise ArtifactError(f"{path} holds GPU code for {archs} but this GPU is {arch}; "
                                f"export with gpu_archs including '{arch}' or compile with "
                                f"target='cuda:{arch}'")
        return
    if kind != "llvm":
        raise ArtifactError(f"{path} was built for {manifest.get('target_tag')}; load it with "
                            f"device='{kind}' on a machine that has one")
    missing = set(manifest.get("host_isa", [])) - _isa_features(host_target())
    if missing:
        raise ArtifactError(f"{path} was built for CPU {target.get('mcpu')} and uses "
                            f"{sorted(missing)}, which this CPU lacks; recompile here")


def load_artifact(path: str, device: str | None = None,
                  allow_source_fallback: bool = False) -> CompiledModel:
    """Load an exported artifact after verifying checksums and target fit.

    ``device``: ``"cpu"`` or ``"cuda"`` (default: the artifact's own target kind).
    ``allow_source_fallback``: for CUDA artifacts, compile kernel sources on this machine
    (nvcc/NVRTC) when no stored binary fits, instead of failing.
    """
    manifest = read_manifest(path)
    kind = manifest["target"].get("kind")
    device = (device or ("cuda" if kind == "cuda" else "cpu")).lower()
    if device not in ("cpu", "llvm", "cuda") and not device.startswith("cuda:"):
        raise ArtifactError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    _check_fits(manifest, "cpu" if device == "llvm" else device, path)
    if device.startswith("cuda") and manifest.get("cuda_binaries"):
        from . import cuda_aot

        cuda_aot.install_aot_callback(
            cuda_aot.load_binaries(Path(path) / manifest["cuda_binaries"]["dir"]),
            allow_source_fallback=allow_source_fallback)
    lib = tvm.runtime.load_module(str(Path(path) / LIB))
    target = tvm.target.Target(manifest["target"])
    dev = tvm.cuda(int(device.split(":")[1]) if ":" in device else 0) if device.startswith(
        "cuda") else tvm.cpu(0)
    cm = CompiledModel(lib, target, manifest["inputs"], manifest["outputs"],
                       manifest["report"], device=dev)
    cm.artifact_path = str(path)
    return cm
