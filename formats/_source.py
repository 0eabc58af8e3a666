"""Positional, thread-safe access to a checkpoint's bytes, whatever form it came in.

torch.load accepts a path or a binary file-like object; ckptd also takes ``bytes``.
Every form becomes a :class:`Source` whose :meth:`Source.readinto` fills a buffer from an
absolute offset, so reader threads can fetch different storages at once.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from types import TracebackType
from typing import IO, Union

from ._errors import CheckpointError, CheckpointNotFoundError, NotFileLikeError, NotSeekableError

FileLike = Union[str, "os.PathLike[str]", IO[bytes], bytes, bytearray, memoryview]

# torch.load's own words for a stream it cannot seek (torch/serialization.py, _check_seekable),
# appended to the error seek or tell raised.
_NOT_SEEKABLE = (
    ". You can only torch.load from a file that is seekable. Please pre-load the data into "
    "a buffer like io.BytesIO and try to load from it instead."
)


# A directory that is not a Hugging Face model directory (see checkpoint_in_directory).
_DIRECTORY = (
    "is a directory, not a checkpoint file (nor a Hugging Face model directory: "
    "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)"
)


class Source:
    """A readable, sized byte source. Use :func:`open_source`; close it (or use ``with``)."""

    name: str
    size: int
    path: str | None = None
    start: int = 0  # where a caller's file-like object stood when opened (reads are relative to it)
    stream: IO[bytes] | None = None  # the caller's file-like object, if one was given

    def settle(self, end: int | None) -> None:
        """Leave the caller's stream where torch.load would: ``end`` bytes past its start.

        torch.load reads a checkpoint from the stream's position and leaves it after the
        last bytes it read, so several objects written one after another read back in order.
        """
        if self.stream is not None and end is not None:
            self.stream.seek(self.start + end)

    def readinto(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` exactly with the bytes at ``offset``; a short read is an error."""
        raise NotImplementedError

    def read(self, offset: int, nbytes: int) -> bytes:
        """Return exactly ``nbytes`` bytes from ``offset``."""
        out = bytearray(nbytes)
        self.readinto(memoryview(out), offset)
        return bytes(out)

    def fileno(self) -> int | None:
        """The OS file descriptor positional reads go to, or ``None`` for in-memory sources."""
        return None

    def close(self) -> None:
        """Release what the source opened itself (never a caller's file)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_span(self, offset: int, nbytes: int) -> None:
        if offset < 0 or offset + nbytes > self.size:
            raise CheckpointError(
                self.name,
                f"needs {nbytes} bytes at offset {offset} but the file has {self.size}: truncated",
            )


class FileSource(Source):
    """A file descriptor read with ``os.preadv`` (the GIL is released while the kernel copies)."""

    def __init__(self, fd: int, name: str, *, base: int = 0, owned: bool, path: str | None = None):
        self._fd = fd
        self._base = self.start = base
        self._owned = owned
        self.name = name
        self.path = path
        self.size = os.fstat(fd).st_size - base

    def readinto(self, buffer: memoryview, offset: int) -> None:
        self._check_span(offset, len(buffer))
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], self._base + offset + done)
            if got == 0:
                raise CheckpointError(self.name, f"file shrank while reading at offset {offset + done}")
            done += got

    def fileno(self) -> int | None:
        return self._fd

    def send(self, out_fd: int, offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``offset`` to ``out_fd``'s position inside the kernel (``sendfile``)."""
        self._check_span(offset, nbytes)
        done = 0
        while done < nbytes:
            sent = os.sendfile(out_fd, self._fd, self._base + offset + done, nbytes - done)
            if sent == 0:
                raise CheckpointError(self.name, f"file shrank while reading at offset {offset + done}")
            done += sent

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BufferSource(Source):
    """Bytes already in memory (``bytes``, ``bytearray``, ``io.BytesIO``)."""

    def __init__(self, data: bytes | bytearray | memoryview, name: str):
        self._view = memoryview(data).cast("B")
        self.name = name
        self.size = len(self._view)

    def readinto(self, buffer: memoryview, offset: int) -> None:
        self._check_span(offset, len(buffer))
        buffer[:] = self._view[offset : offset + len(buffer)]

    def close(self) -> None:
        self._view.release()


class StreamSource(Source):
    """A seekable file-like object without a descriptor: one reader at a time, under a lock."""

    def __init__(self, stream: IO[bytes], name: str):
        self._stream = stream
        self._base = self.start = stream.tell()
        self._lock = threading.Lock()
        self.name = name
        self.size = stream.seek(0, io.SEEK_END) - self._base
        stream.seek(self._base)

    def readinto(self, buffer: memoryview, offset: int) -> None:
        self._check_span(offset, len(buffer))
        with self._lock:
            self._stream.seek(self._base + offset)
            done = 0
            while done < len(buffer):
                got = self._read_some(buffer[done:])
                if not got:
                    raise CheckpointError(self.name, f"stream ended early at offset {offset + done}")
                done += got

    def _read_some(self, buffer: memoryview) -> int:
        """One read straight into ``buffer`` (``readinto``, as torch uses), else a copied ``read``."""
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:
            return int(readinto(buffer) or 0)
        chunk = self._stream.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def open_source(f: FileLike) -> Source:
    """Open any input torch.load accepts (and ``bytes``) for positional reads.

    >>> with open_source(b"hello") as src:
    ...     src.read(1, 3)
    b'ell'
    """
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(path, "no such file") from exc
        except IsADirectoryError as exc:
            raise CheckpointError(path, _DIRECTORY) from exc
        except OSError as exc:
            raise CheckpointError(path, f"cannot open: {exc.strerror}") from exc
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(path, _DIRECTORY)
        return FileSource(fd, path, owned=True, path=os.path.realpath(path))
    if isinstance(f, (bytes, bytearray, memoryview)):
        return BufferSource(f, "<bytes>")
    return _open_file_like(f)


def _open_file_like(f: IO[bytes]) -> Source:
    name = str(getattr(f, "name", None) or f"<{type(f).__name__}>")
    position = _check_seekable(f)
    if not hasattr(f, "read"):
        raise NotFileLikeError(f"{type(f).__name__!r} object has no attribute 'read': not a binary file-like object")
    source = _source_of(f, name, position)
    source.stream = f
    return source


def _check_seekable(f: IO[bytes]) -> int:
    """torch's check (``_check_seekable``): ``f.seek(f.tell())`` must work; returns the position.

    The error is of the type torch's is (:class:`io.UnsupportedOperation` where seek or
    tell refuse, :class:`AttributeError` where the object has none) and says what torch's says.
    """
    try:
        seek = f.seek  # looked up before tell is called, as in torch's ``f.seek(f.tell())``
        position = f.tell()
        seek(position)
    except (io.UnsupportedOperation, AttributeError) as exc:
        message = str(exc) + (_NOT_SEEKABLE if "seek" in str(exc) or "tell" in str(exc) else "")
        if isinstance(exc, AttributeError):
            raise NotFileLikeError(message) from exc
        raise NotSeekableError(message) from exc
    return position


def _source_of(f: IO[bytes], name: str, position: int) -> Source:
    if isinstance(f, io.BytesIO):
        source: Source = BufferSource(f.getbuffer()[position:], name)
        source.start = position
        return source
    try:
        fd = f.fileno()
    except (OSError, AttributeError, ValueError):
        fd = -1
    if fd >= 0 and isinstance(f, (io.BufferedReader, io.FileIO, io.BufferedRandom)):
        path = getattr(f, "name", None)
        real = os.path.realpath(path) if isinstance(path, str) else None
        return FileSource(fd, name, base=position, owned=False, path=real)
    return StreamSource(f, name)
