"""CompiledModel: a built Relax VM module that takes and returns torch tensors or numpy arrays.

This module imports no torch at module level: a loaded artifact runs where only TVM and numpy
are installed (numpy arrays in, numpy arrays out).  With torch tensors in, outputs are torch
tensors (zero-copy through DLPack) rebuilt into the eager model's output structure.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax

from .errors import InputError

__all__ = ["CompiledModel"]


def _is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class CompiledModel:
    """A compiled model: call it like the eager model.

    Returns, for torch inputs: the same structure as the eager model (a tensor, a tuple, or the
    Hugging Face output object such as ``CausalLMOutputWithPast``) when the output structure is
    known in this process or can be restored from the artifact; otherwise (numpy inputs, or no
    torch) a single array, a tuple of arrays, or a dict ``{field: array}`` for HF outputs.
    """

    def __init__(self, executable, target: tvm.target.Target, input_specs: list[dict],
                 output_desc: dict, report: dict, output_spec=None, device=None):
        self.executable = executable
        self.target = target
        self.input_specs = [dict(s, shape=list(s["shape"])) for s in input_specs]
        self.output_desc = output_desc
        self.report = report
        self._output_spec = output_spec
        self._device = device
        self._vm = None
        self.artifact_path: str | None = None  # set when loaded from an exported artifact

    # ----------------------------------------------------------------- running
    @property
    def device(self) -> tvm.runtime.Device:
        if self._device is None:
            self._device = tvm.cuda(0) if self.target.kind.name == "cuda" else tvm.cpu(0)
        return self._device

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            if self.target.kind.name == "cuda" and not self.device.exist:
                raise RuntimeError(
                    f"this model was built for {self.report.get('target_tag', 'cuda')} but no "
                    "GPU is visible here; export it (cm.export(path)) and load it on a GPU "
                    "machine, or compile with target='llvm' to run on this CPU")
            self._vm = relax.VirtualMachine(self.executable, self.device)
        return self._vm

    def __call__(self, *inputs):
        return self.run(*inputs)

    def run(self, *inputs):
        """Run on torch tensors or numpy arrays (positional, as in ``example_inputs``)."""
        as_torch = any(_is_torch_tensor(x) for x in inputs)
        return self._rebuild(self.run_flat(*inputs), as_torch)

    def run_flat(self, *inputs) -> list:
        """Run and return the flat list of outputs (torch tensors for torch inputs)."""
        self._check_inputs(inputs)
        as_torch = any(_is_torch_tensor(x) for x in inputs)
        out = self.vm["main"](*[self._to_tvm(x) for x in inputs])
        flat = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        if as_torch:
            import torch

            return [torch.from_dlpack(t) for t in flat]
        return [t.numpy() for t in flat]

    def _to_tvm(self, x):
        if _is_torch_tensor(x):
            x = x.detach()
            if x.device.type != self.device_type_torch():
                raise InputError(f"input on {x.device} but the model runs on {self.device}; "
                                 f"move it with .to('{self.device_type_torch()}')")
            return tvm.runtime.from_dlpack(x.contiguous())
        return tvm.runtime.tensor(np.ascontiguousarray(x), self.device)

    def device_type_torch(self) -> str:
        return "cuda" if self.target.kind.name == "cuda" else "cpu"

    def _check_inputs(self, inputs: Sequence[Any]) -> None:
        specs = self.input_specs
        if len(inputs) != len(specs):
            names = ", ".join(s["name"] for s in specs)
            raise InputError(f"expected {len(specs)} input(s) ({names}), got {len(inputs)}")
        sym: dict[str, int] = {}
        for x, spec in zip(inputs, specs):
            name = spec["name"]
            if not (_is_torch_tensor(x) or isinstance(x, np.ndarray)):
                raise InputError(f"input {name!r} must be a torch.Tensor or numpy array, "
                                 f"got {type(x).__name__}")
            dtype = str(x.dtype).replace("torch.", "")
            if dtype != spec["dtype"]:
                raise InputError(f"input {name!r} has dtype {dtype}, the model was compiled for "
                                 f"{spec['dtype']}; convert it first")
            shape = tuple(int(d) for d in x.shape)
            want = spec["shape"]
            if len(shape) != len(want):
                raise InputError(f"input {name!r} has shape {list(shape)}, expected rank "
                                 f"{len(want)} {want}")
            for i, (got, exp) in enumerate(zip(shape, want)):
                if isinstance(exp, int):
                    if got != exp:
                        raise InputError(
                            f"input {name!r} has shape {list(shape)}, the model was compiled for "
                            f"{want} (dim {i} must be {exp}); recompile with dynamic_shapes= "
                            "to accept other sizes")
                elif sym.setdefault(exp, got) != got:
                    raise InputError(f"input {name!r} dim {i} ({exp}) is {got}, but another "
                                     f"input set {exp}={sym[exp]}")

    def _rebuild(self, flat: list, as_torch: bool):
        desc = self.output_desc
        if as_torch:
            spec = self._output_spec
            if spec is None and desc.get("treespec"):
                try:
                    from torch.utils import _pytree

                    spec = self._output_spec = _pytree.treespec_loads(desc["treespec"])
                except Exception:
                    spec = None
            if spec is not None:
                from torch.utils import _pytree

                return _pytree.tree_unflatten(flat, spec)
        from attnforge.frontends.output_desc import unflatten_outputs  # torch-free

        return unflatten_outputs(desc, flat)

    # ----------------------------------------------------------------- deployment
    def export(self, path: str, gpu_archs=None) -> str:
        """Write a self-contained artifact directory (see :mod:`attnforge.artifact`).

        CUDA models carry nvcc-built binaries for ``gpu_archs`` (default: the target's arch).
        """
        from .artifact import export_artifact

        return export_artifact(self, path, gpu_archs=gpu_archs)

    def __repr__(self) -> str:
        n = len(self.report.get("attention", []))
        return (f"CompiledModel(target={self.report.get('target_tag')}, inputs="
                f"{[(s['name'], s['shape'], s['dtype']) for s in self.input_specs]}, "
                f"attention_sites={n})")
