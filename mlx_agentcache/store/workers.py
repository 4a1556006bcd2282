"""The threads that move bytes: one writer (latest job per key wins) and readers.

Both take jobs (plain callables) and hand back what each returned or the
error it raised: nothing here holds a lock of the caller while a job runs,
so bookkeeping (pool.py) stays responsive while files are read or written.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from ..config import warn as default_warn


@dataclass
class Result:
    """What a job produced: `value`, or the exception it raised."""

    key: str
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class Writer:
    """One background thread running save jobs; a newer job for a key replaces a queued one.

    A job that raises is recorded in `failed` and reported once through
    `warn`; the thread goes on with the next job. Queued jobs finish before
    the interpreter exits.
    """

    def __init__(self, warn: Callable[[str], None] | None = None, describe: Callable[[str, BaseException], str] | None = None,
                 name: str = "agentcache-writer", finish_at_exit: bool = True):
        self.warn = warn or default_warn
        self.describe = describe or (lambda key, e: f"warning: {key} was not saved ({e})")
        self.name = name
        self.cv = threading.Condition()
        self.queue: deque[str] = deque()
        self.jobs: dict[str, Callable[[], Any]] = {}
        self.inflight: str | None = None
        self.failed: dict[str, str] = {}
        self.thread: threading.Thread | None = None
        if finish_at_exit:  # the thread is a daemon: queued saves must land before the interpreter goes
            ref = weakref.ref(self)
            atexit.register(lambda: ref() and ref().wait())

    def submit(self, key: str, job: Callable[[], Any]) -> None:
        with self.cv:
            if key not in self.jobs:
                self.queue.append(key)
            self.jobs[key] = job
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
            self.cv.notify_all()

    def _run(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue)
                key = self.queue.popleft()
                job = self.jobs.pop(key, None)
                if job is None:
                    continue
                self.inflight = key
            try:
                job()
                with self.cv:
                    self.failed.pop(key, None)
            except Exception as e:  # reported; the writer goes on
                with self.cv:
                    self.failed[key] = str(e)
                self.warn(self.describe(key, e))
            finally:
                job = None  # the thread outlives its jobs: let go of what this one held (a cache snapshot)
                with self.cv:
                    self.inflight = None
                    self.cv.notify_all()

    def pending(self, key: str | None = None) -> bool:
        with self.cv:
            if key is None:
                return bool(self.jobs) or self.inflight is not None
            return key in self.jobs or self.inflight == key

    def wait(self, key: str | None = None, timeout: float | None = None) -> bool:
        """Until `key`'s jobs (all jobs without a key) are done; False on timeout."""
        with self.cv:
            return self.cv.wait_for(lambda: not self._pending_locked(key), timeout)

    def _pending_locked(self, key: str | None) -> bool:
        if key is None:
            return bool(self.jobs) or self.inflight is not None
        return key in self.jobs or self.inflight == key

    def errors(self, key: str | None = None) -> dict[str, str]:
        """{key: error} of the last failed job per key (only `key` if given)."""
        with self.cv:
            if key is None:
                return dict(self.failed)
            return {key: self.failed[key]} if key in self.failed else {}

    def cancel(self, key: str) -> None:
        """Drop a queued job and wait for one in flight."""
        with self.cv:
            self.jobs.pop(key, None)
            self.failed.pop(key, None)
            self.cv.wait_for(lambda: self.inflight != key)


class Reader:
    """One thread running read jobs in order and handing each `Result` to `done`.

    MLX gives each thread its own stream; the thread releases it when it stops.
    """

    def __init__(self, done: Callable[[Result], None], name: str = "agentcache-reader"):
        self.done = done
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, key: str, job: Callable[[], Any]) -> None:
        self.jobs.put((key, job))

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        import time

        while (item := self.jobs.get()) is not None:
            key, job = item
            t0 = time.perf_counter()
            try:
                r = Result(key, value=job())
            except Exception as e:  # the job's caller decides; the reader goes on
                r = Result(key, error=e)
            r.seconds = time.perf_counter() - t0
            self.done(r)
        mx.clear_streams()
