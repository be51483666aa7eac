"""Reading ahead in a background thread: a bounded queue between a reader thread and its consumer, which the
streamed training windows (probe/stream.py) and the evaluation reads (probe/evalbatches.py) share."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Pulls items from an iterator in a background thread, at most `depth` ready ahead.

    Errors in the thread are re-raised in the consumer. `close()` (also on garbage collection of
    the consuming generator) stops the thread at its next hand-over and drops what it holds.
    """

    _END = object()

    def __init__(self, items: Iterator, *, depth: int = 1, name: str = "combo-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._items = items
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(err))

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # free what is queued; the thread sees the flag at its next put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break


__all__ = ["Prefetcher"]
