"""Claims: two launches of one job never reconstruct the same image at once.

A user who re-launches a job that is still running, a SLURM requeue that overlaps the old
task, or two shards given the same index all run in one results directory. Before an
image is reconstructed its process **claims** it: it creates ``.<name>.claim`` beside the
outputs with ``O_CREAT | O_EXCL`` and writes its host, PID, start time and a random token
there. Another process that finds the claim leaves the image to its owner (and the
finished ``.mat`` then tells every later launch it is done); the claim is removed when
the image is written, fails, or the job stops (Ctrl-C included).

A claim is **taken over** when its owner is gone: on the same host when its PID no longer
exists, on any host when it has not been refreshed for ``timeout`` seconds (a live owner
touches its claims every ``heartbeat`` seconds from a background thread, so a long image
keeps its claim; a claim left by ``kill -9`` or a dead node expires). A takeover renames
the stale claim away first (only one process's rename succeeds) and then creates a new
claim with ``O_EXCL`` again.

What this relies on, and what it does not:

* exclusive create (``O_CREAT | O_EXCL``) is atomic: POSIX local file systems, and NFS
  from v3 on (the server checks the name); ``rename`` within a directory is atomic;
* not ``flock``/``fcntl`` locks (not honoured by every NFS set-up, and lost silently when
  a lock daemon restarts);
* clocks of the hosts roughly agree (within ``timeout``: 10 minutes by default), since a
  claim's age is its modification time as the file server sets it;
* the outputs themselves never depend on claims: every file is written atomically, so in
  the worst case (a takeover racing a takeover) an image is computed twice, never
  written half or mixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from icnn_pl.atomic import _alive

log = logging.getLogger(__name__)

HOST = socket.gethostname()
TIMEOUT_S = 600.0  # a claim not refreshed for this long belongs to a dead owner
HEARTBEAT_S = 60.0  # how often a live owner refreshes its claims
_HELD_HERE: set[str] = set()  # tokens of the claims every Claims of this process holds


@dataclass(frozen=True)
class Owner:
    """Who holds a claim (as written in the claim file)."""

    host: str
    pid: int
    started: str
    token: str

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host}, since {self.started}"


def _read_owner(path: Path) -> Owner | None:
    """The owner written in a claim file; None if it is gone, empty (being written) or
    not a claim."""
    try:
        d = json.loads(path.read_text())
        return Owner(str(d["host"]), int(d["pid"]), str(d["started"]), str(d["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Claims:
    """The claims one process holds in ``folder`` (one per image, or a job-level lock)."""

    def __init__(self, folder: str | os.PathLike, timeout: float = TIMEOUT_S,
                 heartbeat: float = HEARTBEAT_S) -> None:
        self.folder = Path(folder)
        self.timeout, self.heartbeat = float(timeout), float(heartbeat)
        self._held: dict[str, str] = {}  # name -> token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.folder / f".{name}.claim"

    # -- claiming ---------------------------------------------------------------------------
    def claim(self, name: str) -> Owner | None:
        """Claim ``name``: None when this process now holds it, else its live owner."""
        path = self.path(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a takeover lets another process in between: try again
            token = secrets.token_hex(8)
            try:
                # 0o666 as open(path, "w") passes: the kernel takes the umask off itself
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = _read_owner(path)
                if not self._stale(path, owner):
                    return owner or Owner("?", 0, "just now", "")  # being written
                self._take_over(path, owner)
                continue
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": HOST, "pid": os.getpid(), "started": started,
                           "token": token}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            with self._lock:
                self._held[name] = token
                _HELD_HERE.add(token)
            self._start_heartbeat()
            return None
        return _read_owner(path) or Owner("?", 0, "just now", "")

    def _stale(self, path: Path, owner: Owner | None) -> bool:
        """Whether the claim's owner is gone: a dead PID on this host, an earlier job of
        this very process that did not release it, or no refresh for ``timeout`` s."""
        if owner is not None and owner.host == HOST:
            if owner.pid == os.getpid():
                return owner.token not in _HELD_HERE
            if not _alive(owner.pid):
                return True
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: create it again
        return age > self.timeout

    def _take_over(self, path: Path, seen: Owner | None) -> None:
        """Move a stale claim out of the way (one process's rename wins) and drop it."""
        grave = path.with_name(f"{path.name}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}.stale")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return  # someone else moved or released it
        moved = _read_owner(grave)
        if seen is not None and moved is not None and moved.token != seen.token:
            # a fresh claim appeared between our look and the rename: give it back
            with contextlib.suppress(OSError):
                os.link(grave, path)
        else:
            log.warning("taking over %s, left by %s (no longer running)", path.name,
                        seen or "an unknown process")
        grave.unlink(missing_ok=True)

    def release(self, name: str) -> None:
        """Give up ``name`` (only if the claim there is still ours)."""
        with self._lock:
            token = self._held.pop(name, None)
            _HELD_HERE.discard(token or "")
        if token is None:
            return
        path = self.path(name)
        owner = _read_owner(path)
        if owner is not None and owner.token == token:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release every claim and stop the heartbeat."""
        for name in list(self._held):
            self.release(name)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def lock(self, name: str, poll_s: float = 0.2) -> Iterator[None]:
        """Hold ``name`` for the block, waiting while another live process holds it."""
        waited, said = 0.0, 0.0
        while (owner := self.claim(name)) is not None:
            if waited - said >= 30.0:
                log.info("waiting for %s, held by %s", self.path(name).name, owner)
                said = waited
            time.sleep(poll_s)
            waited += poll_s
        try:
            yield
        finally:
            self.release(name)

    # -- heartbeat --------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="icnn-claims", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                names = list(self._held)
            for name in names:
                with contextlib.suppress(OSError):
                    os.utime(self.path(name))
