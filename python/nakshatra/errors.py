"""Errors Nakshatra raises. Every one carries a message that names the thing at fault and the fix.

The CLI turns a :class:`NakError` into one red line and exit code 1 (a traceback only with
``--debug``); anything else is a bug.
"""

from __future__ import annotations


class NakError(Exception):
    """Base class: a user-facing error whose message names the thing at fault and the fix."""


class RangeError(NakError, ValueError):
    """A layer range is malformed, out of range, or ranges leave a gap or overlap."""


class SliceError(NakError):
    """A GGUF cannot be sliced (not a GGUF, unsupported architecture, unwritable output, ...)."""


class ModelError(NakError):
    """A model cannot be fetched, found or verified (sha256 mismatch, unknown name, ...)."""


class ChainError(NakError):
    """A chain of stages is not usable: gap, overlap, mixed models, unreachable stage, ..."""


class StageError(NakError):
    """A stage answered a request with an error frame (code and message from the stage)."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class BuildError(NakError):
    """The extension cannot be (re)built for the requested backend (missing toolkit, ...)."""
