"""How many threads the store's read and write pools use: one rule for both (an explicit count, else an
environment variable, else every core), and one sentence for a bad value."""

from __future__ import annotations

import os


class ThreadCountError(ValueError):
    """A thread count (option or environment variable) that is not a whole number >= 1."""


def thread_count(env: str, threads: int | None = None) -> int:
    """`threads`, else ``$env``, else every core."""
    if threads is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return max(1, os.cpu_count() or 1)
        try:
            threads = int(raw)
        except ValueError:
            raise ThreadCountError(f"{env}={raw!r}: expected a whole number of threads") from None
        if threads < 1:
            raise ThreadCountError(f"{env}={raw!r}: at least one thread is needed")
        return threads
    if threads < 1:
        raise ThreadCountError(f"{threads} threads: the count must be >= 1")
    return int(threads)
