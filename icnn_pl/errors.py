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


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a library's exception on one line (their messages can span
    screens, e.g. torch's unpickling advice), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    for marker in ("WeightsUnpickler error:",):  # torch: the cause after the advice
        if marker in text:
            text = text[text.index(marker) + len(marker):].strip()
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
