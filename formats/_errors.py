"""Errors raised while reading a checkpoint file.

The root of the project's exception tree, :class:`CkptdError`, lives here because
``formats`` is the lowest layer: every other layer derives its errors from it, and
``ckptd`` re-exports the whole tree (see ``ckptd._exceptions`` for the picture).
"""

from __future__ import annotations

import io


class CkptdError(Exception):
    """Base class of every error ckptd raises on purpose."""


class CheckpointError(CkptdError):
    """The input is not a checkpoint ckptd can read (garbage, truncated, hostile, wrong format).

    The message names the file and what is wrong with it.
    """

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")


class UnsupportedFormatError(CheckpointError):
    """A well-formed file in a format or variant ckptd does not read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a :class:`FileNotFoundError`, as in torch.load)."""


class NotSeekableError(CkptdError, io.UnsupportedOperation):
    """A file-like input that cannot seek (also :class:`io.UnsupportedOperation`, as in torch.load)."""


class TensorNotFoundError(CkptdError, LookupError):
    """A selected tensor name is not in the checkpoint; the message lists near matches."""
