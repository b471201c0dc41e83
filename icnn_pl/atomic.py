"""Atomic, durable file writes: a reader sees the old file or the new one, never half of one.

* **Modes.** ``mkstemp`` creates 0600 files; the finished file gets the mode an ordinary
  ``open(path, "w")`` would get under the process's umask (0644 under umask 022, 0664
  under 002), so colleagues sharing a group can read the outputs.
* **Durability.** The data is fsync'ed before the rename and the directory after it, so a
  finished file (and its name) survives a power loss. File systems that refuse to fsync a
  directory (some network file systems) are tolerated: the rename is still atomic there.

* **New folders.** Each folder ``atomic_path`` creates is made durable too (its parent
  fsync'ed), so a finished file is not lost with a folder entry that was never written.
* **Umask.** Writes work under any umask, 0222 included (no owner write): the temporary
  file is the writer's own (0600) until its data is synced; only then does it get its
  final mode.

A process killed with SIGKILL cannot remove its temporary file, so temporary names carry
the writer's host and PID: ``remove_stale_temps`` deletes those of dead writers on this
host (a re-run of the job does it before any work), never those of a live one, and those
of other hosts once they are older than ``FOREIGN_TEMP_AGE_S`` (no write takes that long).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# ".<target>.<host>-<pid>-<random>.tmp"; host without "." or "-" so the name parses back
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


_UMASK_LOCK = threading.Lock()
FOREIGN_TEMP_AGE_S = 24 * 3600.0  # another host's temporary file older than this is a leftover


def temp_prefix(name: str) -> str:
    """The start of a temporary name for ``name`` (then random characters and ``.tmp``):
    ``remove_stale_temps`` reads the writer's host and PID back from it."""
    return f".{name}.{_HOST}-{os.getpid()}-"


def temp_name(name: str) -> str:
    """A temporary name for ``name`` that ``remove_stale_temps`` recognises."""
    return f"{temp_prefix(name)}{secrets.token_hex(4)}.tmp"


def current_umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` (Linux >= 4.7) without changing
    it; elsewhere by setting and restoring it, under a lock (``os.umask`` is process-wide,
    so another thread creating a file in that instant could get mode 0666 & ~0)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or creation in ``folder`` durable; a no-op where the file system (or
    the OS) cannot open or fsync a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL/EBADF/EROFS on file systems that do not sync directories
        pass
    finally:
        os.close(fd)


def make_dirs_durable(folder: str | os.PathLike) -> None:
    """``mkdir -p folder``, each folder it creates made durable (its parent fsync'ed)."""
    folder = Path(folder)
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir()
        fsync_dir(new.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic
    on POSIX file systems (NFS included). It gets the umask's ordinary mode; its data is
    fsync'ed before the rename and the directory after it. On error the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    make_dirs_durable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp",
                               dir=path.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o600)  # mkstemp's 0600 less the umask: under 0222 not writable
        os.close(fd)
        yield tmp_path
        # by path, after the writer (some writers, e.g. safetensors, replace the file);
        # synced before the final mode, which may remove write permission
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _left_over(path: Path, host: str, pid: int, now: float) -> bool:
    """A temporary file whose writer is gone: a dead PID on this host, or another host's
    file older than ``FOREIGN_TEMP_AGE_S``."""
    if host == _HOST:
        return not _alive(pid)
    try:
        return now - path.stat().st_mtime > FOREIGN_TEMP_AGE_S
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete temporary files that writers killed mid-write left behind (``atomic_path``,
    claims, write probes); returns the deleted paths. Temporaries of live processes on
    this host, and recent ones of other hosts (a shared file system), are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        m = _TEMP_RE.match(path.name)
        if m and path.is_file() and _left_over(path, m["host"], int(m["pid"]), now):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
