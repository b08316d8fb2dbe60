"""attnforge.frontends: PyTorch -> Relax import (torch.export + TVM's importer + our fixes).

``import_torch_model`` and ``ImportedModel`` load torch lazily, so the torch-free parts
(:mod:`.errors`, :mod:`.output_desc`) stay importable on deployment machines without torch.
"""

from .errors import FrontendError, UnsupportedOpError
from .output_desc import describe_treespec, unflatten_outputs

__all__ = [
    "FrontendError",
    "ImportedModel",
    "UnsupportedOpError",
    "describe_treespec",
    "import_torch_model",
    "unflatten_outputs",
]


def __getattr__(name):
    if name in ("import_torch_model", "ImportedModel"):
        from . import torch_import

        return getattr(torch_import, name)
    raise AttributeError(f"module 'attnforge.frontends' has no attribute {name!r}")
