"""attnforge: TVM passes and schedules that make transformer attention fast.

``compile_model`` needs torch; ``load`` and the runtime do not (deployment boxes).
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArtifactError,
    AttnforgeError,
    InputError,
    TargetError,
    VerificationError,
)


def compile_model(model, example_inputs, **kwargs):
    """Compile a PyTorch model; see :func:`attnforge.compiler.compile_model`."""
    from .compiler import compile_model as _compile

    return _compile(model, example_inputs, **kwargs)


def compile_generator(hf_causal_lm, **kwargs):
    """Compiled prefill + paged-KV decode; see :func:`attnforge.generation.compile_generator`."""
    from .generation import compile_generator as _compile_generator

    return _compile_generator(hf_causal_lm, **kwargs)


def load(path: str, device: str | None = None, allow_source_fallback: bool = False):
    """Load an exported artifact; see :func:`attnforge.artifact.load_artifact`."""
    from .artifact import load_artifact

    return load_artifact(path, device=device, allow_source_fallback=allow_source_fallback)


def __getattr__(name):
    # Frontend errors live in attnforge.frontends (the API package sits above it).
    if name in ("FrontendError", "UnsupportedOpError"):
        from .frontends import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'attnforge' has no attribute {name!r}")


__all__ = [
    "FrontendError",
    "UnsupportedOpError",
    "compile_generator",
    "compile_model",
    "load",
    "AttnforgeError",
    "ArtifactError",
    "InputError",
    "TargetError",
    "VerificationError",
]
