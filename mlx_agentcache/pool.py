"""Which agent caches live in memory, which on disk, and how they move.

Tiers: hot (blocks in memory), warm (file on disk, nothing in memory),
cold (nothing cached: the next turn prefills everything). After each turn the
agent's cache is saved; when the hot set exceeds the memory budget the least
recently used idle agents are dropped from memory (their file is already on
disk). A file that fails any check is moved aside and the agent goes cold.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from . import cachefile
from .kvcache import AgentCache

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOCK_TIMEOUT_S = 30.0


def validate_agent_name(name: str) -> str:
    """Agent names become file names: letters, digits, '_', '-', '.', at most 64, no '..'."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid agent name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass
class PoolStats:
    hits: dict = field(default_factory=lambda: {"hot": 0, "warm": 0, "cold": 0})
    bytes_written: int = 0
    bytes_read: int = 0
    evictions: int = 0
    refused_files: int = 0


class BlockPool:
    """Hot agent caches under a byte budget, backed by one file per agent."""

    def __init__(
        self,
        cache_dir: Path,
        fingerprint: str,
        new_cache: Callable[[], AgentCache],
        budget_bytes: int | None = None,
        warn: Callable[[str], None] = print,
    ):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.new_cache = new_cache
        self.budget = budget_bytes
        self.warn = warn
        self.hot: OrderedDict[str, AgentCache] = OrderedDict()
        self.busy: set[str] = set()
        self.stats = PoolStats()
        self._lock = threading.RLock()

    def path(self, name: str) -> Path:
        return self.dir / (validate_agent_name(name) + cachefile.SUFFIX)

    def tier(self, name: str) -> str:
        if name in self.hot:
            return "hot"
        return "warm" if self.path(name).exists() else "cold"

    @property
    def hot_bytes(self) -> int:
        return sum(c.nbytes for c in self.hot.values())

    def checkout(self, name: str) -> tuple[AgentCache, str]:
        """The agent's cache for a turn, and the tier it came from."""
        with self._lock:
            tier = self.tier(name)
            if tier == "hot":
                cache = self.hot[name]
                self.hot.move_to_end(name)
            elif tier == "warm":
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
            cache, _ = cachefile.load(path, self.fingerprint, self.new_cache().layers)
        except cachefile.CacheFileError as e:
            self.stats.refused_files += 1
            moved = cachefile.quarantine(path)
            self.warn(f"warning: cache for agent '{name}' not used ({e}); moved to {moved.name}; re-prefilling")
            return None
        self.stats.bytes_read += path.stat().st_size
        return cache

    def checkin(self, name: str, cache: AgentCache, persist: bool = True) -> int:
        """Keep the cache hot, save it, and evict others if over budget. Returns bytes written."""
        written = 0
        if persist:
            written = self.save(name, cache)
        with self._lock:
            self.busy.discard(name)
            self.hot[name] = cache
            self.hot.move_to_end(name)
            self._enforce_budget()
        return written

    def save(self, name: str, cache: AgentCache) -> int:
        path = self.path(name)
        try:
            with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
                n = cachefile.save(path, cache, self.fingerprint)
        except Timeout:
            raise cachefile.CacheWriteError(f"agent '{name}' is being saved by another process") from None
        self.stats.bytes_written += n
        return n

    def _enforce_budget(self) -> None:
        if self.budget is None:
            return
        for name in list(self.hot):
            if self.hot_bytes <= self.budget:
                break
            if name not in self.busy and self.path(name).exists():
                del self.hot[name]
                self.stats.evictions += 1

    def forget(self, name: str) -> None:
        with self._lock:
            self.hot.pop(name, None)

    def known(self) -> list[str]:
        names = {p.name[: -len(cachefile.SUFFIX)] for p in self.dir.glob("*" + cachefile.SUFFIX)}
        return sorted(names | set(self.hot))

    def describe(self, name: str) -> dict:
        """Tier, tokens and bytes of one agent, without loading its tensors."""
        tier = self.tier(name)
        info = {"name": name, "tier": tier, "tokens": 0, "bytes": 0, "last_used": None}
        if tier == "hot":
            c = self.hot[name]
            info.update(tokens=c.offset, bytes=c.nbytes)
        if self.path(name).exists():
            p = self.path(name)
            try:
                _, meta, _ = cachefile.read_header(p)
                info.update(file_bytes=p.stat().st_size, last_used=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.stat().st_mtime)))
                if tier != "hot":
                    info.update(tokens=int(meta["n_tokens"]), bytes=p.stat().st_size)
                info["model_match"] = meta.get("fingerprint") == self.fingerprint
            except cachefile.CacheFileError as e:
                info["error"] = str(e)
        return info
