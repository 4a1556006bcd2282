"""Residency: which agent caches are in memory, under what budget, and who is in a turn.

The ledger is bookkeeping only. It never reads, writes, stats or locks a
file and never waits: it decides (whom to evict, whether a turn fits, what
to save) and is told what happened (a load completed, a save landed with
the manifest generation it wrote, a save failed). The pool (pool.py) carries
its decisions out through the store (store/agent_store.py) and the writer
thread, as vLLM's offloading manager hands jobs to its worker.

It owns, each in one place: the hot LRU, the byte budget and what counts
against it, reservations for loads and turns, admission of new turns, pins,
the busy set (agents between checkout and checkin), the unsaved set, and
which positions each pending snapshot changed. One lock guards it all and
is held only briefly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from .config import warn as default_warn
from .kvcache import AgentCache
from .prefixes import own_bytes, prefix_of, shared_bytes
from .store import codec

PIN_SHARE = 0.5  # pinned agents hold at most this share of the budget: the others always have room
TURN_SLACK_TOKENS = 32  # the chat template's closing tokens after a reply, prefilled with the next message


class PinError(ValueError):
    """An agent cannot be pinned (no cache yet, or the pins would crowd out
    every other agent), or cannot be evicted because it is pinned."""


def bytes_for(cache: AgentCache, n: int) -> int:
    """Upper bound of a cache holding n tokens, from the shapes the model
    stores (`LayerCache.bytes_for`); 0 when a layer does not know them."""
    sizes = [layer.bytes_for(n) for layer in cache.layers]
    return 0 if 0 in sizes else sum(sizes)


@dataclass
class PoolStats:
    hits: dict = field(default_factory=lambda: {"hot": 0, "warm": 0, "cold": 0})
    bytes_written: int = 0
    bytes_read: int = 0
    bytes_collected: int = 0  # segments no manifest names any more, deleted after a save
    writes: int = 0
    write_errors: int = 0
    evictions: int = 0
    refused_files: int = 0
    prefix_hits: int = 0  # turns that attached a shared prefix instead of prefilling it
    over_budget: int = 0  # times the budget could not be kept (nothing evictable); each one warned
    peak_hot_bytes: int = 0  # the most the pool's accounting ever held
    unpinned: int = 0  # pins dropped because pinned agents outgrew PIN_SHARE of the budget

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SaveJob:
    """A snapshot taken under the ledger's lock, written after it is released."""

    name: str
    tensors: dict
    meta: dict
    prefix: str | None
    seq: int  # this ledger's snapshot number: a save writes what changed since the last one on disk


class Ledger:
    """budget: bytes (float('inf') never evicts). probe: a cache of the model, whose
    shapes size turns. shared: bytes of shared prefixes in memory, counted once.
    persist: False keeps caches in memory only (no save jobs)."""

    def __init__(self, budget: float, probe: AgentCache, *, fingerprint: str, model: str | None = None,
                 shared: Callable[[], int] = lambda: 0, share_prefixes: bool = False, persist: bool = True,
                 warn: Callable[[str], None] | None = None):
        self.budget = budget
        self.fingerprint = fingerprint
        self.model = model
        self.persist = persist
        self.share_prefixes = share_prefixes
        self.warn = warn or default_warn
        self._probe = probe
        self._shared = shared
        self.lock = threading.RLock()
        self.stats = PoolStats()
        self.hot: OrderedDict[str, AgentCache] = OrderedDict()
        self.busy: set[str] = set()
        self.unsaved: set[str] = set()  # hot state newer than its file and not queued
        self.pinned: set[str] = set()  # never evicted; for this ledger's life only
        self.out: dict[str, AgentCache] = {}  # checked out for a turn
        self._sizes: dict[str, int] = {}
        self._reserved: dict[str, int] = {}  # bytes claimed for a load or a turn, until checkin
        self._version: dict[str, int] = {}  # bumped at every change: an eviction checks nothing changed
        self._gen: dict[str, str | None] = {}  # the agent's manifest generation as last read or written here
        self._changed: dict[str, list[tuple[int, list[int]]]] = {}  # (seq, first changed position per layer) not yet on disk
        self._seq = 0
        self._over = False  # in an over-budget episode (warned once per episode)
        self._admitted = 0  # bytes of turns admitted and not yet ended (`admit`)

    # -- accounting --------------------------------------------------------------
    def hot_bytes(self) -> int:
        """Memory accounted for: every cache held (hot, or out for a load or a turn) plus
        each shared prefix once; recorded in `stats.peak_hot_bytes`."""
        with self.lock:
            b = sum(self._counted(n) for n in self.hot.keys() | self.out.keys() | self._reserved.keys()) + self._shared()
            self.stats.peak_hot_bytes = max(self.stats.peak_hot_bytes, b)
            return b

    def _counted(self, name: str) -> int:
        """One agent's own blocks as allocated; a cache out for a turn counts at
        the larger of its current size and what was reserved for the turn."""
        c = self.out.get(name)
        live = own_bytes(c) if c is not None else (self._sizes.get(name, 0) if name in self.hot else 0)
        return max(live, self._reserved.get(name, 0))

    def bytes_of(self, name: str) -> int:
        """What one agent's cache counts against the budget now."""
        with self.lock:
            return self._counted(name)

    def turn_bytes(self, prompt_tokens: int, max_tokens: int = 0) -> int:
        """Upper bound of an agent's own cache at the end of a turn: prompt, reply
        and the template's closing tokens, in whole blocks. 0 when the caches do
        not know their model's shapes (then only live sizes count)."""
        return bytes_for(self._probe, prompt_tokens + max_tokens + TURN_SLACK_TOKENS)

    def held_bytes(self) -> int:
        """Memory a new turn cannot get back by eviction, apart from other turns:
        idle hot agents that are pinned or unsaved, and shared prefixes."""
        with self.lock:
            stuck = sum(self._counted(n) for n in self.hot if n not in self.busy and (n in self.pinned or n in self.unsaved))
            return stuck + self._shared()

    # -- admission -----------------------------------------------------------------
    def admit(self, need: int) -> bool:
        """Admit a turn that may grow its cache by `need` bytes when the turns already
        admitted, the memory no eviction can free (`held_bytes`) and `need` fit the
        budget. The first turn is always admitted, so an agent larger than what is
        left still answers, alone (the budget is then exceeded, and warned)."""
        with self.lock:
            if self._admitted and self.budget != float("inf") and self._admitted + need + self.held_bytes() > self.budget:
                return False
            self._admitted += need
            return True

    def release(self, need: int) -> None:
        """A turn admitted with `need` ended."""
        with self.lock:
            self._admitted -= need

    # -- loads -------------------------------------------------------------------------
    def take_hot(self, name: str) -> AgentCache | None:
        """A hot agent's cache, checked out for a turn; otherwise None and the agent
        is reserved (busy) for its load: no second load, no eviction."""
        with self.lock:
            cache = self.hot.get(name)
            if cache is None:
                self.busy.add(name)
                return None
            self.hot.move_to_end(name)
            self.loaded(name, cache, "hot")
            return cache

    def loaded(self, name: str, cache: AgentCache, tier: str, bytes_read: int = 0, gen: str | None = None) -> None:
        """A load completed: the cache is out for a turn."""
        with self.lock:
            self.stats.hits[tier] += 1
            self.stats.bytes_read += bytes_read
            if tier == "warm":
                self._gen[name] = gen  # None for an older format: the next save writes everything
                self._changed[name] = []
            self.busy.add(name)
            self.out[name] = cache
            self.hot_bytes()

    def load_failed(self, name: str) -> None:
        """A load raised: the agent's reservation is released."""
        with self.lock:
            self.busy.discard(name)
            self._reserved.pop(name, None)

    def refused(self) -> None:
        """A file failed a check and was set aside (the load goes on cold)."""
        with self.lock:
            self.stats.refused_files += 1

    # -- room ------------------------------------------------------------------------
    def victim(self, name: str | None = None, need: int = 0) -> tuple[str, int] | None:
        """The next agent to evict so that everything fits the budget with `name` counted
        at (at least) `need` bytes: (victim, its version). None when it fits or nothing
        can be evicted; then `need` is reserved for `name` until its checkin (a turn is
        never lost for memory), and a budget that cannot be kept is counted and warned."""
        with self.lock:
            extra = max(need - self._counted(name), 0) if name is not None else 0
            total = self.hot_bytes() + extra
            if total > self.budget:
                v = next((n for n in self.hot if n not in self.busy and n not in self.unsaved and n not in self.pinned and n != name), None)
                if v is not None:
                    return v, self._version.get(v, 0)
            if name is not None and need:
                self._reserved[name] = max(self._reserved.get(name, 0), need)
            self.hot_bytes()
            if total <= self.budget:
                self._over = False
            elif not self._over:
                self._over = True
                self.stats.over_budget += 1
                why = ", ".join(f"{len(s)} {what}" for s, what in ((self.busy, "in a turn"), (self.pinned & self.hot.keys(), "pinned"), (self.unsaved, "unsaved")) if s)
                self.warn(f"warning: agent caches need {total / 2**20:.1f} MiB, over the {self.budget / 2**20:.1f} MiB budget, "
                          f"and nothing can be evicted ({why or 'no idle agent'})")
            return None

    def evict(self, name: str, version: int, on_disk: bool) -> bool:
        """Drop a victim chosen by `victim` if nothing changed since; `on_disk`: its
        last save landed (otherwise it is marked unsaved and stays)."""
        with self.lock:
            if name not in self.hot or name in self.busy or name in self.pinned or self._version.get(name, 0) != version:
                return False  # used or changed meanwhile: choose again
            if not on_disk:
                self.unsaved.add(name)
                return False
            self._drop(name)
            self.stats.evictions += 1
            return True

    def _drop(self, name: str) -> None:
        self.hot.pop(name, None)
        self._sizes.pop(name, None)

    def forget(self, name: str, unpin: bool = False) -> None:
        """Drop the agent from memory without saving. A pin stays unless `unpin`:
        the agent is kept hot again from its next turn."""
        with self.lock:
            for s in (self.unsaved, self.busy) + ((self.pinned,) if unpin else ()):
                s.discard(name)
            for d in (self.out, self._reserved, self._gen, self._changed):
                d.pop(name, None)
            self._drop(name)

    # -- turns -----------------------------------------------------------------------
    def checkin(self, name: str, cache: AgentCache, save: bool, pending: bool) -> SaveJob | None:
        """A turn ended: the cache is hot and most recently used. Returns its save job
        (`save`), or marks it unsaved when it is not saved and no save is `pending`."""
        with self.lock:
            self.busy.discard(name)
            self.out.pop(name, None)
            self._reserved.pop(name, None)
            self.hot[name] = cache
            self.hot.move_to_end(name)
            self.changed(name, cache)
            if not self.persist:
                return None  # memory only: eviction makes the agent cold
            if save:
                self.unsaved.discard(name)
                return self.snapshot(name, cache)
            if not pending:
                self.unsaved.add(name)
            return None

    def changed(self, name: str, cache: AgentCache) -> None:
        """A hot agent's cache changed (a turn, or a shared prefix attached): size and version."""
        with self.lock:
            self._sizes[name] = own_bytes(cache)
            self._version[name] = self._version.get(name, 0) + 1

    def idle(self, name: str) -> AgentCache | None:
        """The agent's cache if it is hot and in no turn."""
        with self.lock:
            return self.hot.get(name) if name not in self.busy else None

    def idle_agents(self) -> list[tuple[str, AgentCache]]:
        with self.lock:
            return [(n, c) for n, c in self.hot.items() if n not in self.busy]

    def caches(self) -> list[AgentCache]:
        """Every cache in memory (hot or out for a turn)."""
        with self.lock:
            return list({id(c): c for c in [*self.hot.values(), *self.out.values()]}.values())

    # -- saves ---------------------------------------------------------------------
    def snapshot(self, name: str, cache: AgentCache) -> SaveJob:
        """The cache's views and where it changed since the previous snapshot."""
        with self.lock:
            ref = prefix_of(cache) if self.share_prefixes else None
            tensors, meta = codec.snapshot(cache, self.fingerprint, ref, model=self.model)
            self._seq += 1
            self._changed.setdefault(name, []).append((self._seq, cache.take_changed()))
            return SaveJob(name, tensors, meta, ref[0] if ref else None, self._seq)

    def resave(self, name: str, cache: AgentCache) -> SaveJob | None:
        """After an in-place change (a prefix attached): a save job unless the agent is unsaved."""
        with self.lock:
            self.changed(name, cache)
            return self.snapshot(name, cache) if self.persist and name not in self.unsaved else None

    def owed(self, job: SaveJob) -> tuple[list[int] | None, str | None]:
        """What the job must write: the first changed position per layer over every
        snapshot up to it that is not on disk, and the generation it appends to."""
        with self.lock:
            owed = [c for seq, c in self._changed.get(job.name, []) if seq <= job.seq]
            return ([min(x) for x in zip(*owed)] if owed else None), self._gen.get(job.name)

    def saved(self, job: SaveJob, written: int, collected: int, gen: str) -> None:
        with self.lock:
            self._gen[job.name] = gen
            self._changed[job.name] = [(seq, c) for seq, c in self._changed.get(job.name, []) if seq > job.seq]
            self.stats.bytes_written += written
            self.stats.bytes_collected += collected
            self.stats.writes += 1

    def save_failed(self) -> None:
        with self.lock:
            self.stats.write_errors += 1

    def mark_unsaved(self, name: str) -> None:
        """The agent's newest state is not on disk: it is never evicted until a save lands."""
        with self.lock:
            self.unsaved.add(name)

    def unsaved_among(self, failed: dict[str, str]) -> dict[str, str]:
        """{agent: error} of hot agents whose memory is newer than their file."""
        with self.lock:
            return {n: failed.get(n, "not saved") for n in self.hot if n in failed or n in self.unsaved}

    def retry_jobs(self, failed: Iterable[str]) -> list[SaveJob]:
        """New save jobs for every idle hot agent whose last save failed."""
        failed = set(failed)
        with self.lock:
            names = [n for n in self.hot if (n in failed or n in self.unsaved) and n not in self.busy and self.persist]
            self.unsaved.difference_update(names)
            return [self.snapshot(n, self.hot[n]) for n in names]

    # -- pins ------------------------------------------------------------------------
    def pin(self, name: str, on_disk: int | None) -> None:
        """Never evict the agent (from its next turn on, if it is warm now). Refused
        (PinError) when it has no cache yet (`on_disk` None and not in memory), or when
        pinned agents would then hold more than PIN_SHARE of the budget."""
        with self.lock:
            if name in self.pinned:
                return
            if name in self.hot or name in self.out:
                size = self._counted(name)
            elif on_disk is not None:
                size = on_disk
            else:
                raise PinError(f"agent '{name}' has no cache to pin yet (it gets one at its first turn)")
            pinned = sum(self._counted(n) for n in self.pinned)
            cap = self.budget * PIN_SHARE
            if pinned + size > cap:
                raise PinError(f"pinning agent '{name}' ({size / 2**20:.2f} MiB) would let pinned agents hold {(pinned + size) / 2**20:.2f} MiB, "
                               f"over {PIN_SHARE:.0%} of the {self.budget / 2**20:.2f} MiB cache budget (the rest must stay free for other agents)")
            self.pinned.add(name)

    def unpin(self, name: str) -> bool:
        with self.lock:
            was = name in self.pinned
            self.pinned.discard(name)
            return was

    def unpin_overflow(self) -> None:
        """Pinned agents grow with their turns: past PIN_SHARE of the budget the
        least recently used are unpinned (warned), so other agents keep room."""
        with self.lock:
            order = [n for n in self.hot if n in self.pinned] + sorted(self.pinned - self.hot.keys())
            total = sum(self._counted(n) for n in self.pinned)
            for n in order:
                if total <= self.budget * PIN_SHARE:
                    break
                self.pinned.discard(n)
                self.stats.unpinned += 1
                total -= self._counted(n)
                self.warn(f"warning: agent '{n}' unpinned: pinned agents grew past {PIN_SHARE:.0%} of the {self.budget / 2**20:.2f} MiB cache budget")

    # -- views -----------------------------------------------------------------------
    def summary(self, pending: set[str]) -> dict:
        """Counters plus the current state, for the API and `/agents`."""
        with self.lock:
            saved = sum(shared_bytes(c) for c in self.hot.values() if prefix_of(c))
            return {
                **self.stats.as_dict(),
                "hot_agents": len(self.hot),
                "hot_bytes": self.hot_bytes(),
                "peak_hot_bytes": self.stats.peak_hot_bytes,
                "pinned": sorted(self.pinned),
                "budget_bytes": self.budget if self.budget != float("inf") else None,
                "pending_writes": len(pending & self.hot.keys()),
                "unsaved": sorted(self.unsaved),
                "shared_prefix_bytes_saved": max(saved - self._shared(), 0),
            }

    def resident(self, name: str, pending: bool) -> dict | None:
        """What memory holds of a hot agent (tokens, bytes, save state), else None."""
        with self.lock:
            c = self.hot.get(name)
            if c is None:
                return None
            return {"tier": "hot", "tokens": c.offset, "bytes": c.nbytes, "pending_write": pending, "unsaved": name in self.unsaved,
                    "pinned": name in self.pinned}
