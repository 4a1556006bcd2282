"""One turn of an agent at a time, across processes and runtimes.

A turn reads the agent's history (and cache), appends to it and saves both.
Two overlapping turns would start from the same history, and the later save
would drop the other's messages. So a turn holds the agent's turn lock
(`Layout.turn_lock_file`, an OS `flock`, which the kernel releases if the
process dies) from before it reads the history until its history and cache
are saved. A second turn of the same agent in another process or runtime
waits for it (up to `TURN_WAIT_S`), then starts from the history the first
one saved: both turns land, in the order they got the lock. After the wait it
fails with `TurnBusyError`, and nothing is recorded.

Inside one runtime the turns of an agent already run one after another on
its scheduler; they share one hold of the lock (`TurnLocks` counts them),
taken by the first and released after the last one's saves.

A directory where the lock file cannot be created (read-only) is used
without the lock: nothing can be saved there, so no save can overwrite
another's.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

TURN_WAIT_S = 300.0  # a turn of another process: model load, prefill and a long reply on a slow machine


class TurnBusyError(TimeoutError):
    """Another process or runtime kept the agent in a turn for longer than the wait."""


class TurnLock:
    """An exclusive OS lock on one file; may be released by another thread than the one that took it."""

    def __init__(self, path: Path, name: str):
        self.path = Path(path)
        self.name = name
        self._fd: int | None = None

    def acquire(self, wait_s: float) -> bool:
        """Take the lock, waiting up to `wait_s`. False when the lock file cannot be
        created or opened (a read-only directory); raises TurnBusyError on timeout."""
        fd = self._open()
        if fd is None:
            return False
        deadline = time.monotonic() + wait_s
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.close(fd)
                    raise TurnBusyError(f"agent '{self.name}' is in a turn in another process or runtime (waited {wait_s:g} s); try again later") from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.1)

    def _open(self) -> int | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # an existing lock file in a read-only directory still locks
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                return os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError:
                continue
        return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class TurnLocks:
    """The turn locks one runtime holds: one hold per agent, counted per queued turn."""

    def __init__(self, lock_file: Callable[[str], Path], wait_s: float = TURN_WAIT_S):
        self.lock_file = lock_file
        self.wait_s = wait_s
        self._mu = threading.Lock()
        self._gates: dict[str, threading.Lock] = {}
        self._held: dict[str, list] = {}  # name -> [TurnLock | None, turns]
        self._releasing: set[threading.Thread] = set()

    def _gate(self, name: str) -> threading.Lock:
        with self._mu:
            return self._gates.setdefault(name, threading.Lock())

    def hold(self, name: str) -> bool:
        """Count one more turn of `name`. The first takes the OS lock (waiting up
        to `wait_s`, else TurnBusyError) and returns True: the caller then re-reads
        what another process may have saved meanwhile."""
        with self._gate(name):
            with self._mu:
                entry = self._held.get(name)
                if entry is not None:
                    entry[1] += 1
                    return False
            lock = TurnLock(self.lock_file(name), name)
            got = lock.acquire(self.wait_s)
            with self._mu:
                self._held[name] = [lock if got else None, 1]
            return True

    def release(self, name: str) -> None:
        """One turn of `name` is over (its saves landed); the last one frees the OS lock."""
        with self._gate(name):
            with self._mu:
                entry = self._held.get(name)
                if entry is None:
                    return
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del self._held[name]
            if entry[0] is not None:
                entry[0].release()

    def release_after(self, name: str, saved: Callable[[], object]) -> None:
        """Release once `saved()` returned (it waits for the turn's saves), on a
        thread of its own: the engine thread never waits for the disk."""

        def run() -> None:
            try:
                saved()
            finally:
                self.release(name)
                with self._mu:
                    self._releasing.discard(threading.current_thread())

        t = threading.Thread(target=run, name=f"agentcache-turnlock-{name}", daemon=True)
        with self._mu:  # started before `wait` can see it (joining an unstarted thread raises)
            self._releasing.add(t)
            t.start()

    def held(self, name: str) -> bool:
        with self._mu:
            return name in self._held

    def wait(self, timeout: float | None = None) -> None:
        """Until every pending release ran."""
        with self._mu:
            threads = list(self._releasing)
        for t in threads:
            t.join(timeout)
