"""Which agent caches live in memory, which on disk: residency under a budget.

Tiers: hot (blocks in memory), warm (file on disk, nothing in memory),
cold (nothing cached: the next turn prefills everything).

`CachePool` is bookkeeping: the hot LRU, the byte budget, who is busy in a
turn and who is unsaved. Bytes move through store/: a load is prepared under
the pool's lock (the agent is reserved), read with no lock held, and
completed under the lock; a save takes a snapshot under the lock and hands it
to the store's writer thread (write-behind). The lock is never held while a
file is read, written, stat'ed or locked, nor while waiting for the writer,
so the engine thread's `begin_turn` and `checkin` never wait behind a
background reload.

Every cache the pool holds counts against the budget: hot agents, and caches
checked out for a turn (at the larger of their current size and the turn's
reservation, `turn_bytes`). Room is made before memory is taken (a load, a
turn, a checkin): the least recently used idle, unpinned agent is evicted,
only its own pending write is waited for, then its blocks are freed. An
agent whose save failed stays hot (it is never evicted unsaved) and the user
is warned; so is every time the budget cannot be kept (`stats.over_budget`).
Pinned agents are never evicted; together they may hold at most
`PIN_SHARE` of the budget. A file that fails any check is moved aside and the
agent goes cold. See docs/pool.md.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from . import catalog
from .config import warn as default_warn
from .kvcache import AgentCache
from .prefixes import PrefixIndex, PrefixMissing, attach, eligible, own_bytes, prefix_of, shareable, shared_bytes
from .store import codec, container, formats, segments
from .store.container import CacheFileError, CacheWriteError
from .store.layout import Layout, validate_agent_name
from .store.workers import Writer

LOCK_TIMEOUT_S = 30.0
BUDGET_FRACTION = 0.4  # of available memory; 10.2 of 24 GB on the reference M4 Pro is 0.42
PIN_SHARE = 0.5  # pinned agents hold at most this share of the budget: the others always have room
TURN_SLACK_TOKENS = 32  # the chat template's closing tokens after a reply, prefilled with the next message


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


def default_budget() -> int:
    """Hot-cache budget when none is given: a fraction of available memory,
    leaving the rest to model weights, activations and everything else."""
    return int(available_memory() * BUDGET_FRACTION)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


class AgentBusyError(CacheWriteError):
    """Another process holds the agent's lock."""


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
class _SaveJob:
    """A snapshot taken under the pool's lock, written after it is released."""

    name: str
    tensors: dict
    meta: dict
    prefix: str | None
    seq: int  # this pool's snapshot number: a save writes what changed since the last one on disk


class CachePool:
    """Hot agent caches under a byte budget, backed by one file per agent.

    budget_bytes: None means `default_budget()`; float('inf') never evicts.
    write_behind: False saves inside `checkin` (errors raise CacheWriteError).
    share_prefixes: keep common leading blocks once (prefixes.py).
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
        self.layout = Layout(cache_dir)
        self.dir = self.layout.dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.model = model
        self.new_cache = new_cache
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self.warn = warn or default_warn
        self.lock_timeout = lock_timeout
        self.persist = persist
        self.hot: OrderedDict[str, AgentCache] = OrderedDict()
        self.busy: set[str] = set()
        self.unsaved: set[str] = set()  # hot state newer than its file and not queued
        self.pinned: set[str] = set()  # never evicted; for this pool's life only
        self.stats = PoolStats()
        self._out: dict[str, AgentCache] = {}  # checked out for a turn
        self._sizes: dict[str, int] = {}
        self._reserved: dict[str, int] = {}  # bytes claimed for a load or a turn, until checkin
        self._version: dict[str, int] = {}  # bumped at every checkin: an eviction checks nothing changed
        self._gen: dict[str, str | None] = {}  # generation of the agent's manifest as this pool last read or wrote it
        self._changed: dict[str, list[tuple[int, list[int]]]] = {}  # (seq, first changed position per layer) of snapshots not yet on disk
        self._seq = 0
        self._lock = threading.RLock()
        self._over = False  # in an over-budget episode (warned once per episode)
        probe = new_cache()
        self._probe = probe  # knows the model's shapes: turn_bytes asks it
        self.prefixes = PrefixIndex(fingerprint, probe.layers[0].mode) if share_prefixes and eligible(probe) else None
        self._writer = Writer(warn=self.warn, describe=lambda name, e: f"warning: agent '{name}' was not saved ({getattr(e, 'strerror', None) or e}); it stays in memory") if write_behind else None
        self.layout.remove_stale_tmp(agents=[])  # not one glob per agent: a save cleans its own segments folder
        self._scan()

    # -- names and files ---------------------------------------------------
    def path(self, name: str) -> Path:
        return self.layout.agent_file(name)

    def agent_lock(self, name: str, timeout: float | None = None) -> FileLock:
        """The per-agent lock every writer (in any process) holds while replacing the file."""
        return self.layout.agent_lock(name, self.lock_timeout if timeout is None else timeout)

    def known(self) -> list[str]:
        """Agents with a cache file here, or hot in this pool."""
        with self._lock:
            hot = set(self.hot)
        return sorted(set(self.layout.cache_names()) | hot)

    def _scan(self) -> None:
        """Prefix blocks on disk and which agent files use them (reference counts)."""
        if self.prefixes is None:
            return
        for p in self.layout.block_files():
            try:
                _, meta, _ = container.read_header(p, (codec.BLOCK_FORMAT,))
                tokens = codec.block_tokens(meta)
            except (CacheFileError, KeyError, ValueError):
                continue  # gc reports and removes it; loads of agents using it will refuse
            if meta.get("fingerprint") == self.fingerprint and codec.block_mode(meta) == self.prefixes.mode:
                self.prefixes.add(self.layout.block_key(p), tokens)
        for name in self.layout.cache_names():
            try:
                _, meta, _ = container.read_header(self.path(name), codec.FORMATS)
            except CacheFileError:
                continue
            ref = codec.prefix_ref(meta)
            if ref and meta.get("fingerprint") == self.fingerprint:
                self.prefixes.set_ref(name, str(ref.get("hash")))

    # -- tiers ---------------------------------------------------------------
    def tier(self, name: str) -> str:
        with self._lock:
            if name in self.hot:
                return "hot"
        return "warm" if self.persist and self.path(name).exists() else "cold"

    @property
    def hot_bytes(self) -> int:
        """Memory the pool accounts for: every cache it holds (hot, or checked out
        for a load or a turn) plus each shared prefix once; see `_counted`."""
        with self._lock:
            return self._note()

    def _hot_bytes(self) -> int:
        names = self.hot.keys() | self._out.keys() | self._reserved.keys()
        return sum(self._counted(n) for n in names) + (self.prefixes.memory_bytes() if self.prefixes else 0)

    def _counted(self, name: str) -> int:
        """One agent's own blocks as allocated; a cache out for a turn counts at
        the larger of its current size and what was reserved for the turn."""
        c = self._out.get(name)
        live = own_bytes(c) if c is not None else (self._sizes.get(name, 0) if name in self.hot else 0)
        return max(live, self._reserved.get(name, 0))

    def _note(self) -> int:
        """Current accounted bytes, recorded in `stats.peak_hot_bytes` (under the lock)."""
        b = self._hot_bytes()
        if b > self.stats.peak_hot_bytes:
            self.stats.peak_hot_bytes = b
        return b

    def turn_bytes(self, prompt_tokens: int, max_tokens: int = 0) -> int:
        """Upper bound of an agent's own cache at the end of a turn: prompt, reply
        and the template's closing tokens, in whole blocks. 0 when the caches do
        not know their model's shapes (then only live sizes count)."""
        return bytes_for(self._probe, prompt_tokens + max_tokens + TURN_SLACK_TOKENS)

    def held_bytes(self) -> int:
        """Memory a new turn cannot get back by eviction, apart from other turns:
        idle hot agents that are pinned or unsaved, and shared prefixes."""
        with self._lock:
            stuck = sum(self._counted(n) for n in self.hot if n not in self.busy and (n in self.pinned or n in self.unsaved))
            return stuck + (self.prefixes.memory_bytes() if self.prefixes else 0)

    # -- loads: prepare (lock), read (no lock), complete (lock) -------------------
    def checkout(self, name: str) -> tuple[AgentCache, str]:
        """The agent's cache for a turn, and the tier it came from. Reads a warm
        agent's file on the calling thread, with the pool's lock released."""
        validate_agent_name(name)
        with self._lock:
            if name in self.hot:
                cache = self.hot[name]
                self.hot.move_to_end(name)
                return self._complete_load(name, cache, "hot")
            self.busy.add(name)  # reserved: no second load, no eviction
        try:
            cache = self._read(name) if self.persist else None
        except BaseException:
            with self._lock:
                self.busy.discard(name)
                self._reserved.pop(name, None)
            raise
        with self._lock:
            if cache is not None:
                return self._complete_load(name, cache, "warm")
            return self._complete_load(name, self.new_cache(), "cold")

    def _complete_load(self, name: str, cache: AgentCache, tier: str) -> tuple[AgentCache, str]:
        self.stats.hits[tier] += 1
        self.busy.add(name)
        self._out[name] = cache
        self._note()
        return cache, tier

    def _read(self, name: str) -> AgentCache | None:
        path = self.path(name)
        try:
            st = path.stat()
            size = segments.disk_bytes(path)
        except FileNotFoundError:
            return None
        self._make_room(name, size)  # the files' tensors are about what the arrays take
        read = [0]

        def prefix_source(key: str, n: int, tokens: list[int]):
            if self.prefixes is None:
                raise CacheFileError(f"{path.name}: shared prefix {key} is missing (this pool shares none)")
            try:
                return [(s, s.sinks) for s in self.prefixes.segments(key, n, tokens, load=lambda k, t: self._read_block(k, t, read))]
            except PrefixMissing as e:  # e.g. its block was refused just before
                raise CacheFileError(f"{e} (no {self.layout.block_file(key).relative_to(self.dir)})") from None

        meta: dict = {}
        try:
            try:
                cache, _ = codec.load(path, self.fingerprint, self.new_cache().layers, prefix_source=prefix_source, meta_out=meta)
            except CacheFileError:
                if _inode(path) in (st.st_ino, None):
                    raise
                st = path.stat()  # another process saved meanwhile (and collected the segments read): read its save
                cache, _ = codec.load(path, self.fingerprint, self.new_cache().layers, prefix_source=prefix_source, meta_out=meta)
        except (CacheFileError, PrefixMissing, FileNotFoundError) as e:
            with self._lock:
                self.stats.refused_files += 1
            try:
                moved = container.quarantine(path, st.st_ino)
                where = f"moved to {moved.name}" if moved else "left in place (it changed meanwhile)"
            except OSError as err:  # e.g. a read-only directory: still never used
                where = f"left in place (could not move it: {err.strerror or err})"
            self.warn(f"warning: cache for agent '{name}' not used ({e}); {where}; re-prefilling")
            return None
        with self._lock:
            self.stats.bytes_read += st.st_size + formats.stored_bytes(meta) + read[0]
            self._gen[name] = meta.get("gen")  # None for an older format: the next save writes everything
            self._changed[name] = []
            cache.take_changed()
        return cache

    def _read_block(self, key: str, tokens: list[int], read: list[int]):
        """A prefix's block file. One that fails a check is moved aside and the prefix
        forgotten, so the next agent to prefill those tokens writes a good one."""
        path = self.layout.block_file(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CacheFileError(f"shared prefix {key} is missing (no {path.relative_to(self.dir)})") from None
        try:
            layers = codec.read_block(path, self.fingerprint, self.prefixes.mode, tokens, [layer.expect for layer in self.new_cache().layers])
        except CacheFileError as e:
            try:
                container.quarantine(path, st.st_ino)
            except OSError:
                pass  # a read-only directory: still refused, and forgotten here
            self.prefixes.forget(key)
            raise CacheFileError(f"shared prefix block {path.relative_to(self.dir)} refused: {e}") from None
        read[0] += st.st_size
        return layers

    # -- turns ---------------------------------------------------------------------
    def begin_turn(self, name: str, prompt: list[int], max_tokens: int = 0) -> tuple[AgentCache, int]:
        """Ready the agent's cache for `prompt`: checked out (now, if the caller did
        not), room made for what the turn can grow to (`turn_bytes`, evicting
        idle agents before any memory is taken), started from a shared prefix
        when that reuses more, and cut to the longest prefix of `prompt` it
        holds. Returns (cache, tokens reused)."""
        with self._lock:
            cache = self._out.get(name)
        if cache is None:
            cache, _ = self.checkout(name)
        self._make_room(name, self.turn_bytes(len(prompt), max_tokens))
        if prompt:
            self.adopt_prefix(cache, prompt)
        reused = cache.reusable_prefix(prompt)
        cache.trim_to(reused)
        return cache, reused

    def adopt_prefix(self, cache: AgentCache, prompt: list[int]) -> int:
        """Before prefill: start `cache` from a shared prefix of `prompt` when that
        reuses more than the cache itself. A hot idle agent that holds the same
        leading blocks turns them into a new shared prefix on the spot, so even
        the second agent with a long common prompt does not prefill it.
        Returns the tokens it covers (0: none)."""
        if self.prefixes is None or not eligible(cache):
            return 0
        limit = len(prompt) - 1  # at least one token is prefilled
        jobs: list[_SaveJob] = []
        with self._lock:
            hit = self.prefixes.match(prompt, limit) or self._prefix_from_peer(prompt, limit, jobs)
        try:
            if hit is None or hit[1] <= cache.reusable_prefix(prompt):
                return 0
            key, n = hit
            try:  # a prefix on disk only is read here, with no lock held
                segs = self.prefixes.segments(key, n, prompt[:n], load=lambda k, t: self._read_block(k, t, [0]))
            except (CacheFileError, PrefixMissing) as e:
                self.warn(f"warning: shared prefix not used ({e}); prefilling it")
                return 0
            attach(cache, segs, n, prompt[:n])
            with self._lock:
                self.stats.prefix_hits += 1
            return n
        finally:
            self._run(jobs)

    def _prefix_from_peer(self, prompt: list[int], limit: int, jobs: list[_SaveJob]) -> tuple[str, int] | None:
        found = self.prefixes.peer(prompt, limit)
        if found is None:
            return None
        peer, n = found
        c = self.hot.get(peer)
        if c is None or peer in self.busy or not eligible(c) or c.tokens[:n] != prompt[:n] or shareable(c) < n:
            return None
        key = self.prefixes.create(c, n)
        attach(c, self.prefixes.segments(key, n, c.tokens[:n]), n, c.tokens[:n])
        self._sizes[peer] = own_bytes(c)
        self._version[peer] = self._version.get(peer, 0) + 1
        if self.persist and peer not in self.unsaved:
            jobs.append(self._snapshot(peer, c))
        return key, n

    def checkin(self, name: str, cache: AgentCache, persist: bool = True) -> int:
        """Keep the cache hot, queue (or do) its save, and evict others if over budget.

        Returns bytes written by a synchronous save (0 with write-behind).
        """
        jobs: list[_SaveJob] = []
        self._make_room(name, own_bytes(cache))  # a turn that outgrew its reservation: room first
        with self._lock:
            self.busy.discard(name)
            self._out.pop(name, None)
            self._reserved.pop(name, None)
            if self.prefixes and self.prefixes.share(name, cache):
                self._share_with_idle(name, jobs)
            self.hot[name] = cache
            self.hot.move_to_end(name)
            self._sizes[name] = own_bytes(cache)
            self._version[name] = self._version.get(name, 0) + 1
            if not self.persist:
                pass  # memory only: eviction makes the agent cold
            elif persist:
                self.unsaved.discard(name)
                jobs.append(self._snapshot(name, cache))
            elif self._writer is None or not self._writer.pending(name):
                self.unsaved.add(name)
        try:
            written = self._run(jobs, raise_for=name)
        finally:
            self._unpin_overflow()
            self._make_room()
        return written

    def _share_with_idle(self, name: str, jobs: list[_SaveJob]) -> None:
        """A new prefix appeared: let idle hot agents that start with it use it too."""
        for other, c in self.hot.items():
            if other != name and other not in self.busy and self.prefixes.share(other, c):
                self._sizes[other] = own_bytes(c)
                self._version[other] = self._version.get(other, 0) + 1
                if self.persist and other not in self.unsaved:
                    jobs.append(self._snapshot(other, c))

    # -- saving ----------------------------------------------------------------
    def _snapshot(self, name: str, cache: AgentCache) -> _SaveJob:
        """Under the lock: the cache's views and where it changed since the previous snapshot."""
        ref = prefix_of(cache) if self.prefixes else None
        tensors, meta = codec.snapshot(cache, self.fingerprint, ref, model=self.model)
        self._seq += 1
        self._changed.setdefault(name, []).append((self._seq, cache.take_changed()))
        return _SaveJob(name, tensors, meta, ref[0] if ref else None, self._seq)

    def _save_files(self, job: _SaveJob) -> int:
        """Append the snapshot's changes to the agent's segments (caller holds the agent's lock)."""
        with self._lock:
            owed = [c for seq, c in self._changed.get(job.name, []) if seq <= job.seq]
            changed = [min(x) for x in zip(*owed)] if owed else None
            base = self._gen.get(job.name)
        n, freed, gen = codec.save_segments(self.layout, job.name, job.tensors, job.meta, changed, base)
        with self._lock:
            self._gen[job.name] = gen
            self._changed[job.name] = [(seq, c) for seq, c in self._changed.get(job.name, []) if seq > job.seq]
            self.stats.bytes_collected += freed
        return n

    def _run(self, jobs: list[_SaveJob], raise_for: str | None = None) -> int:
        """Hand snapshots to the writer, or write them now (no pool lock held).
        A synchronous failure marks the agent unsaved; it raises for `raise_for`."""
        written = 0
        for job in jobs:
            if self._writer is not None:
                self._writer.submit(job.name, lambda job=job: self._write_counted(job))
                continue
            try:
                written += self._write_counted(job)
            except CacheWriteError:
                with self._lock:
                    self.unsaved.add(job.name)
                if job.name == raise_for:
                    raise
        return written

    def _write_counted(self, job: _SaveJob) -> int:
        try:
            return self._write(job)
        except Exception:
            with self._lock:
                self.stats.write_errors += 1
            raise

    def _write(self, job: _SaveJob) -> int:
        path = self.path(job.name)
        try:
            with self.agent_lock(job.name):
                if job.prefix is None:
                    n = self._save_files(job)
                else:  # the block file must exist before a file refers to it; gc holds this lock too
                    with self.layout.blocks_lock(self.lock_timeout):
                        n = self._ensure_block(job.prefix)
                        n += self._save_files(job)
        except Timeout:
            raise AgentBusyError(errno.EBUSY, f"agent '{job.name}' is being saved by another process (waited {self.lock_timeout:g} s)") from None
        except CacheWriteError:
            raise
        except OSError as e:  # the lock folder or file cannot be made: a read-only or full directory
            raise CacheWriteError(e.errno, f"could not save {path.name}: {e.strerror or e}") from e
        if self.prefixes:
            self.prefixes.set_ref(job.name, job.prefix)
        with self._lock:
            self.stats.bytes_written += n
            self.stats.writes += 1
        return n

    def _ensure_block(self, key: str) -> int:
        """Write the block file if it is not on disk (new, or removed meanwhile); returns bytes written."""
        path = self.layout.block_file(key)
        if path.exists():
            self.prefixes.mark_on_disk(key)
            return 0
        host = self.prefixes.host(key)
        if host is None:
            raise CacheWriteError(errno.ENOENT, f"shared prefix {key} is neither on disk nor in memory")
        path.parent.mkdir(parents=True, exist_ok=True)
        n = container.write_tensors(path, *host)
        self.prefixes.mark_on_disk(key)
        return n

    def save(self, name: str, cache: AgentCache) -> int:
        """Save now, on this thread (raises CacheWriteError)."""
        with self._lock:
            job = self._snapshot(name, cache)
        return self._write(job)

    def flush(self, name: str | None = None, timeout: float | None = None) -> dict[str, str]:
        """Wait for pending saves; returns {agent: error} for saves that failed."""
        if self._writer is None:
            return {}
        self._writer.wait(name, timeout)
        return self._writer.errors(name)

    def save_errors(self) -> dict[str, str]:
        """{agent: error} of hot agents whose memory is newer than their file."""
        failed = self._writer.errors() if self._writer else {}
        with self._lock:
            return {n: failed.get(n, "not saved") for n in self.hot if n in failed or n in self.unsaved}

    def retry_saves(self) -> list[str]:
        """Queue a new save of every idle hot agent whose last save failed; returns their names."""
        failed = self._writer.errors() if self._writer else {}
        with self._lock:
            names = [n for n in self.hot if (n in failed or n in self.unsaved) and n not in self.busy and self.persist]
            jobs = [self._snapshot(n, self.hot[n]) for n in names]
            self.unsaved.difference_update(names)
        self._run(jobs)
        return names

    def pending(self, name: str | None = None) -> bool:
        return bool(self._writer and self._writer.pending(name))

    # -- eviction --------------------------------------------------------------
    def _make_room(self, name: str | None = None, need: int = 0) -> None:
        """Evict least recently used idle, unpinned agents until everything held
        fits the budget with `name` counted at (at least) `need` bytes, then
        reserve that for `name` until its checkin.

        Victims are chosen under the lock; waiting for a victim's own pending
        save and checking that its file exists happen with the lock released,
        and the victim is dropped only if nothing changed meanwhile. With
        nothing left to evict the reservation is made anyway (a turn is never
        lost for memory): the episode is counted and warned."""
        while True:
            with self._lock:
                extra = max(need - self._counted(name), 0) if name is not None else 0
                total = self._hot_bytes() + extra
                victim = None
                if total > self.budget:
                    victim = next((n for n in self.hot if n not in self.busy and n not in self.unsaved and n not in self.pinned and n != name), None)
                if victim is None:
                    if name is not None and need:
                        self._reserved[name] = max(self._reserved.get(name, 0), need)
                    self._note()
                    if total <= self.budget:
                        self._over = False
                    elif not self._over:
                        self._over = True
                        self.stats.over_budget += 1
                        why = ", ".join(f"{len(s)} {what}" for s, what in ((self.busy, "in a turn"), (self.pinned & self.hot.keys(), "pinned"), (self.unsaved, "unsaved")) if s)
                        self.warn(f"warning: agent caches need {total / 2**20:.1f} MiB, over the {self.budget / 2**20:.1f} MiB budget, "
                                  f"and nothing can be evicted ({why or 'no idle agent'})")
                    return
                version = self._version.get(victim)
            if self._writer is not None:
                self._writer.wait(victim)  # its own pending write only
            failed = bool(self._writer and self._writer.errors(victim))
            missing = self.persist and not self.path(victim).exists()
            with self._lock:
                if victim not in self.hot or victim in self.busy or victim in self.pinned or self._version.get(victim) != version or self.pending(victim):
                    continue  # used or changed meanwhile: choose again
                if failed or missing:
                    self.unsaved.add(victim)
                    continue
                self._drop(victim)
                self.stats.evictions += 1

    def _drop(self, name: str) -> None:
        self.hot.pop(name, None)
        self._sizes.pop(name, None)
        if self.prefixes:
            self.prefixes.release_unused(self.hot.values())

    def forget(self, name: str) -> None:
        """Drop the agent from memory without saving (pending saves are cancelled).
        A pin stays: the agent is kept hot again from its next turn."""
        if self._writer is not None:
            self._writer.cancel(name)
        with self._lock:
            self.unsaved.discard(name)
            self.busy.discard(name)
            self._out.pop(name, None)
            self._reserved.pop(name, None)
            self._gen.pop(name, None)
            self._changed.pop(name, None)
            self._drop(name)

    # -- pins ------------------------------------------------------------------
    def pin(self, name: str) -> None:
        """Never evict the agent (from its next turn on, if it is warm now).
        Refused (PinError) when it has no cache yet, or when pinned agents would
        then hold more than PIN_SHARE of the budget. Pins last as long as the pool."""
        validate_agent_name(name)
        try:
            on_disk = segments.disk_bytes(self.path(name)) if self.persist else None
        except FileNotFoundError:
            on_disk = None
        with self._lock:
            if name in self.pinned:
                return
            if name in self.hot or name in self._out:
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
        """Let the agent be evicted again; False if it was not pinned."""
        with self._lock:
            was = name in self.pinned
            self.pinned.discard(name)
        if was:
            self._make_room()
        return was

    def _unpin_overflow(self) -> None:
        """Pinned agents grow with their turns: past PIN_SHARE of the budget the
        least recently used are unpinned (warned), so other agents keep room."""
        with self._lock:
            order = [n for n in self.hot if n in self.pinned] + sorted(self.pinned - self.hot.keys())
            total = sum(self._counted(n) for n in self.pinned)
            for n in order:
                if total <= self.budget * PIN_SHARE:
                    break
                self.pinned.discard(n)
                self.stats.unpinned += 1
                total -= self._counted(n)
                self.warn(f"warning: agent '{n}' unpinned: pinned agents grew past {PIN_SHARE:.0%} of the {self.budget / 2**20:.2f} MiB cache budget")

    def remove(self, name: str) -> list[Path]:
        """Forget the agent (and its pin) and delete its cache file and segments (under its lock). Returns removed paths."""
        self.forget(name)
        with self._lock:
            self.pinned.discard(name)
        removed = catalog.remove(self.dir, name, history=False, timeout=self.lock_timeout)
        if self.prefixes:
            self.prefixes.set_ref(name, None)
        return removed

    def close(self) -> None:
        """Finish pending saves (call before exit; also runs at interpreter exit)."""
        self.flush()

    def gc_prefixes(self) -> list[Path]:
        """Delete prefix block files that no agent file (of any process) and no
        hot cache here uses; see catalog.gc_plan. Returns the removed paths."""
        if self.prefixes is None:
            return []
        with self._lock:
            keep = {p[0] for p in map(prefix_of, self.hot.values()) if p} | self.prefixes.unwritten()
        plan = [(p, why) for p, why in catalog.gc_plan(self.dir, set()) if self.layout.is_block_file(p) and self.layout.block_key(p) not in keep]
        catalog.gc_apply(self.dir, plan)
        removed = [p for p, _ in plan if not p.exists()]
        for p in removed:
            self.prefixes.forget(self.layout.block_key(p))
        return removed

    # -- views -------------------------------------------------------------
    def summary(self) -> dict:
        """Counters plus the pool's current state, for the API and `/agents`."""
        pending = {n: self.pending(n) for n in list(self.hot)}
        with self._lock:
            saved = sum(shared_bytes(c) for c in self.hot.values() if prefix_of(c))
            mem = self.prefixes.memory_bytes() if self.prefixes else 0
            return {
                **self.stats.as_dict(),
                "hot_agents": len(self.hot),
                "hot_bytes": self._note(),
                "peak_hot_bytes": self.stats.peak_hot_bytes,
                "pinned": sorted(self.pinned),
                "budget_bytes": self.budget if self.budget != float("inf") else None,
                "pending_writes": sum(pending.get(n, False) for n in self.hot),
                "unsaved": sorted(self.unsaved),
                "shared_prefixes_in_memory": self.prefixes.in_memory() if self.prefixes else 0,
                "shared_prefix_bytes_saved": max(saved - mem, 0),
            }

    def resident(self, name: str) -> dict | None:
        """What memory holds of a hot agent (tokens, bytes, save state), else None."""
        pending = self.pending(name)
        with self._lock:
            c = self.hot.get(name)
            if c is None:
                return None
            return {"tier": "hot", "tokens": c.offset, "bytes": c.nbytes, "pending_write": pending, "unsaved": name in self.unsaved,
                    "pinned": name in self.pinned}

    def describe(self, name: str, stored: dict | None = None) -> dict:
        """Tier, tokens, bytes, model and last use of one agent, without loading its tensors
        (`stored`: what a listing already read of its files)."""
        info = dict(stored) if stored is not None else catalog.describe(self.dir, name)
        info["model_match"] = info.get("fingerprint") == self.fingerprint if info.get("fingerprint") else None
        if not self.persist and info["tier"] == "warm":
            info["tier"] = "cold"
        with self._lock:
            info["pinned"] = name in self.pinned
        hot = self.resident(name)
        if hot:
            info.update(hot)
        return info


BlockPool = CachePool  # the former name, kept for existing callers
