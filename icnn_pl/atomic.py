"""Atomic, durable file writes: a reader sees the old file or the new one, never half of one.

* **Modes.** ``mkstemp`` creates 0600 files; the finished file gets the mode an ordinary
  ``open(path, "w")`` would get under the process's umask (0644 under umask 022, 0664
  under 002), so colleagues sharing a group can read the outputs.
* **Durability.** The data is fsync'ed before the rename and the directory after it, so a
  finished file (and its name) survives a power loss. File systems that refuse to fsync a
  directory (some network file systems) are tolerated: the rename is still atomic there.

A process killed with SIGKILL cannot remove its temporary file, so temporary names carry
the writer's host and PID: ``remove_stale_temps`` deletes those of dead writers on this
host (a re-run of the job does it before any work), never those of a live one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# ".<target>.<host>-<pid>-<random>.tmp"; host without "." or "-" so the name parses back
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


_UMASK_LOCK = threading.Lock()


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic
    on POSIX file systems (NFS included). It gets the umask's ordinary mode; its data is
    fsync'ed before the rename and the directory after it. On error the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # by path, after the writer: some writers (safetensors) replace the file
        os.chmod(tmp_path, default_file_mode())
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
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


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete temporary files that ``atomic_path`` writers on this host left behind when
    they were killed; returns the deleted paths. Temporaries of live processes and of
    other hosts (a shared file system) are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        m = _TEMP_RE.match(path.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
