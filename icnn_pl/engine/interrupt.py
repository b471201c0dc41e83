"""Ctrl-C during a job: the first one stops after the current iteration, a second at once.

Stopping at an iteration boundary (not in the middle of a forward pass or a file write)
keeps the exit clean; the image in flight is dropped either way and redone on resume.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
_requested = threading.Event()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed (call between iterations)."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: object) -> None:
    if _requested.is_set():  # second Ctrl-C: the user does not want to wait
        raise KeyboardInterrupt
    _requested.set()
    log.warning("Ctrl-C: stopping after the current iteration (press Ctrl-C again to stop now)")


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Within the block, the first SIGINT only asks ``check`` to stop the job. No-op off the
    main thread (signal handlers live there) and where SIGINT is ignored (nohup, ``&``)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
