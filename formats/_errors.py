"""Errors raised while reading a checkpoint file.

The root of the project's exception tree, :class:`CkptdError`, lives here because
``formats`` is the lowest layer: every other layer derives its errors from it, and
``ckptd`` re-exports the whole tree (see ``ckptd.engine._exceptions`` for the picture).
"""

from __future__ import annotations

import io


class CkptdError(Exception):
    """Base class of every error ckptd raises on purpose."""


class CheckpointError(CkptdError):
    """The input is not a checkpoint ckptd can read (garbage, truncated, hostile, wrong format).

    The message names the file and what is wrong with it. ``CheckpointError(name, problem)``
    says it in two parts; ``CheckpointError(message)``, the one shape every ckptd error
    accepts, takes a message that names the file already (a daemon's error, rebuilt by
    the client).

    >>> str(CheckpointError("a.pt", "truncated")), str(CheckpointError("a.pt: truncated"))
    ('a.pt: truncated', 'a.pt: truncated')
    """

    def __init__(self, name: str, problem: str | None = None) -> None:
        self.name = name if problem is not None else ""
        self.problem = problem if problem is not None else name
        super().__init__(f"{name}: {problem}" if problem is not None else name)


class UnsupportedFormatError(CheckpointError):
    """A well-formed file in a format or variant ckptd does not read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a :class:`FileNotFoundError`, as in torch.load)."""


class NotSeekableError(CkptdError, io.UnsupportedOperation):
    """A file-like input whose ``seek``/``tell`` refuse (also :class:`io.UnsupportedOperation`,
    with torch.load's message)."""


class NotFileLikeError(CkptdError, AttributeError):
    """An input that is no path, no bytes and no file-like object: it lacks ``seek``, ``tell``
    or ``read`` (also :class:`AttributeError`, as torch.load raises, with its message).

    An error cannot be both this and :class:`NotSeekableError`: Python cannot derive one
    class from both :class:`OSError` and :class:`AttributeError`.
    """


class TensorNotFoundError(CkptdError, LookupError):
    """A selected tensor name is not in the checkpoint; the message lists near matches."""
