"""Target parsing: every accepted form, and clear errors for the rest."""

import pytest
import tvm

from attnforge.errors import TargetError
from attnforge.target import can_run_here, gpu_arch, parse_target, target_tag


def test_cpu_aliases_detect_host_cpu():
    for spec in ("llvm", "cpu", " LLVM "):
        t = parse_target(spec)
        assert t.kind.name == "llvm"
        assert t.attrs["mcpu"] == str(tvm.target.codegen.llvm_get_system_cpu())
        assert can_run_here(t)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_cuda_arch_strings(arch):
    t = parse_target(f"cuda:{arch}")
    assert t.kind.name == "cuda" and t.attrs["arch"] == arch
    assert t.host is not None and t.host.kind.name == "llvm"
    assert target_tag(t) == f"cuda-{arch}"


def test_dict_and_target_objects_pass_through():
    t = parse_target({"kind": "cuda", "arch": "sm_80"})
    assert t.attrs["arch"] == "sm_80"
    assert parse_target(t) is t


def test_plain_cuda_without_gpu_asks_for_arch():
    if gpu_arch() is not None:
        assert parse_target("cuda").kind.name == "cuda"
        return
    with pytest.raises(TargetError, match="cuda:sm_90"):
        parse_target("cuda")


@pytest.mark.parametrize("bad", ["tpu", "cuda -arch=sm_90", "cuda:90", 42, {"kind": "nope"}])
def test_unknown_targets_are_rejected_clearly(bad):
    with pytest.raises(TargetError, match="target"):
        parse_target(bad)
