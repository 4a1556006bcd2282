"""Turns the server acknowledged but could not write to disk.

A failed save is never only a log line: the agent stays in memory (its
history and, when the pool could not write it, its cache) and is reported
as unsaved by `/health`, `/v1/agents/{id}` and `/metrics`; this thread
writes it again with backoff (0.5 s doubling to 30 s) until the write lands,
and a graceful stop writes every unsaved agent once more and names the ones
it still could not save.
"""

from __future__ import annotations

import threading

from ..config import warn as default_warn

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
POLL_S = 2.0  # a cache save can fail outside any turn (an eviction): looked for this often


class Resaver:
    def __init__(self, metrics, warn=default_warn):
        self.metrics = metrics
        self.warn = warn
        self.runtime = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, runtime) -> None:
        self.runtime = runtime
        self._thread = threading.Thread(target=self._run, name="agentcache-resave", daemon=True)
        self._thread.start()

    def failed(self, agent: str) -> None:
        """A turn's save failed: count it and retry soon."""
        self.metrics.save_failures += 1
        self._wake.set()

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        while not self._stop.is_set():
            if not self.runtime.unsaved():
                delay = FIRST_RETRY_S
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            if self._stop.wait(delay):
                return
            self.metrics.save_retries += 1
            left = self.runtime.retry_saves(wait=True)
            if left:
                self.metrics.save_failures += len(left)
                delay = min(delay * 2, MAX_RETRY_S)
            else:
                self.warn("agentcache: every unsaved agent is now saved")
                delay = FIRST_RETRY_S

    def close(self) -> dict[str, str]:
        """Stop retrying, write every unsaved agent once more and report the ones that failed."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return {}
        self._thread.join()
        left = self.runtime.retry_saves(wait=True)
        if left:
            self.metrics.save_failures += len(left)
            self.warn(f"agentcache: NOT SAVED at shutdown: {', '.join(sorted(left))} "
                      f"({'; '.join(sorted(set(left.values())))}); their last turns are only in this process's memory and are lost")
        return left
