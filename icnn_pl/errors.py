"""User-facing errors: each names the problem and the fix.

Expected failures (bad config, missing file, bad features) raise one of these; the
entry point prints the message without a traceback and exits non-zero.
"""

from __future__ import annotations


class IcnnError(Exception):
    """Base class of every error icnn-pl raises on purpose."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class ConfigError(IcnnError, ValueError):
    """A configuration value or function argument is wrong."""


class DataError(IcnnError, ValueError):
    """Input data (features, images, targets) is missing, malformed or unusable."""


class WeightsError(IcnnError, ValueError):
    """A weight file is missing, unreadable or for another architecture."""
