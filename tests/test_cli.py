"""The attnforge command line: compile -> inspect -> run, demo, and errors."""

import os
import subprocess
import sys

import pytest

from attnforge.cli import main


def test_compile_inspect_run(tmp_path, capsys):
    out = str(tmp_path / "llama.afm")
    assert main(["compile", "llama", "--seq-len", "40", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "verification: PASSED" in text and "attention #0" in text
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "llvm-" in text and "input_ids" in text
    assert main(["run", out, "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "output[0]: shape=[1, 40, 1000]" in text and "median latency" in text


def test_no_tuning_logs_flag(capsys):
    assert main(["compile", "gpt2", "--seq-len", "24", "--no-tuning-logs"]) == 0
    assert "tuning: tuning_logs=False: default schedules" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["compile", "no_such_model"]) == 2
    assert "neither a built-in" in capsys.readouterr().err
    assert main(["compile", "gpt2", "--target", "tpu"]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_factory_spec(tmp_path, capsys):
    mod = tmp_path / "my_factory.py"
    mod.write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()), "
        "(torch.randn(2, 4),)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["compile", "my_factory:make"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert "verification: PASSED" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_demo():
    exe = os.path.join(os.path.dirname(sys.executable), "attnforge")
    r = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "speed-up vs eager" in r.stdout


def test_small_demo_runs(capsys):
    from attnforge.demo import run_demo

    assert run_demo(seq_len=32, hidden=32, layers=1, heads=2) == 0
    out = capsys.readouterr().out
    assert "verification: PASSED" in out and "max abs error after reload" in out
