"""Claims: two launches of one job never reconstruct the same image at once.

A user who re-launches a job that is still running, a SLURM requeue that overlaps the old
task, or two shards given the same index all run in one results directory. Before an
image is reconstructed its process **claims** it: it writes its host, PID, start time, a
random token and its SLURM ids (job, array job and task, restart count) to a private
temporary file and links that file to ``.<name>.claim`` beside the outputs (``link``
fails when the name exists: an exclusive create that never shows a half-written claim).
Another process that finds the claim leaves the image to its owner; the claim is removed
when the image is written, fails, or the job stops (Ctrl-C included).

A claim is **taken over** when its owner is gone: on the same host when its PID no longer
exists; on any host at once when it was made by an earlier incarnation of this very SLURM
task (same job/array ids, lower ``SLURM_RESTART_COUNT``: a requeue); on any host when it
has not been refreshed for ``timeout`` seconds (a live owner touches its claims every
``heartbeat`` seconds from a background thread; a claim left by ``kill -9`` or a dead node
expires). Takeovers of one name are serialised by a second claim, ``.<name>.claim.takeover``:
its holder reads the claim again and removes it only if it is still the very claim judged
stale (same token, or for an empty claim left by an older writer, same inode, size and
time), then claims the name like anyone else. So one process wins, and no process moves
or deletes a claim that another has just made.

What this relies on, and what it does not:

* exclusive create (``link`` to an existing name fails; ``O_CREAT | O_EXCL`` where the file
  system has no hard links) is atomic: POSIX local file systems, and NFS from v3 on (the
  server checks the name); ``rename`` within a directory is atomic;
* not ``flock``/``fcntl`` locks (not honoured by every NFS set-up, and lost silently when
  a lock daemon restarts);
* clocks of the hosts roughly agree (within ``timeout``: 10 minutes by default), since a
  claim's age is its modification time as the file server sets it;
* a takeover lock whose holder died in the milliseconds of a takeover is itself taken over
  when stale (by rename, then a check of its token); two processes doing that at the same
  instant could both proceed: the one case left where an image may be computed twice;
* the outputs themselves never depend on claims: every file is written atomically, so in
  the worst case an image is computed twice, never written half or mixed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from icnn_pl.atomic import _alive, temp_name
from icnn_pl.errors import IcnnError

log = logging.getLogger(__name__)

HOST = socket.gethostname()
TIMEOUT_S = 600.0  # a claim not refreshed for this long belongs to a dead owner
HEARTBEAT_S = 60.0  # how often a live owner refreshes its claims
TAKEOVER_TIMEOUT_S = 60.0  # a takeover takes milliseconds: a lock this old is a dead one's
_HELD_HERE: set[str] = set()  # tokens of the claims every Claims of this process holds
TAKEOVER = ".takeover"  # suffix of a claim's takeover lock


def _no_pause(point: str) -> None:
    """Where the tests interleave two claimants deterministically (``pause`` points)."""


pause: Callable[[str], None] = _no_pause


class ClaimError(IcnnError):
    """A claim could not be written (full disk, no permission)."""


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def slurm_task() -> str:
    """This process's SLURM task (``job/array job/array task``), "" outside SLURM: a
    requeued task keeps it and counts up ``SLURM_RESTART_COUNT``."""
    ids = [os.environ.get(v, "") for v in _SLURM_VARS]
    return "/".join(ids) if any(ids) else ""


def slurm_restart() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class Owner:
    """Who holds a claim (as written in the claim file)."""

    host: str
    pid: int
    started: str
    token: str
    slurm_task: str = ""
    restart: int = 0

    def __str__(self) -> str:
        where = f", SLURM task {self.slurm_task} (restart {self.restart})" \
            if self.slurm_task else ""
        return f"PID {self.pid} on {self.host}{where}, since {self.started}"


UNKNOWN = Owner("?", 0, "just now", "")  # a claim being written or taken over


def _read_owner(path: Path) -> Owner | None:
    """The owner written in a claim file; None if it is gone, empty or not a claim."""
    try:
        d = json.loads(path.read_text())
        return Owner(str(d["host"]), int(d["pid"]), str(d["started"]), str(d["token"]),
                     str(d.get("slurm_task", "")), int(d.get("restart", 0)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one file at ``path`` from a later one (inode, size, modification time;
    not the change time, which a rename sets)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _same_claim(path: Path, seen: Owner | None, seen_id: tuple | None) -> bool:
    """Whether ``path`` still holds the claim judged stale: its token, or, for an
    unreadable one, the same file unchanged."""
    now = _read_owner(path)
    if seen is not None:
        return now is not None and now.token == seen.token
    return now is None and seen_id is not None and _identity(path) == seen_id


class Claims:
    """The claims one process holds in ``folder`` (one per image, or a job-level lock)."""

    def __init__(self, folder: str | os.PathLike, timeout: float | None = None,
                 heartbeat: float | None = None) -> None:
        self.folder = Path(folder)
        self.timeout = float(TIMEOUT_S if timeout is None else timeout)
        self.heartbeat = float(HEARTBEAT_S if heartbeat is None else heartbeat)
        self._held: dict[str, str] = {}  # name -> token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.folder / f".{name}.claim"

    # -- claiming ---------------------------------------------------------------------------
    def claim(self, name: str) -> Owner | None:
        """Claim ``name``: None when this process now holds it, else its live owner."""
        return self.claim_verbose(name)[0]

    def claim_verbose(self, name: str) -> tuple[Owner | None, bool]:
        """``claim`` and whether a stale claim was taken over to get it."""
        path = self.path(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        took_over = False
        for _ in range(5):  # a takeover lets another process in between: try again
            token = self._create(path)
            if token is not None:
                with self._lock:
                    self._held[name] = token
                    _HELD_HERE.add(token)
                self._start_heartbeat()
                return None, took_over
            seen, seen_id = _read_owner(path), _identity(path)
            if seen_id is None:
                continue  # released meanwhile: create it again
            if not self._stale(path, seen, self.timeout):
                return seen or UNKNOWN, False
            pause("stale")
            if not self._take_over(path, seen, seen_id):
                return _read_owner(path) or UNKNOWN, False
            took_over = True
        return _read_owner(path) or UNKNOWN, False

    def _create(self, path: Path) -> str | None:
        """Create ``path`` holding a new claim of this process, complete or not at all;
        its token, or None when the name exists. A failed write raises ClaimError."""
        token = secrets.token_hex(8)
        data = json.dumps({"host": HOST, "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token,
                           "slurm_task": slurm_task(), "restart": slurm_restart()}).encode()
        tmp = path.with_name(temp_name(path.name))
        try:
            # 0o666 as open(path, "w") passes: the kernel takes the umask off itself
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            pause("written")
            try:
                os.link(tmp, path)  # exclusive: fails if the name exists
            except FileExistsError:
                return None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                     errno.EMLINK, errno.EXDEV):
                    raise
                return self._create_without_links(path, data, token)
            return token
        except OSError as exc:
            raise ClaimError(f"cannot write the claim {path}: {exc.strerror or exc}",
                             "free space on (or fix the permissions of) the output"
                             " directory's file system and run again") from exc
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create_without_links(path: Path, data: bytes, token: str) -> str | None:
        """File systems without hard links: ``O_EXCL``, then the owner written in (the
        claim is briefly empty: others treat it as held)."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return None
        try:
            pause("opened")
            os.write(fd, data)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)  # no empty claim left behind
            raise
        os.close(fd)
        return token

    def _stale(self, path: Path, owner: Owner | None, timeout: float) -> bool:
        """Whether the claim's owner is gone: a dead PID on this host, an earlier job of
        this very process that did not release it, an earlier incarnation of this SLURM
        task (requeued), or no refresh for ``timeout`` s."""
        if owner is not None:
            task = slurm_task()
            if task and owner.slurm_task == task and owner.restart < slurm_restart():
                return True  # this task before its requeue: dead, wherever it ran
            if owner.host == HOST:
                if owner.pid == os.getpid():
                    return owner.token not in _HELD_HERE
                if not _alive(owner.pid):
                    return True
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: create it again
        return age > timeout

    def _take_over(self, path: Path, seen: Owner | None, seen_id: tuple) -> bool:
        """Remove the stale claim at ``path`` if it is still the one judged stale, under
        the name's takeover lock. False when another process holds that lock (a takeover
        in progress): the name is then left to it."""
        lock = path.with_name(path.name + TAKEOVER)
        token = self._create(lock)
        if token is None:
            holder, holder_id = _read_owner(lock), _identity(lock)
            if holder_id is None or not self._stale(lock, holder, TAKEOVER_TIMEOUT_S):
                return holder_id is None  # gone: try again; held: a takeover is running
            self._remove_stale(lock, holder, holder_id)  # its holder died mid-takeover
            return True  # try again from the start
        _HELD_HERE.add(token)  # live to the other Claims of this process
        try:
            pause("locked")
            if _same_claim(path, seen, seen_id):
                path.unlink(missing_ok=True)
                log.warning("taking over %s, left by %s (no longer running)", path.name,
                            seen or "an unknown process")
            return True
        finally:
            lock.unlink(missing_ok=True)
            _HELD_HERE.discard(token)

    @staticmethod
    def _remove_stale(path: Path, seen: Owner | None, seen_id: tuple) -> None:
        """Remove a dead takeover lock: moved aside, then dropped if it is the one seen
        (else put back: it is a live one's)."""
        grave = path.with_name(temp_name(path.name))  # a leftover if killed: swept as one
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        if not _same_claim(grave, seen, seen_id):
            with contextlib.suppress(OSError):
                os.link(grave, path)
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

    def holds(self, name: str) -> bool:
        """Whether this object holds ``name`` and the claim file still says so."""
        token = self._held.get(name)
        owner = _read_owner(self.path(name))
        return token is not None and owner is not None and owner.token == token

    def close(self) -> None:
        """Release every claim and stop the heartbeat."""
        for name in list(self._held):
            self.release(name)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def sweep_stale(self, names: list[str]) -> int:
        """Take over and remove the stale claims among ``names`` (e.g. of images finished
        by a launch killed before it released them); how many were removed."""
        removed = 0
        for name in names:
            path = self.path(name)
            owner, ident = _read_owner(path), _identity(path)
            if ident is not None and self._stale(path, owner, self.timeout) and \
                    self._take_over(path, owner, ident) and not path.exists():
                removed += 1
        return removed

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
