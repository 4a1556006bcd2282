"""Which agent caches live in memory, which on disk: residency under a budget.

Tiers: hot (blocks in memory), warm (files on disk, nothing in memory),
cold (nothing cached: the next turn prefills everything).

`CachePool` is the coordinator of three parts and keeps no state and no
files of its own:

* the residency ledger (ledger.py) decides: the hot LRU, the budget and
  reservations, admission, pins, who is busy in a turn and who is unsaved;
* the agent store (store/agent_store.py) does every file operation and
  reports back by return value;
* shared prefixes (sharing.py) attach and share blocks between the two.

A load is reserved in the ledger, read by the store with no lock held and
completed in the ledger; a save is a snapshot the ledger hands out, written
by the store on the writer thread (write-behind), and reported back to the
ledger. Room is made before memory is taken: the ledger names the least
recently used idle, unpinned agent, the pool waits for that agent's own
pending write only, and the ledger drops it if nothing changed meanwhile.
An agent whose save failed stays hot and the user is warned. A file that
fails any check is moved aside by the store and the agent goes cold. See
docs/pool.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import catalog
from .config import warn as default_warn
from .kvcache import AgentCache
from .prefixes import own_bytes
from .ledger import Ledger, PinError, PoolStats, SaveJob
from .sharing import sharing_for
from .store.agent_store import LOCK_TIMEOUT_S, AgentBusyError, AgentStore, Refused

__all__ = ["CachePool", "PinError", "AgentBusyError", "PoolStats", "default_budget"]
from .store.container import CacheWriteError
from .store.layout import validate_agent_name
from .store.workers import Writer

BUDGET_FRACTION = 0.4  # of available memory; 10.2 of 24 GB on the reference M4 Pro is 0.42


def available_memory() -> int:
    """Bytes the OS could hand out now (Linux MemAvailable; elsewhere physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class FreedMemory:
    """How much memory MLX keeps after caches are freed, on the CPU backend.

    MLX's CPU allocator keeps at most 32 MB of freed buffers and returns the rest
    to the system, so a restore after an eviction faults every page of its new
    arrays in again; on a small virtual machine that costs as much as reading the
    file. Metal's allocator keeps freed buffers up to its memory limit by itself.
    Here the pool lets MLX keep the buffers an eviction frees, as far as the budget
    has room for them: they are handed to the next restore of the same shapes, and
    the agent caches and what MLX keeps stay within the budget (a restore of other
    shapes may overshoot it by its own bytes until it completes). Other freed
    memory (a prefill's activations) goes back as before: the limit never grows
    past what MLX holds plus what an eviction frees. An unlimited budget changes
    nothing. The limit is the process's: the last pool to fit it sets it, `reset`
    puts MLX's own back."""

    default: int | None = None  # MLX's own limit in this process, before any pool changed it

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    @staticmethod
    def _mx():
        import mlx.core as mx

        return None if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()) else mx

    def fit(self, freeing: int = 0) -> None:
        mx = self._mx()
        if mx is None or self.ledger.budget == float("inf"):
            return
        keep = min(int(self.ledger.budget - self.ledger.hot_bytes()), mx.get_cache_memory()) + freeing
        was = mx.set_cache_limit(max(keep, FreedMemory.default or 0))
        if FreedMemory.default is None:
            FreedMemory.default = was
            mx.set_cache_limit(max(keep, was))

    @classmethod
    def reset(cls) -> None:
        mx = cls._mx()
        if mx is not None and cls.default is not None:
            mx.set_cache_limit(cls.default)


def default_budget() -> int:
    """Hot-cache budget when none is given: a fraction of available memory,
    leaving the rest to model weights, activations and everything else."""
    return int(available_memory() * BUDGET_FRACTION)


class CachePool:
    """Hot agent caches under a byte budget, backed by the agent store.

    budget_bytes: None means `default_budget()`; float('inf') never evicts.
    write_behind: False saves inside `checkin` (errors raise CacheWriteError).
    share_prefixes: keep common leading blocks once (sharing.py).
    persist: False keeps caches in memory only; evicted agents go cold
    (re-prefill), for ephemeral agents and for measuring what disk buys.
    """

    def __init__(
        self,
        cache_dir: Path,
        fingerprint: str,
        new_cache: Callable[[], AgentCache],
        budget_bytes: int | None = None,
        warn: Callable[[str], None] | None = None,
        *,
        model: str | None = None,
        write_behind: bool = True,
        share_prefixes: bool = True,
        lock_timeout: float = LOCK_TIMEOUT_S,
        persist: bool = True,
    ):
        self.warn = warn or default_warn
        self.new_cache = new_cache
        self.persist = persist
        self.fingerprint = fingerprint
        self.store = AgentStore(cache_dir, fingerprint, lambda: new_cache().layers, model=model, lock_timeout=lock_timeout)
        self.dir = self.store.dir
        self.layout = self.store.layout
        probe = new_cache()
        self.sharing = None
        self.ledger = Ledger(default_budget() if budget_bytes is None else budget_bytes, probe, fingerprint=fingerprint, model=model,
                             shared=lambda: self.sharing.index.memory_bytes() if self.sharing else 0, persist=persist, warn=self.warn)
        if share_prefixes:
            self.sharing = sharing_for(self.ledger, self.store, probe, self.warn, self._make_room)
        self.ledger.share_prefixes = self.sharing is not None
        self.freed = FreedMemory(self.ledger)
        self._writer = Writer(warn=self.warn, describe=lambda name, e: f"warning: agent '{name}' was not saved ({getattr(e, 'strerror', None) or e}); it stays in memory") if write_behind else None
        if self.sharing:
            self.sharing.scan()

    # -- the ledger's state, for callers and tests --------------------------------------
    budget = property(lambda self: self.ledger.budget, lambda self, b: setattr(self.ledger, "budget", b))
    stats = property(lambda self: self.ledger.stats)
    hot = property(lambda self: self.ledger.hot)
    busy = property(lambda self: self.ledger.busy)
    unsaved = property(lambda self: self.ledger.unsaved)
    pinned = property(lambda self: self.ledger.pinned)
    prefixes = property(lambda self: self.sharing.index if self.sharing else None)
    hot_bytes = property(lambda self: self.ledger.hot_bytes())

    def path(self, name: str) -> Path:
        return self.store.path(name)

    def known(self) -> list[str]:
        """Agents with a cache file here, or hot in this pool."""
        with self.ledger.lock:
            hot = set(self.ledger.hot)
        return sorted(set(self.store.names()) | hot)

    def tier(self, name: str) -> str:
        if name in self.ledger.hot:
            return "hot"
        return "warm" if self.persist and self.store.exists(name) else "cold"

    def turn_bytes(self, prompt_tokens: int, max_tokens: int = 0) -> int:
        return self.ledger.turn_bytes(prompt_tokens, max_tokens)

    def held_bytes(self) -> int:
        return self.ledger.held_bytes()

    # -- loads: reserve (ledger), read (store, no lock), complete (ledger) ------------------
    def checkout(self, name: str) -> tuple[AgentCache, str]:
        """The agent's cache for a turn, and the tier it came from. Reads a warm
        agent's files on the calling thread, with no lock held."""
        validate_agent_name(name)
        cache = self.ledger.take_hot(name)
        if cache is not None:
            return cache, "hot"
        try:
            got = self._read(name) if self.persist else None
        except BaseException:
            self.ledger.load_failed(name)
            raise
        if got is None:
            cache = self.new_cache()
            self.ledger.loaded(name, cache, "cold")
            return cache, "cold"
        self.ledger.loaded(name, got.cache, "warm", got.bytes_read, got.gen)
        self.freed.fit()
        return got.cache, "warm"

    def _read(self, name: str):
        size = self.store.disk_bytes(name)
        if size is None:
            return None
        self._make_room(name, size)  # the files' tensors are about what the arrays take
        got = self.store.read(name, self.sharing.source if self.sharing else None)
        if isinstance(got, Refused):
            self.ledger.refused()
            self.warn(f"warning: cache for agent '{name}' not used ({got.reason}); {got.where}; re-prefilling")
            return None
        return got

    # -- turns ---------------------------------------------------------------------
    def begin_turn(self, name: str, prompt: list[int], max_tokens: int = 0) -> tuple[AgentCache, int]:
        """Ready the agent's cache for `prompt`: checked out (now, if the caller did
        not), room made for what the turn can grow to (`turn_bytes`, evicting
        idle agents before any memory is taken), started from a shared prefix
        when that reuses more, and cut to the longest prefix of `prompt` it
        holds. Returns (cache, tokens reused)."""
        with self.ledger.lock:
            cache = self.ledger.out.get(name)
        if cache is None:
            cache, _ = self.checkout(name)
        self._make_room(name, self.ledger.turn_bytes(len(prompt), max_tokens))
        self.freed.fit()  # the turn's reservation counts: what MLX keeps shrinks to the room left
        if prompt and self.sharing:
            _, jobs = self.sharing.adopt(name, cache, prompt)
            self._run(jobs)
        reused = cache.reusable_prefix(prompt)
        cache.trim_to(reused)
        return cache, reused

    def checkin(self, name: str, cache: AgentCache, persist: bool = True) -> int:
        """Keep the cache hot, queue (or do) its save, and evict others if over budget.

        Returns bytes written by a synchronous save (0 with write-behind).
        """
        self._make_room(name, own_bytes(cache))  # a turn that outgrew its reservation: room first
        jobs: list[SaveJob] = self.sharing.on_checkin(name, cache) if self.sharing else []
        job = self.ledger.checkin(name, cache, save=persist, pending=self.pending(name))
        if job is not None:
            jobs.append(job)
        try:
            written = self._run(jobs, raise_for=name)
        finally:
            self.ledger.unpin_overflow()
            self._make_room()
            self.freed.fit()
        return written

    # -- saving ----------------------------------------------------------------
    def _run(self, jobs: list[SaveJob], raise_for: str | None = None) -> int:
        """Hand save jobs to the writer, or write them now (no lock held).
        A synchronous failure marks the agent unsaved; it raises for `raise_for`."""
        written = 0
        for job in jobs:
            if self._writer is not None:
                self._writer.submit(job.name, lambda job=job: self._write(job))
                continue
            try:
                written += self._write(job)
            except CacheWriteError:
                self.ledger.mark_unsaved(job.name)
                if job.name == raise_for:
                    raise
        return written

    def _write(self, job: SaveJob) -> int:
        block = self.sharing.block(job.prefix) if self.sharing else None
        try:
            saved = self.store.write(job.name, job.tensors, job.meta, lambda: self.ledger.owed(job), block)
        except Exception:
            self.ledger.save_failed()
            raise
        if self.sharing:
            self.sharing.written(job)
        self.ledger.saved(job, saved.bytes_written, saved.bytes_collected, saved.gen)
        return saved.bytes_written

    def save(self, name: str, cache: AgentCache) -> int:
        """Save now, on this thread (raises CacheWriteError)."""
        return self._write(self.ledger.snapshot(name, cache))

    def flush(self, name: str | None = None, timeout: float | None = None) -> dict[str, str]:
        """Wait for pending saves; returns {agent: error} for saves that failed."""
        if self._writer is None:
            return {}
        self._writer.wait(name, timeout)
        return self._writer.errors(name)

    def save_errors(self) -> dict[str, str]:
        """{agent: error} of hot agents whose memory is newer than their file."""
        return self.ledger.unsaved_among(self._writer.errors() if self._writer else {})

    def retry_saves(self) -> list[str]:
        """Queue a new save of every idle hot agent whose last save failed; returns their names."""
        jobs = self.ledger.retry_jobs(self._writer.errors() if self._writer else {})
        self._run(jobs)
        return [j.name for j in jobs]

    def pending(self, name: str | None = None) -> bool:
        return bool(self._writer and self._writer.pending(name))

    # -- eviction --------------------------------------------------------------
    def _make_room(self, name: str | None = None, need: int = 0) -> None:
        """Evict what the ledger names until everything fits the budget with `name`
        counted at (at least) `need` bytes. Waiting for a victim's own pending save
        and checking its file happen here, with no lock held; the ledger drops the
        victim only if nothing changed meanwhile."""
        while (chosen := self.ledger.victim(name, need)) is not None:
            victim, version = chosen
            if self._writer is not None:
                self._writer.wait(victim)  # its own pending write only
            if self.pending(victim):
                continue
            on_disk = not (self._writer and self._writer.errors(victim)) and (not self.persist or self.store.exists(victim))
            self.freed.fit(self.ledger.bytes_of(victim))
            if self.ledger.evict(victim, version, on_disk) and self.sharing:
                self.sharing.release_unused()

    def evict(self, name: str, before: Callable[[], None] = lambda: None) -> bool:
        """Write an idle hot agent's cache to disk and free its memory (hot -> warm);
        `before` runs once it is known to be saved. False if it was not hot; raises
        CacheWriteError if it could not be saved, PinError if it is pinned."""
        if name not in self.ledger.hot:
            return False
        if name in self.ledger.pinned:
            raise PinError(f"agent '{name}' is pinned; unpin it before evicting it")
        failed = self.flush(name)
        if failed or name in self.ledger.unsaved or not self.store.exists(name):
            raise CacheWriteError(f"agent '{name}' could not be saved ({failed.get(name, 'not on disk')}); it stays in memory")
        before()
        self.forget(name)
        return True

    def forget(self, name: str) -> None:
        """Drop the agent from memory without saving (pending saves are cancelled).
        A pin stays: the agent is kept hot again from its next turn."""
        if self._writer is not None:
            self._writer.cancel(name)
        self.freed.fit(self.ledger.bytes_of(name))
        self.ledger.forget(name)
        if self.sharing:
            self.sharing.release_unused()

    def remove(self, name: str) -> list[Path]:
        """Forget the agent (and its pin) and delete its cache file and segments (under its lock). Returns removed paths."""
        if self._writer is not None:
            self._writer.cancel(name)
        self.ledger.forget(name, unpin=True)
        removed = self.store.remove(name)
        if self.sharing:
            self.sharing.release_unused()
            self.sharing.removed(name)
        return removed

    # -- pins ------------------------------------------------------------------
    def pin(self, name: str) -> None:
        """Never evict the agent (from its next turn on, if it is warm now); see Ledger.pin."""
        validate_agent_name(name)
        self.ledger.pin(name, self.store.disk_bytes(name) if self.persist else None)

    def unpin(self, name: str) -> bool:
        """Let the agent be evicted again; False if it was not pinned."""
        was = self.ledger.unpin(name)
        if was:
            self._make_room()
        return was

    def close(self) -> None:
        """Finish pending saves (call before exit; also runs at interpreter exit) and
        let go of every cache whose file is current, so that its memory is free now:
        the pool and its callbacks reference each other, and without this a closed
        pool's caches would live on until Python's cycle collector ran. Unsaved caches,
        caches in a turn and a memory-only pool's caches stay."""
        self.flush()
        self.freed.reset()
        if not self.persist:
            return
        failed = self.save_errors()
        for name, _ in self.ledger.idle_agents():
            if name not in failed and name not in self.ledger.unsaved and not self.pending(name):
                self.ledger.forget(name)

    def gc_prefixes(self) -> list[Path]:
        """Delete prefix block files that no agent file (of any process) and no
        cache in memory here uses. Returns the removed paths."""
        if self.sharing is None:
            return []
        return [self.layout.block_file(k) for k in self.sharing.gc()]

    # -- views -------------------------------------------------------------
    def summary(self) -> dict:
        """Counters plus the pool's current state, for the API and `/agents`."""
        pending = {n for n in list(self.ledger.hot) if self.pending(n)}
        return {**self.ledger.summary(pending), "shared_prefixes_in_memory": self.sharing.index.in_memory() if self.sharing else 0}

    def resident(self, name: str) -> dict | None:
        """What memory holds of a hot agent (tokens, bytes, save state), else None."""
        return self.ledger.resident(name, self.pending(name))

    def describe(self, name: str, stored: dict | None = None) -> dict:
        """Tier, tokens, bytes, model and last use of one agent, without loading its tensors
        (`stored`: what a listing already read of its files)."""
        info = dict(stored) if stored is not None else catalog.describe(self.dir, name)
        info["model_match"] = info.get("fingerprint") == self.fingerprint if info.get("fingerprint") else None
        if not self.persist and info["tier"] == "warm":
            info["tier"] = "cold"
        info["pinned"] = name in self.ledger.pinned
        hot = self.resident(name)
        if hot:
            info.update(hot)
        return info
