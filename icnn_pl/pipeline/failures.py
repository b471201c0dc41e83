"""How a failed job ends: exit codes on the command line, an exception inside a sweep.

Inside a sweep a failing job raises :class:`JobFailed` instead of ``sys.exit``: Hydra
records the job as failed and runs the others (``SystemExit`` would end the whole sweep);
the sweep exits non-zero at the end. Codes: 2 bad config or data, 1 failed images,
130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import NoReturn

from icnn_pl.errors import IcnnError


class JobFailed(Exception):
    """A job of a sweep failed (bad config or data: code 2; failed images: code 1)."""

    def __init__(self, reason: str, code: int = 1,
                 failed_images: Mapping[str, str] | None = None) -> None:
        super().__init__(reason, code, dict(failed_images or {}))  # args: picklable
        self.reason, self.code, self.failed_images = reason, code, dict(failed_images or {})

    def __str__(self) -> str:
        return self.reason


def end_failed_job(code: int, reason: str | IcnnError, in_sweep: bool,
                   failed_images: Mapping[str, str] | None = None) -> NoReturn:
    """Exit with ``code``; inside a sweep raise :class:`JobFailed` so the other jobs run."""
    if in_sweep:
        if isinstance(reason, IcnnError):  # one line for the summary, with the fix
            reason = reason.problem + (f" (fix: {reason.fix})" if reason.fix else "")
        raise JobFailed(str(reason), code, failed_images) from None  # already logged
    sys.exit(code)
