"""User-facing errors.

Everything the user can cause (a wrong path, a mismatched checkpoint, an invalid rate) is raised as
:class:`SparseditError` with a one-line message that names the problem and the fix. The CLI prints
such errors without a traceback and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


class SparseditError(Exception):
    """An error caused by user input; its message is one line: the problem, then the fix."""


class CheckpointError(SparseditError):
    """A checkpoint could not be read or does not match the model it should build."""


def os_error_at(err: OSError, path: object) -> OSError:
    """``err`` naming ``path``: the file the user asked for, where the failing call named none (a ``write()``) or
    a temporary name beside it. The CLI prints such errors as one line with the path and the fix."""
    return OSError(err.errno, err.strerror, str(path))


@contextlib.contextmanager
def quiet_logs(library_logging: Any, level: int = logging.CRITICAL) -> Iterator[None]:
    """A library's log lines (``diffusers.utils.logging``, ``transformers.utils.logging``) below ``level`` off for the
    body: their warnings and "error occurred while fetching" lines would stand beside our one-line error."""
    before = library_logging.get_verbosity()
    library_logging.set_verbosity(level)
    try:
        yield
    finally:
        library_logging.set_verbosity(before)
