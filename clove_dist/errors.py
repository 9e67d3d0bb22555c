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


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
    return guarded
