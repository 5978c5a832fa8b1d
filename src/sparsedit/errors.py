"""User-facing errors.

Everything the user can cause (a wrong path, a mismatched checkpoint, an invalid rate) is raised as
:class:`SparseditError` with a one-line message that names the problem and the fix. The CLI prints
such errors without a traceback and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class SparseditError(Exception):
    """An error caused by user input; its message is one line: the problem, then the fix."""


class CheckpointError(SparseditError):
    """A checkpoint could not be read or does not match the model it should build."""
