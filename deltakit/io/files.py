"""Bounded reads of regular files, and durable writes.

Reading: a checkpoint path may be a symlink (the Hugging Face cache links snapshot files to blobs), but what it
resolves to must be a regular file of bounded size. ``delta_config.json`` as a link to ``/dev/zero`` would otherwise
be read until memory runs out, and as a FIFO the open itself would block forever: files are opened with
``O_NONBLOCK`` (an open of a FIFO returns at once) and checked with ``fstat`` on the open descriptor, so what is
checked is what is read.

Writing: data is flushed and ``fsync``-ed before a rename publishes it, and the directory is ``fsync``-ed after
the rename, so "old or new, never half" also holds across a power loss, not only a process crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator

from ..errors import CheckpointError

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str, what: str) -> Iterator[tuple[int, int]]:
    """Open ``path`` for reading, refusing anything but a regular file.

    Args:
        path: The file (symlinks are followed; the target must be a regular file).
        what: How the file is named in errors (e.g. ``"the delta config"``).

    Yields:
        ``(fd, size)``: the open descriptor and the size ``fstat`` reports for it.

    Raises:
        CheckpointError: The file is missing, unreadable, or a directory, FIFO, device or socket.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise CheckpointError(f"No {os.path.basename(path)} at {path!r} ({what} is missing).") from None
    except OSError as exc:
        raise CheckpointError(f"Cannot open {what} {path!r}: {exc.strerror or exc}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"{path!r} ({what}) is {_kind(info.st_mode)}, not a regular file; deltakit reads only regular files "
                f"(a symlink is fine if it points to one)."
            )
        yield fd, info.st_size
    finally:
        os.close(fd)


def read_exact(fd: int, count: int, path: str) -> bytearray:
    """Read exactly ``count`` bytes from ``fd`` (short reads are retried; a file that ends early is an error)."""
    buffer = bytearray(count)
    view = memoryview(buffer)
    done = 0
    while done < count:
        try:
            got = os.readv(fd, [view[done:]]) if hasattr(os, "readv") else _read_into(fd, view[done:])
        except BlockingIOError:  # only possible if the file stopped being a regular file (checked before)
            raise CheckpointError(f"{path!r} would block while being read; it is not a regular file.") from None
        except OSError as exc:
            raise CheckpointError(f"Cannot read {path!r}: {exc.strerror or exc}.") from None
        if got == 0:
            raise CheckpointError(
                f"{path!r} ended after {done} of {count} bytes: it is truncated, or it was changed while being read."
            )
        done += got
    return buffer


def _read_into(fd: int, view: memoryview) -> int:
    chunk = os.read(fd, len(view))
    view[: len(chunk)] = chunk
    return len(chunk)


def at_end(fd: int) -> bool:
    """Whether ``fd`` has no byte left (a file that grew while being read has)."""
    return os.read(fd, 1) == b""


def read_regular_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises:
        CheckpointError: See :func:`open_regular`; or the file is larger than ``limit``.
    """
    with open_regular(path, what) as (fd, size):
        if size > limit:
            raise CheckpointError(
                f"{path!r} ({what}) is {size:,} bytes, more than the {limit:,} such a file can need; it is not a "
                f"deltakit file, or it is corrupt."
            )
        data = read_exact(fd, size, path)
        if not at_end(fd):
            raise CheckpointError(f"{path!r} grew while being read; it is being written by another process.")
    return bytes(data)


def fsync_directory(path: str) -> None:
    """Make a directory's entries (creations, renames, removals) durable. A no-op where directories cannot be
    opened (Windows), since there the rename itself is the last thing the OS lets us order."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the data files themselves were synced
        pass
    finally:
        os.close(fd)


def write_durably(file: str, write: Callable[[object], None]) -> None:
    """Create ``file`` (which must not exist), let ``write(handle)`` fill it, then flush and fsync it."""
    with open(file, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(directory: str, final_name: str, write: Callable[[str], None]) -> None:
    """Replace ``directory/final_name`` atomically and durably: ``write(tmp)`` creates and fills a temporary file in
    the same directory (so it gets the usual mode for new files), which is fsync-ed, renamed over the final name,
    and the directory fsync-ed. On any failure the temporary file is removed and the old file stays."""
    tmp = os.path.join(directory, f".{final_name}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(directory, final_name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(directory)
