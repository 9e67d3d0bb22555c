"""User errors and the entry-point guard that prints them as one line.

A user mistake (bad config, missing file, wrong checkpoint) raises a UserError subclass; `entry_point` turns it into
`error: <message>` on stderr and exit status 2, with no traceback. Anything else is an internal error and keeps its
traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(ValueError):
    """A mistake the user can fix; its message is one line naming the offending key, value or file."""


def one_line(message: str) -> str:
    """A user error raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its own line."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return message.strip()
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "Error" in head and " " not in head else last


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(str(e))}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
    return guarded
