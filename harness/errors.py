"""User-facing errors: each prints as one line, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SkimbenchError(Exception):
    """A failure the user can fix; the CLI prints its message as one line."""

    exit_code = 1


class UsageError(SkimbenchError):
    """Bad names, options or settings (exit code 2)."""

    exit_code = 2


class DataError(SkimbenchError):
    """A data file is missing or malformed (exit code 1: the run cannot start)."""


def did_you_mean(kind: str, name: str, valid: Iterable[str], list_hint: str) -> UsageError:
    """An unknown-name error that names the closest valid names and how to list them all."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return UsageError(f"unknown {kind} {name!r}: {hint}see `skimbench list {list_hint}`")
