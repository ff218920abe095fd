"""Replacing the files of a checkpoint directory together, in one atomic and durable step.

A checkpoint is two files whose pair must stay consistent (the config records the SHA-256 of the weights). Each
file replaced atomically on its own is not enough: a crash between the two renames leaves a mix, which the hash
then refuses, so the old checkpoint is lost too. The directory itself cannot be swapped either: it is shared with
other tools' files (``DeltaTrainer`` and accelerate put their optimizer and trainer states next to the delta), and
renaming it would move them. So the directory keeps its identity and a small redo log does the replacing:

1. **stage**: both files are written into a fresh hidden directory ``.deltakit-staging-<pid>-<random>`` inside
   the checkpoint directory, each fsync-ed, then the staging directory fsync-ed;
2. **commit**: the staging directory is renamed to ``.deltakit-pending`` and the checkpoint directory fsync-ed.
   That rename is the single atomic step: before it the old checkpoint is the checkpoint, after it the new one;
3. **apply**: the files are renamed out of ``.deltakit-pending`` over the old ones (weights first, then the
   config), the directory fsync-ed, and ``.deltakit-pending`` removed.

Readers (:func:`locked_view`) resolve each file in ``.deltakit-pending`` first, then in the directory: any state a
crash can leave (during staging: the old files; after the commit, with any number of files already moved: the
new ones) reads as one whole checkpoint, old or new. The next save completes an interrupted apply and removes
staging directories of crashed saves (:func:`recover`); readers ignore staging directories.

Concurrency: a save holds an exclusive ``flock`` on the checkpoint directory for its whole duration, readers a
shared one, so concurrent writers are serialized (the last to take the lock wins, every save is whole) and a reader
never sees a save in progress. The kernel releases the lock of a killed process. Where ``flock`` is unavailable (no
``fcntl``, some network filesystems) the steps run unlocked; readers still never *accept* a mix, because the config's
SHA-256 is checked against the exact weight bytes that are parsed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator

from ..errors import CheckpointError
from .files import fsync_directory, write_durably

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module docstring
    fcntl = None  # type: ignore[assignment]

PENDING = ".deltakit-pending"
STAGING_PREFIX = ".deltakit-staging-"
#: Temporary files of the per-file atomic writes of earlier deltakit versions (removed by :func:`recover`).
_OLD_TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def directory_lock(path: str, *, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on the directory ``path`` (exclusive for writers, shared for readers)."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"No delta checkpoint directory at {path!r}.") from None
    except NotADirectoryError:
        raise CheckpointError(f"{path!r} is not a directory (a delta checkpoint is a directory).") from None
    except OSError as exc:
        raise CheckpointError(f"Cannot open the checkpoint directory {path!r}: {exc.strerror or exc}.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
                raise
            # No locking on this filesystem: proceed unlocked (the hash check still refuses any mix).
        yield
    finally:
        os.close(fd)  # closing releases the lock


def resolve(path: str, name: str) -> str:
    """Where a reader finds the file ``name`` of the checkpoint directory ``path``: inside an interrupted commit
    (``.deltakit-pending``) if it is still there, else in the directory."""
    staged = os.path.join(path, PENDING, name)
    return staged if os.path.lexists(staged) else os.path.join(path, name)


@contextlib.contextmanager
def locked_view(path: str) -> Iterator[Callable[[str], str]]:
    """Read a checkpoint directory under a shared lock; yields :func:`resolve` bound to ``path``."""
    if not os.path.isdir(path):
        raise CheckpointError(
            f"No delta checkpoint directory at {path!r} (deltakit loads local directories written by save_finetuned)."
        )
    with directory_lock(path, exclusive=False):
        yield lambda name: resolve(path, name)


def _apply_pending(path: str, names: tuple[str, ...]) -> None:
    pending = os.path.join(path, PENDING)
    for name in names:
        source = os.path.join(pending, name)
        if os.path.lexists(source):
            os.replace(source, os.path.join(path, name))
    fsync_directory(path)
    leftovers = os.listdir(pending)
    if leftovers:  # never delete what deltakit did not put there
        raise CheckpointError(
            f"{pending!r} holds unexpected files {sorted(leftovers)[:3]}; remove that directory by hand after "
            f"checking its contents."
        )
    os.rmdir(pending)
    fsync_directory(path)


def recover(path: str, names: tuple[str, ...]) -> None:
    """Finish an interrupted commit and remove the leftovers of crashed saves (call with the exclusive lock)."""
    if os.path.isdir(os.path.join(path, PENDING)):
        _apply_pending(path, names)
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if entry.startswith(STAGING_PREFIX):
            shutil.rmtree(full, ignore_errors=True)
        elif entry.endswith(_OLD_TEMP_SUFFIX) and any(entry.startswith(f".{n}.") for n in names):
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)


def commit(path: str, files: dict[str, Callable[[object], None]], *, may_replace: bool = True) -> None:
    """Replace the files ``files`` (``{name: write(handle)}``) of the directory ``path`` as one atomic step.

    Args:
        path: An existing directory.
        files: File names and the functions that write their content; applied in this order.
        may_replace: When ``False``, refuse (under the lock) if any of the files already exists.

    Raises:
        CheckpointError: Writing failed (disk full, file size limit, permissions): the staged files are removed
            and the old checkpoint is unchanged. Or ``may_replace`` is ``False`` and a checkpoint exists.
    """
    names = tuple(files)
    with directory_lock(path, exclusive=True):
        try:
            recover(path, names)
        except OSError as exc:
            raise CheckpointError(f"Cannot finish an interrupted save in {path!r}: {exc}.") from None
        if not may_replace and any(os.path.lexists(os.path.join(path, n)) for n in names):
            raise CheckpointError(f"{path!r} already holds a delta checkpoint; pass overwrite=True to replace it.")
        staging = os.path.join(path, f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(staging)
            for name, write in files.items():
                write_durably(os.path.join(staging, name), write)
            fsync_directory(staging)
            os.rename(staging, os.path.join(path, PENDING))  # the commit point
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
                raise CheckpointError(
                    f"Could not write the delta checkpoint into {path!r} ({exc.strerror or exc}); the previous "
                    f"checkpoint there, if any, is unchanged."
                ) from exc
            raise
        try:
            fsync_directory(path)
            _apply_pending(path, names)
        except OSError as exc:
            raise CheckpointError(
                f"The new checkpoint in {path!r} is saved, but moving its files into place failed ({exc}); deltakit "
                f"loads it as it is, and the next save finishes the move."
            ) from exc
