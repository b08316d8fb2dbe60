"""Exceptions raised by attnforge's public API.

Every error names what was wrong (the op, argument, file or target) and what to do about it.
Frontend errors are defined in :mod:`attnforge.frontends.errors` and re-exported here.
"""

from __future__ import annotations


class AttnforgeError(Exception):
    """Base class of attnforge's errors."""


class TargetError(AttnforgeError, ValueError):
    """An unknown or unusable compilation target / device."""


class InputError(AttnforgeError, ValueError):
    """Inputs given to a compiled model do not match its signature."""


class VerificationError(AttnforgeError):
    """The compiled model's output differs from eager PyTorch beyond the tolerance."""

    def __init__(self, message: str, verification: dict | None = None):
        super().__init__(message)
        self.verification = verification or {}


class ArtifactError(AttnforgeError):
    """An exported artifact is missing, tampered with, or does not fit this device."""
