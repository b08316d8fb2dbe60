"""AOT CUDA binaries: extraction from a built Relax module, nvcc fatbins, the load callback."""

import pytest

from attnforge import cuda_aot

pytestmark = pytest.mark.skipif(cuda_aot.find_cuda_tool("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def executable():
    import tvm
    import tvm.s_tir.dlight as dl
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((64, 64), "float16"), y: R.Tensor((64, 64), "float16")):
            with R.dataflow():
                z = R.nn.relu(R.matmul(x, y))
                R.output(z)
            return z

    tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    with tgt:
        mod = relax.get_pipeline("zero")(Mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return tvm.compile(mod, target=tgt)


@pytest.fixture(scope="module")
def binaries(executable):
    return cuda_aot.build_gpu_binaries(executable, archs=("sm_80", "sm_90"))


@pytest.fixture
def restore_callback():
    yield
    cuda_aot.uninstall_aot_callback()


def _callback():
    import tvm_ffi

    return tvm_ffi.get_global_func("tvm_callback_cuda_compile")


def test_sources_extracted(executable):
    srcs = cuda_aot.cuda_sources(executable)
    assert len(srcs) == 1 and "__global__" in srcs[0]
    assert cuda_aot.cuda_sources(executable.mod) == srcs


def test_fatbins_valid(binaries, tmp_path):
    (key, per_arch), = binaries.items()
    assert len(key) == 64 and set(per_arch) == {"sm_80", "sm_90"}
    for arch, data in per_arch.items():
        assert cuda_aot.is_fatbin(data), arch
        listed = cuda_aot.fatbin_archs(data)
        if listed is not None:  # cuobjdump available
            assert listed == [arch]
    back = cuda_aot.load_binaries(cuda_aot.save_binaries(binaries, tmp_path / "bins"))
    assert back == binaries


def test_callback_serves_prebuilt(executable, binaries, restore_callback):
    src = cuda_aot.cuda_sources(executable)[0]
    cuda_aot.install_aot_callback(binaries, arch="sm_90")
    assert bytes(_callback()(src)) == binaries[cuda_aot.source_key(src)]["sm_90"]
    cuda_aot.install_aot_callback(binaries, arch="sm_86")  # sm_80 SASS runs on sm_86
    assert bytes(_callback()(src)) == binaries[cuda_aot.source_key(src)]["sm_80"]


def test_callback_fails_clearly(executable, binaries, restore_callback):
    src = cuda_aot.cuda_sources(executable)[0]
    cuda_aot.install_aot_callback(binaries, arch="sm_90")
    with pytest.raises(Exception, match="no prebuilt CUDA binary for this kernel source"):
        _callback()(src + "\n// changed")
    cuda_aot.install_aot_callback(binaries, arch="sm_75")
    with pytest.raises(Exception, match="no prebuilt CUDA binary for arch sm_75"):
        _callback()(src)


def test_callback_merges_artifacts(executable, binaries, restore_callback):
    src = cuda_aot.cuda_sources(executable)[0]
    cuda_aot.install_aot_callback(binaries, arch="sm_90")
    cuda_aot.install_aot_callback({"0" * 64: {"sm_90": b"other"}}, arch="sm_90")
    assert bytes(_callback()(src)) == binaries[cuda_aot.source_key(src)]["sm_90"]


def test_callback_source_fallback(executable, restore_callback):
    src = cuda_aot.cuda_sources(executable)[0]
    cuda_aot.install_aot_callback({}, allow_source_fallback=True, arch="sm_90")
    assert cuda_aot.is_fatbin(bytes(_callback()(src)))


def test_exported_library_carries_the_hashed_source(executable, tmp_path):
    """The runtime hands the module's stored source to the callback: the key must match it."""
    executable.export_library(str(tmp_path / "lib.so"))
    blob = (tmp_path / "lib.so").read_bytes()
    (src,) = cuda_aot.cuda_sources(executable)
    assert src.encode("utf-8") in blob
