"""Export/load: self-contained artifacts, checksums, target fit, torch-free loading."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import attnforge
from attnforge.artifact import LIB, MANIFEST
from attnforge.errors import ArtifactError


@pytest.fixture()
def artifact(tmp_path, compiled_gpt2):
    return compiled_gpt2.export(str(tmp_path / "gpt2.afm"))


def test_manifest_contents(artifact, compiled_gpt2):
    m = json.loads(open(os.path.join(artifact, MANIFEST)).read())
    assert m["format"] == "attnforge-artifact/1"
    assert m["versions"]["tvm"] and m["versions"]["torch"] and m["versions"]["attnforge"]
    assert m["inputs"] == compiled_gpt2.input_specs
    assert m["target"]["kind"] == "llvm"
    assert m["report"]["verification"]["passed"]
    assert set(m["files"]) == {LIB} and len(m["files"][LIB]) == 64


def test_loaded_artifact_matches_eager(artifact, tiny_gpt2):
    model, (ids,) = tiny_gpt2
    cm = attnforge.load(artifact)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(cm(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert cm.report["attention"] and cm.artifact_path == artifact


def test_tampered_library_is_refused(artifact):
    with open(os.path.join(artifact, LIB), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        attnforge.load(artifact)


def test_tampered_or_missing_manifest_is_refused(artifact):
    mpath = os.path.join(artifact, MANIFEST)
    text = open(mpath).read()
    open(mpath, "w").write(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        attnforge.load(artifact)
    os.remove(mpath)
    with pytest.raises(ArtifactError, match="missing"):
        attnforge.load(artifact)
    with pytest.raises(ArtifactError, match="not an attnforge artifact"):
        attnforge.load(os.path.join(artifact, "nope"))


def test_wrong_device_is_refused(artifact):
    with pytest.raises(ArtifactError, match="not CUDA"):
        attnforge.load(artifact, device="cuda")
    m = json.loads(open(os.path.join(artifact, MANIFEST)).read())
    m["host_isa"].append("avx10.9-imaginary")
    open(os.path.join(artifact, MANIFEST), "w").write(json.dumps(m))
    with pytest.raises(ArtifactError, match="this CPU lacks"):
        attnforge.load(artifact)


def test_failed_export_keeps_previous_artifact(artifact, compiled_gpt2, monkeypatch):
    before = open(os.path.join(artifact, MANIFEST)).read()

    class Boom(RuntimeError):
        pass

    def crash(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(type(compiled_gpt2.executable), "export_library", crash)
    with pytest.raises(Boom):
        compiled_gpt2.export(artifact)
    assert open(os.path.join(artifact, MANIFEST)).read() == before
    assert not [p for p in os.listdir(os.path.dirname(artifact)) if ".tmp-" in p]
    attnforge.load(artifact)


def test_reexport_of_loaded_artifact(artifact, tmp_path, tiny_gpt2):
    cm = attnforge.load(artifact)
    again = attnforge.load(cm.export(str(tmp_path / "copy.afm")))
    ids = tiny_gpt2[1][0]
    torch.testing.assert_close(again(ids).logits, cm(ids).logits)


def test_load_and_run_without_torch(artifact, tiny_gpt2):
    """A deployment box has TVM and numpy only: block torch and run from numpy."""
    model, (ids,) = tiny_gpt2
    np.save(os.path.join(artifact, "..", "ids.npy"), ids.numpy())
    with torch.no_grad():
        np.save(os.path.join(artifact, "..", "ref.npy"), model(ids).logits.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any torch import now fails
        import numpy as np, attnforge
        cm = attnforge.load({artifact!r})
        out = cm(np.load({artifact!r} + "/../ids.npy"))
        assert isinstance(out, dict) and list(out) == ["logits"], out.keys()
        err = np.abs(out["logits"] - np.load({artifact!r} + "/../ref.npy")).max()
        assert err < 1e-4, err
        print("OK", err)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_cuda_artifact_carries_gpu_binaries(tmp_path):
    """A CUDA artifact holds an nvcc-built fatbin per arch, checksummed; loading it needs a
    GPU of a listed arch and says so clearly otherwise."""
    from attnforge import cuda_aot
    from attnforge.target import gpu_arch

    if cuda_aot.find_cuda_tool("nvcc") is None:
        pytest.skip("nvcc not installed: cannot build ahead-of-time GPU binaries")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()).eval()
    cm = attnforge.compile_model(model, (torch.randn(4, 32),), target="cuda:sm_80")
    path = cm.export(str(tmp_path / "mlp.afm"), gpu_archs=("sm_80", "sm_90"))
    m = json.loads(open(os.path.join(path, MANIFEST)).read())
    assert m["cuda_binaries"]["archs"] == ["sm_80", "sm_90"]
    fatbins = [f for f in m["files"] if f.endswith(".fatbin")]
    assert fatbins and all(f.startswith("cuda_bin/") for f in fatbins)
    for f in fatbins:
        assert cuda_aot.is_fatbin(open(os.path.join(path, f), "rb").read())
    with pytest.raises(ArtifactError, match="not CUDA|load it with device='cuda'"):
        attnforge.load(path, device="cpu")
    if gpu_arch() is None:
        with pytest.raises(ArtifactError, match="none is visible"):
            attnforge.load(path)
    with open(os.path.join(path, fatbins[0]), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        attnforge.load(path)
