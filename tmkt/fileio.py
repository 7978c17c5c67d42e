"""Safe file writes, shared by checkpoints, exporters, the profile report and the data caches
(stdlib only).

- `atomic_path` / `atomic_bytes`: a temporary file beside the target, renamed onto it only when
  the block ends without error, so the target always holds its old content or the complete new
  one. A failed write (a full disk, a read-only folder) raises `WriteError`, one line naming the
  target, and leaves no temporary file.
- Temporary names carry the writer's host and pid (`.NAME.tmp-<host>-<pid>.<random><suffix>`),
  so the next writer of the same target removes the temporaries of writers that were killed
  (pid no longer alive on this host) and keeps those of live ones.
- `exclusive_lock`: an advisory `fcntl.flock` lock on a lock file holding the owner's pid; a
  second writer is refused at once with `LockedError` naming that pid. Used for run directories
  (`tmkt train`) and, with `atomic_path(exclusive=True)`, for exported files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tmkt.errors import TmktError

class WriteError(TmktError, OSError):
    """A file could not be written (full disk, quota, read-only folder); names the target.
    Keeps the errno of the failure (`.errno`); its text is the one line without `[Errno n]`."""

    def __str__(self) -> str:
        return str(self.strerror)


class LockedError(TmktError, RuntimeError):
    """Another live process holds the lock of a run directory or an output file."""


def default_file_mode() -> int:
    """The mode a plain `open()` would give a new file (mkstemp's files are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _host_tag() -> str:
    """A short, file-name-safe tag of this host, so that a shared folder (NFS) never sees another
    host's live pid as dead."""
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFF:04x}"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{_host_tag()}-{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` (any suffix) left by writers on this host whose pid is
    dead; returns what was removed. Temporaries of live writers, of other hosts and files of
    other names stay."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-{_host_tag()}-(\d+)\.[A-Za-z0-9_]+(\..*)?$")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        m = pattern.match(name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            (path.parent / name).unlink()
            removed.append(path.parent / name)
        except FileNotFoundError:  # another writer removed it first
            pass
        except OSError:  # not ours to remove (permissions): leave it
            pass
    return removed


def _write_error(path: Path, e: OSError) -> WriteError:
    return WriteError(e.errno or 0, f"{path}: cannot write ({e.strerror or e})")


def _is_write_failure(e: BaseException, tmp: Path) -> bool:
    """An OSError of the write itself (no file named, or the temporary), not of another file the
    block happened to read."""
    if not isinstance(e, OSError) or isinstance(e, TmktError):
        return False
    return e.filename is None or str(e.filename) == str(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for a writer to fill; renamed onto `path` only if the block
    ends without error, with the mode a plain `open()` would give. Otherwise it is removed, so
    `path` always holds either its old content or the complete new one.

    A failed write inside the block (OSError with no file name or the temporary's, e.g. a full
    disk) and a failed rename raise `WriteError` naming `path`. Temporaries of `path` left by
    killed writers are removed first. `exclusive`: hold `path`'s lock for the block, so that a
    second writer of the same file is refused (`LockedError`) instead of racing this one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from None
    with (exclusive_lock(path.parent / f".{path.name}.lock", str(path)) if exclusive else _nothing()):
        remove_stale_temps(path)
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
        except OSError as e:
            raise _write_error(path, e) from None
        os.close(fd)
        tmp = Path(name)
        try:
            try:
                yield tmp
            except OSError as e:
                if _is_write_failure(e, tmp):
                    raise _write_error(path, e) from None
                raise
            try:
                os.chmod(tmp, default_file_mode())
                os.replace(tmp, path)
            except OSError as e:
                raise _write_error(path, e) from None
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError:  # e.g. the folder went read-only: nothing more to do
                pass


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of `data` to `fd` (os.write may write fewer), then fsync."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.fsync(fd)


@contextmanager
def atomic_bytes(path: str | os.PathLike, data: bytes | memoryview, suffix: str = ".tmp", *,
                 exclusive: bool = False) -> Iterator[Path]:
    """`atomic_path` with the temporary already holding `data` (written and fsynced): the block
    may check the complete file before it is renamed onto `path`. Writers that build a file in
    memory first (HDF5 images, safetensors, ONNX) go through here, so a full disk is one
    `WriteError` from a plain write and never reaches a library's own error paths."""
    with atomic_path(path, suffix, exclusive=exclusive) as tmp:
        fill(tmp, data)
        yield tmp


def fill(tmp: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace the content of the temporary `tmp` (of an `atomic_path` block) with `data`."""
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, exclusive: bool = False) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_bytes(path, data, exclusive=exclusive):
        pass


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


@contextmanager
def exclusive_lock(lock_file: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive `flock` on `lock_file` (created, holding this pid) for the block; the
    file is removed on release. Refuses at once with `LockedError` naming `what` and the holder's
    pid when another process holds it. The lock dies with its process (kill -9 included), so a
    lock file left by a killed process never blocks anyone."""
    lock_file = Path(lock_file)
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(lock_file, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise LockedError(f"{what} is being written by another tmkt process ({who}); "
                              "wait for it to finish or write elsewhere") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise _write_error(lock_file, e) from None
            locked = False  # a file system without flock: go on unlocked rather than refuse all writes
        if not locked:
            os.close(fd)
            yield lock_file
            return
        # The previous holder may have removed the file between our open and flock: then we
        # hold a lock on an orphaned inode, and must lock the file that is there now.
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:  # a full disk: the lock holds, only the pid in the refusal is missing
        pass
    try:
        yield lock_file
    finally:
        try:
            lock_file.unlink()
        except OSError:
            pass
        os.close(fd)
