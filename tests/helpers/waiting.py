"""The one polling helper of the tests and benchmarks: wait until a check returns something truthy.

A wait is a condition, not a timed assertion: its timeout only bounds a hang, and running out of it
fails naming what was awaited and what the check said last.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class TimedOut(AssertionError):
    """A wait ran out of time (an AssertionError, so pytest reports it as the test's failure)."""


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 180,
    interval: float = 0.5,
    *,
    retry_on: tuple[type[BaseException], ...] = (),
    explain: Callable[[], str] | None = None,
) -> Any:
    """Return check()'s first truthy value, polling every ``interval`` s.

    An exception of a type in ``retry_on`` counts as "not yet" (the thing may still be starting);
    any other propagates at once. After ``timeout`` s raise :class:`TimedOut` naming ``what`` and the
    last value (or exception), followed by ``explain()`` when given (e.g. a log tail).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except retry_on as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f"\n{explain()}" if explain is not None else ""
    raise TimedOut(f"timed out after {timeout}s waiting for {what} (last: {last!r}){detail}")
