"""Which agent caches live in memory, which on disk, and how they move.

Tiers: hot (blocks in memory), warm (file on disk, nothing in memory),
cold (nothing cached: the next turn prefills everything).

Checkin keeps the cache hot, marks it dirty and hands a snapshot to one
background writer thread (write-behind): the turn, and other agents'
decoding, never wait for disk. When hot caches exceed the memory budget, the
least recently used idle agent is evicted: only its own pending write is
waited for, then its blocks are freed. An agent whose save failed stays hot
(it is never evicted unsaved) and the user is warned.

A file that fails any check is moved aside and the agent goes cold.
Per-agent file locks serialize writers across processes; see docs/pool.md.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from . import cachefile
from .kvcache import AgentCache
from .prefixes import PrefixStore, eligible, own_bytes, prefix_of

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOCK_TIMEOUT_S = 30.0
BUDGET_FRACTION = 0.4  # of available memory; 10.2 of 24 GB on the reference M4 Pro is 0.42
TMP_RE = re.compile(r"^\..+\.tmp(\d+)$")


def validate_agent_name(name: str) -> str:
    """Agent names become file names: letters, digits, '_', '-', '.', at most 64, no '..'."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid agent name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


def lock_path(cache_dir: Path, name: str) -> str:
    """The per-agent lock file, shared by every process using `cache_dir`."""
    d = Path(cache_dir) / ".locks"
    d.mkdir(exist_ok=True)
    return str(d / f"{validate_agent_name(name)}.lock")


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


class AgentBusyError(cachefile.CacheWriteError):
    """Another process holds the agent's lock."""


@dataclass
class PoolStats:
    hits: dict = field(default_factory=lambda: {"hot": 0, "warm": 0, "cold": 0})
    bytes_written: int = 0
    bytes_read: int = 0
    writes: int = 0
    write_errors: int = 0
    evictions: int = 0
    refused_files: int = 0
    prefix_hits: int = 0  # turns that attached a shared prefix instead of prefilling it

    def as_dict(self) -> dict:
        return asdict(self)


class _Writer:
    """One background thread saving dirty agents, latest snapshot wins."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn
        self.cv = threading.Condition()
        self.queue: deque[str] = deque()
        self.jobs: dict[str, Callable[[], int]] = {}
        self.inflight: str | None = None
        self.failed: dict[str, str] = {}
        self.thread: threading.Thread | None = None

    def submit(self, name: str, job: Callable[[], int]) -> None:
        with self.cv:
            if name not in self.jobs:
                self.queue.append(name)
            self.jobs[name] = job
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="agentcache-writer", daemon=True)
                self.thread.start()
            self.cv.notify_all()

    def _run(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue)
                name = self.queue.popleft()
                job = self.jobs.pop(name, None)
                if job is None:
                    continue
                self.inflight = name
            try:
                job()
                with self.cv:
                    self.failed.pop(name, None)
            except Exception as e:  # reported, the agent stays hot; the writer goes on
                with self.cv:
                    self.failed[name] = str(e)
                self.warn(f"warning: agent '{name}' was not saved ({e}); it stays in memory")
            finally:
                with self.cv:
                    self.inflight = None
                    self.cv.notify_all()

    def pending(self, name: str | None = None) -> bool:
        if name is None:
            return bool(self.jobs) or self.inflight is not None
        return name in self.jobs or self.inflight == name

    def wait(self, name: str | None = None, timeout: float | None = None) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: not self.pending(name), timeout)

    def cancel(self, name: str) -> None:
        """Drop a queued save and wait for one in flight."""
        with self.cv:
            self.jobs.pop(name, None)
            self.failed.pop(name, None)
            self.cv.wait_for(lambda: self.inflight != name)


class BlockPool:
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
        warn: Callable[[str], None] = print,
        *,
        model: str | None = None,
        write_behind: bool = True,
        share_prefixes: bool = True,
        lock_timeout: float = LOCK_TIMEOUT_S,
        persist: bool = True,
    ):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.model = model
        self.new_cache = new_cache
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self.warn = warn
        self.lock_timeout = lock_timeout
        self.persist = persist
        self.hot: OrderedDict[str, AgentCache] = OrderedDict()
        self.busy: set[str] = set()
        self.unsaved: set[str] = set()  # hot state newer than its file and not queued
        self.stats = PoolStats()
        self._sizes: dict[str, int] = {}
        self._lock = threading.RLock()
        self._warned_full = False
        probe = new_cache()
        self.prefixes = PrefixStore(self.dir, fingerprint, probe.layers[0].bits) if share_prefixes and eligible(probe) else None
        self._writer = _Writer(warn) if write_behind else None
        if self._writer:
            ref = weakref.ref(self)
            atexit.register(lambda: ref() and ref().flush())
        self._remove_stale_tmp()
        self._rebuild_refs()

    # -- names and files ---------------------------------------------------
    def path(self, name: str) -> Path:
        return self.dir / (validate_agent_name(name) + cachefile.SUFFIX)

    def lock_path(self, name: str) -> str:
        return lock_path(self.dir, name)

    def agent_lock(self, name: str, timeout: float | None = None) -> FileLock:
        """The per-agent lock every writer (in any process) holds while replacing the file."""
        return FileLock(self.lock_path(name), timeout=self.lock_timeout if timeout is None else timeout)

    def _remove_stale_tmp(self) -> None:
        """Temporary files of saves that crashed: the process that wrote them is gone."""
        for d in (self.dir, self.dir / "blocks"):
            for p in d.glob(".*.tmp*"):
                m = TMP_RE.match(p.name)
                if m and not _alive(int(m.group(1))):
                    p.unlink(missing_ok=True)

    def _rebuild_refs(self) -> None:
        if self.prefixes is None:
            return
        for name in self.known():
            try:
                _, meta, _ = cachefile.read_header(self.path(name), (cachefile.FORMAT,))
                ref = json.loads(meta.get("prefix", "null"))
            except (cachefile.CacheFileError, ValueError):
                continue
            if isinstance(ref, dict) and meta.get("fingerprint") == self.fingerprint:
                self.prefixes.set_ref(name, str(ref.get("hash")))

    # -- tiers ---------------------------------------------------------------
    def tier(self, name: str) -> str:
        if name in self.hot:
            return "hot"
        return "warm" if self.persist and self.path(name).exists() else "cold"

    @property
    def hot_bytes(self) -> int:
        """Memory held by hot caches: own blocks plus each shared prefix once."""
        with self._lock:
            return sum(self._sizes.get(n, 0) for n in self.hot) + (self.prefixes.memory_bytes() if self.prefixes else 0)

    def checkout(self, name: str) -> tuple[AgentCache, str]:
        """The agent's cache for a turn, and the tier it came from."""
        with self._lock:
            tier = self.tier(name)
            if tier == "hot":
                cache = self.hot[name]
                self.hot.move_to_end(name)
            elif tier == "warm":
                try:
                    self._enforce_budget(incoming=self.path(name).stat().st_size, exclude=name)
                except FileNotFoundError:
                    pass
                cache = self._read(name)
                tier = "warm" if cache is not None else "cold"
            if tier == "cold":
                cache = self.new_cache()
            self.stats.hits[tier] += 1
            self.busy.add(name)
            return cache, tier

    def _read(self, name: str) -> AgentCache | None:
        path = self.path(name)
        try:
            inode = path.stat().st_ino
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        source = self.prefixes.segments if self.prefixes else None
        before = self.prefixes.bytes_read if self.prefixes else 0
        try:
            cache, _ = cachefile.load(path, self.fingerprint, self.new_cache().layers, prefix_source=source)
        except cachefile.CacheFileError as e:
            self.stats.refused_files += 1
            moved = cachefile.quarantine(path, inode)
            where = f"moved to {moved.name}" if moved else "left in place (it changed meanwhile)"
            self.warn(f"warning: cache for agent '{name}' not used ({e}); {where}; re-prefilling")
            return None
        self.stats.bytes_read += size + ((self.prefixes.bytes_read - before) if self.prefixes else 0)
        return cache

    def adopt_prefix(self, cache: AgentCache, prompt: list[int]) -> int:
        """Before prefill: start `cache` from a shared prefix of `prompt` when that
        reuses more than the cache itself. A hot idle agent that holds the same
        leading blocks turns them into a new shared prefix on the spot, so even
        the second agent with a long common prompt does not prefill it.
        Returns the tokens it covers (0: none)."""
        if self.prefixes is None or not eligible(cache):
            return 0
        limit = len(prompt) - 1  # at least one token is prefilled
        with self._lock:
            hit = self.prefixes.match(prompt, limit) or self._prefix_from_peer(prompt, limit)
            if hit is None or hit[1] <= cache.reusable_prefix(prompt):
                return 0
            try:
                self.prefixes.attach(cache, hit[0], hit[1], prompt[: hit[1]])
            except cachefile.CacheFileError as e:
                self.warn(f"warning: shared prefix not used ({e}); prefilling it")
                return 0
            self.stats.prefix_hits += 1
            return hit[1]

    def _prefix_from_peer(self, prompt: list[int], limit: int) -> tuple[str, int] | None:
        found = self.prefixes.peer(prompt, limit)
        if found is None:
            return None
        peer, n = found
        c = self.hot.get(peer)
        if c is None or peer in self.busy or not eligible(c) or c.tokens[:n] != prompt[:n] or min(layer.stored for layer in c.layers) < n:
            return None
        key = self.prefixes.create(c, n)
        self.prefixes.attach(c, key, n, c.tokens[:n])
        self._sizes[peer] = own_bytes(c)
        if self.persist and peer not in self.unsaved:
            self._save(peer, c)
        return key, n

    def checkin(self, name: str, cache: AgentCache, persist: bool = True) -> int:
        """Keep the cache hot, queue (or do) its save, and evict others if over budget.

        Returns bytes written by a synchronous save (0 with write-behind).
        """
        with self._lock:
            self.busy.discard(name)
            if self.prefixes and self.prefixes.share(name, cache):
                self._share_with_idle(name)
            self.hot[name] = cache
            self.hot.move_to_end(name)
            self._sizes[name] = own_bytes(cache)
            written = 0
            if not self.persist:
                pass  # memory only: eviction makes the agent cold
            elif persist:
                self.unsaved.discard(name)
                written = self._save(name, cache)
            elif self._writer is None or not self._writer.pending(name):
                self.unsaved.add(name)
            self._enforce_budget()
        return written

    def _share_with_idle(self, name: str) -> None:
        """A new prefix appeared: let idle hot agents that start with it use it too."""
        for other, c in self.hot.items():
            if other != name and other not in self.busy and self.prefixes.share(other, c):
                self._sizes[other] = own_bytes(c)
                if self.persist and other not in self.unsaved:
                    self._save(other, c)

    # -- saving ----------------------------------------------------------------
    def _save(self, name: str, cache: AgentCache) -> int:
        ref = prefix_of(cache) if self.prefixes else None
        tensors, meta = cachefile.snapshot(cache, self.fingerprint, ref, model=self.model)
        key = ref[0] if ref else None
        if self._writer is None:
            try:
                return self._write(name, tensors, meta, key)
            except cachefile.CacheWriteError:
                self.unsaved.add(name)
                self.stats.write_errors += 1
                raise
        self._writer.submit(name, lambda: self._write_counted(name, tensors, meta, key))
        return 0

    def _write_counted(self, name, tensors, meta, key) -> int:
        try:
            return self._write(name, tensors, meta, key)
        except Exception:
            self.stats.write_errors += 1
            raise

    def _write(self, name: str, tensors: dict, meta: dict, key: str | None) -> int:
        path = self.path(name)
        try:
            with self.agent_lock(name):
                if key is None:
                    n = cachefile.write_tensors(path, tensors, meta)
                else:  # the block file must exist before a file refers to it; gc holds this lock too
                    with FileLock(self.prefixes.lock_path(), timeout=self.lock_timeout):
                        n = self.prefixes.ensure_file(key)
                        n += cachefile.write_tensors(path, tensors, meta)
        except Timeout:
            raise AgentBusyError(errno.EBUSY, f"agent '{name}' is being saved by another process (waited {self.lock_timeout:g} s)") from None
        if self.prefixes:
            self.prefixes.set_ref(name, key)
        self.stats.bytes_written += n
        self.stats.writes += 1
        return n

    def save(self, name: str, cache: AgentCache) -> int:
        """Save now, on this thread (raises CacheWriteError)."""
        ref = prefix_of(cache) if self.prefixes else None
        tensors, meta = cachefile.snapshot(cache, self.fingerprint, ref, model=self.model)
        return self._write(name, tensors, meta, ref[0] if ref else None)

    def flush(self, name: str | None = None, timeout: float | None = None) -> dict[str, str]:
        """Wait for pending saves; returns {agent: error} for saves that failed."""
        if self._writer is None:
            return {}
        self._writer.wait(name, timeout)
        with self._writer.cv:
            failed = dict(self._writer.failed)
        return {name: failed[name]} if name in failed else ({} if name else failed)

    def pending(self, name: str | None = None) -> bool:
        return bool(self._writer and self._writer.pending(name))

    # -- eviction --------------------------------------------------------------
    def _enforce_budget(self, incoming: int = 0, exclude: str | None = None) -> None:
        """Evict least recently used idle agents until hot caches plus `incoming` fit."""
        while self.hot_bytes + incoming > self.budget:
            victim = next((n for n in self.hot if n not in self.busy and n not in self.unsaved and n != exclude), None)
            if victim is None:
                if not self._warned_full and self.hot:
                    self._warned_full = True
                    self.warn(f"warning: hot caches use {self.hot_bytes >> 20} MiB, over the {self.budget >> 20} MiB budget; nothing can be evicted safely")
                return
            if self._writer is not None:
                self._writer.wait(victim)  # its own pending write only
                if victim in self.flush(victim):
                    self.unsaved.add(victim)
                    continue
            if self.persist and not self.path(victim).exists():
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
        """Drop the agent from memory without saving (pending saves are cancelled)."""
        if self._writer is not None:
            self._writer.cancel(name)
        with self._lock:
            self.unsaved.discard(name)
            self.busy.discard(name)
            self._drop(name)

    def remove(self, name: str) -> list[Path]:
        """Forget the agent and delete its cache file (under its lock). Returns removed paths."""
        self.forget(name)
        removed = []
        with self.agent_lock(name):
            for p in (self.path(name),):
                if p.exists():
                    p.unlink()
                    removed.append(p)
        if self.prefixes:
            self.prefixes.set_ref(name, None)
        return removed

    def close(self) -> None:
        """Finish pending saves (call before exit; also runs at interpreter exit)."""
        self.flush()

    def gc_prefixes(self) -> list[Path]:
        """Delete prefix block files that no agent file (of any process) and no
        hot cache here uses; see catalog.gc_plan. Returns the removed paths."""
        from . import catalog

        if self.prefixes is None:
            return []
        with self._lock:
            keep = {p[0] for p in map(prefix_of, self.hot.values()) if p} | self.prefixes.unwritten()
        plan = [(p, why) for p, why in catalog.gc_plan(self.dir, set()) if p.parent == self.prefixes.dir and p.stem not in keep]
        catalog.gc_apply(self.dir, plan)
        removed = [p for p, _ in plan if not p.exists()]
        for p in removed:
            self.prefixes.forget(p.stem)
        return removed

    # -- listing -------------------------------------------------------------
    def known(self) -> list[str]:
        names = {p.name[: -len(cachefile.SUFFIX)] for p in self.dir.glob("*" + cachefile.SUFFIX)}
        return sorted({n for n in names if NAME_RE.match(n)} | set(self.hot))

    def summary(self) -> dict:
        """Counters plus the pool's current state, for the API and `/agents`."""
        with self._lock:
            shared = [prefix_of(c) for c in self.hot.values()]
            saved = sum(self._prefix_bytes(c, p) for c, p in zip(self.hot.values(), shared) if p)
            out = {
                **self.stats.as_dict(),
                "hot_agents": len(self.hot),
                "hot_bytes": self.hot_bytes,
                "budget_bytes": self.budget if self.budget != float("inf") else None,
                "pending_writes": sum(self.pending(n) for n in self.hot),
                "unsaved": sorted(self.unsaved),
                "shared_prefixes_in_memory": sum(1 for e in (self.prefixes.entries.values() if self.prefixes else ()) if e.layers is not None),
                "shared_prefix_bytes_saved": max(saved - (self.prefixes.memory_bytes() if self.prefixes else 0), 0),
            }
        return out

    @staticmethod
    def _prefix_bytes(cache: AgentCache, ref: tuple[str, int]) -> int:
        return sum(layer.segments[0].nbytes for layer in cache.layers)

    def describe(self, name: str) -> dict:
        """Tier, tokens, bytes, model and last use of one agent, without loading its tensors."""
        tier = self.tier(name)
        info = {"name": name, "tier": tier, "tokens": 0, "bytes": 0, "last_used": None}
        if tier == "hot":
            c = self.hot[name]
            info.update(tokens=c.offset, bytes=c.nbytes, pending_write=self.pending(name), unsaved=name in self.unsaved)
        p = self.path(name)
        if p.exists():
            try:
                st = p.stat()
                _, meta, _ = cachefile.read_header(p, (cachefile.FORMAT,))
                ref = json.loads(meta.get("prefix", "null"))
                info.update(file_bytes=st.st_size, last_used=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)))
                if tier != "hot":
                    info.update(tokens=int(meta["n_tokens"]), bytes=st.st_size)
                info.update(model=meta.get("model") or None, fingerprint=meta.get("fingerprint"), kv_bits=int(meta["kv_bits"]))
                info["model_match"] = meta.get("fingerprint") == self.fingerprint
                if isinstance(ref, dict):
                    info["shared_prefix"] = {"hash": ref.get("hash"), "tokens": ref.get("tokens")}
            except (cachefile.CacheFileError, OSError, KeyError, ValueError) as e:
                info["error"] = str(e)
        return info


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
