"""``attnforge generate``: streams the requested number of tokens and reports timings;
clear errors for non-decoder models and bad prompts."""

from attnforge.cli import main


def test_generate_streams_tokens_and_timings(capsys):
    rc = main(["generate", "gpt2", "--prompt", "5,17,42", "--max-new-tokens", "4",
               "--hidden", "32", "--layers", "1", "--max-seq-len", "64", "--no-verify"])
    out, err = capsys.readouterr()
    assert rc == 0
    tokens = out.split()
    assert len(tokens) == 4 and all(0 <= int(t) < 1000 for t in tokens)
    assert "time to first token" in err and "tokens/s" in err
    assert "prompt (3 tokens): [5, 17, 42]" in err


def test_generate_errors(capsys):
    assert main(["generate", "bert"]) == 2
    assert "not a built-in decoder" in capsys.readouterr().err
    assert main(["generate", "gpt2", "--prompt", "1,x", "--layers", "1", "--hidden", "32"]) == 2
    assert "--prompt must be comma-separated integers" in capsys.readouterr().err


def test_generate_precision_and_sparsity_flags(capsys):
    rc = main(["generate", "llama", "--prompt-len", "20", "--max-new-tokens", "3",
               "--hidden", "32", "--layers", "1", "--max-seq-len", "64",
               "--precision", "bfloat16", "--sparsity", "window:8"])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.split()) == 3
    assert "(bfloat16, SlidingWindow(8, causal))" in err
    assert "accuracy vs Hugging Face fp32 eager: prefill logits cosine" in err
    assert main(["generate", "llama", "--sparsity", "bigbird:3", "--layers", "1"]) == 2
    assert "--sparsity 'bigbird:3': use window:W" in capsys.readouterr().err
