"""Shared prefixes at run time: attach before prefill, share at checkin, read blocks.

prefixes.py is the index (chain hashes, what is in memory, who refers to
what); this module puts it to work between the residency ledger and the
store:

* before a turn's prefill, `adopt` starts the agent's cache from the longest
  shared prefix of its prompt, making one on the spot from an idle hot agent
  that holds the same leading blocks, or else from an agent on disk that
  does (found by its first block: from the listing index at start, then from
  each save);
* at checkin, `on_checkin` lets the cache, and idle hot agents that start with
  the same blocks, point at a prefix instead of their own copy;
* block files are read through the store (`source`, for a restore that refers
  to one) and written by the store before the first manifest naming them.

Agents changed in place are handed back as save jobs for the pool to run.
"""

from __future__ import annotations

from typing import Callable

from .kvcache import AgentCache
from .ledger import Ledger, SaveJob
from .prefixes import PrefixIndex, PrefixMissing, attach, eligible, prefix_of, shareable
from .q4 import BLOCK_TOKENS
from .store.agent_store import AgentStore, Refused
from .store.formats import LEAD_TOKENS, lead_of
from .store.container import CacheFileError


DISK_PEERS = 8  # agents on disk whose token ids a new agent's prompt is compared with


def common_blocks(a: list[int], b: list[int]) -> int:
    """Tokens in the whole blocks two token lists start with in common."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n - n % BLOCK_TOKENS


def covered(hit: tuple[str, int] | None) -> int:
    """Tokens a prefix hit (key, tokens) covers; 0 for none."""
    return hit[1] if hit else 0


class PrefixSharing:
    def __init__(self, index: PrefixIndex, ledger: Ledger, store: AgentStore, warn: Callable[[str], None],
                 make_room: Callable[[str, int], None]):
        self.index = index
        self.ledger = ledger
        self.store = store
        self.warn = warn
        self.make_room = make_room  # the pool's: evict until `name` counted at `need` bytes fits the budget
        self.leads: dict[str, dict[str, None]] = {}  # first-block key -> agents on disk starting with it, oldest first

    def scan(self) -> None:
        """Prefix blocks on disk, which agent files use them (reference counts) and which
        agents start with which first block: block headers and the listing index."""
        for key, tokens in self.store.blocks(self.index.mode):
            self.index.add(key, tokens)
        for info in sorted(self.store.listing(), key=lambda i: i.get("last_used") or ""):
            if info.get("fingerprint") != self.store.fingerprint:
                continue
            if ref := info.get("shared_prefix"):
                self.index.set_ref(info["name"], ref["hash"])
            if info.get("kv_mode") == self.index.mode and info.get("lead"):
                self.leads.setdefault(info["lead"], {})[info["name"]] = None

    def _lead(self, name: str, lead: str | None) -> None:
        """`name` now starts with the block `lead` (None: with none, or removed)."""
        for agents in self.leads.values():
            agents.pop(name, None)
        if lead:
            self.leads.setdefault(lead, {})[name] = None

    # -- reads ---------------------------------------------------------------------
    def _load_block(self, key: str, tokens: list[int]):
        """A block file through the store; one refused is forgotten, so the next agent
        to prefill those tokens writes a good one."""
        try:
            layers, n = self.store.read_block(key, self.index.mode, tokens)
        except CacheFileError:
            self.index.forget(key)
            raise
        with self.ledger.lock:
            self.ledger.stats.bytes_read += n
        return layers

    def source(self, key: str, n: int, tokens: list[int]):
        """For a restore whose file refers to a prefix: per layer (shared segment, sinks)."""
        try:
            return [(s, s.sinks) for s in self.index.segments(key, n, tokens, load=self._load_block)]
        except PrefixMissing as e:  # e.g. its block was refused just before
            raise CacheFileError(f"{e} (no {self.store.layout.block_file(key).relative_to(self.store.dir)})") from None

    # -- before prefill --------------------------------------------------------------
    def adopt(self, name: str, cache: AgentCache, prompt: list[int]) -> tuple[int, list[SaveJob]]:
        """Start `cache` from a shared prefix of `prompt` when that reuses more than
        the cache itself. An agent that holds the same leading blocks turns them into
        a new shared prefix on the spot: a hot idle one, or else one on disk (found
        by its first block, then read), so even the second agent with a long
        common prompt does not prefill it, after a restart too. Returns the tokens
        covered (0: none) and save jobs for agents changed in place."""
        if not eligible(cache):
            return 0, []
        limit = len(prompt) - 1  # at least one token is prefilled
        own = cache.reusable_prefix(prompt)
        jobs: list[SaveJob] = []
        whole = limit - limit % BLOCK_TOKENS
        with self.ledger.lock:
            hit = self.index.match(prompt, limit)
            if covered(hit) < whole:
                hit = self._from_peer(prompt, limit, jobs, max(covered(hit), own)) or hit
        if max(covered(hit), own) < whole:
            hit = self._from_disk(name, prompt, limit, max(covered(hit), own)) or hit
        if covered(hit) <= own:
            return 0, jobs
        key, n = hit
        try:  # a prefix on disk only is read here, with no lock held
            segs = self.index.segments(key, n, prompt[:n], load=self._load_block)
        except (CacheFileError, PrefixMissing) as e:
            self.warn(f"warning: shared prefix not used ({e}); prefilling it")
            return 0, jobs
        attach(cache, segs, n, prompt[:n])
        with self.ledger.lock:
            self.ledger.stats.prefix_hits += 1
        return n, jobs

    def _from_peer(self, prompt: list[int], limit: int, jobs: list[SaveJob], beyond: int) -> tuple[str, int] | None:
        """A prefix made from the hot idle agent seen holding the most leading blocks, when
        that covers more than `beyond` tokens."""
        found = self.index.peer(prompt, limit)
        if found is None or found[1] <= beyond:
            return None
        peer, n = found
        c = self.ledger.idle(peer)
        if c is None or not eligible(c) or c.tokens[:n] != prompt[:n] or shareable(c) < n:
            return None
        key = self.index.create(c, n)
        attach(c, self.index.segments(key, n, c.tokens[:n]), n, c.tokens[:n])
        job = self.ledger.resave(peer, c)
        if job is not None:
            jobs.append(job)
        return key, n

    def _from_disk(self, name: str, prompt: list[int], limit: int, beyond: int) -> tuple[str, int] | None:
        """A prefix made from an agent on disk whose first block is the prompt's, when it
        covers more than `beyond` tokens. Candidates come from the listing index (most
        recently used first, at most DISK_PEERS); their token ids alone choose the one
        with the most common blocks, and only its files are read (no lock held) and
        checked before the prefix is made from them."""
        lead = lead_of(prompt[:limit])
        with self.ledger.lock:
            on_disk = reversed(list(self.leads.get(lead, ()))) if lead else ()
            peers = [p for p in on_disk if p != name and p not in self.ledger.hot][:DISK_PEERS]
        best, n = None, beyond
        for p in peers:
            m = common_blocks(self.store.tokens(p), prompt[:limit])
            if m > n:
                best, n = p, m
        size = None if best is None else self.store.disk_bytes(best)
        if size is None:
            return None
        self.make_room(name, self.ledger.bytes_of(name) + size)  # the peer's arrays are held until the prefix is cut from them
        got = self.store.read(best, self.source)
        if isinstance(got, Refused):
            self.warn(f"warning: cache for agent '{best}' not used ({got.reason}); {got.where}")
            return None
        if got is None or not eligible(got.cache):
            return None
        c = got.cache
        n = min(common_blocks(c.tokens, prompt[:limit]), shareable(c) // BLOCK_TOKENS * BLOCK_TOKENS)
        if n <= beyond:
            return None
        with self.ledger.lock:
            self.ledger.stats.bytes_read += got.bytes_read
        return self.index.create(c, n), n

    # -- at checkin -----------------------------------------------------------------
    def on_checkin(self, name: str, cache: AgentCache) -> list[SaveJob]:
        """Point the returning cache at a prefix for its leading blocks; when that made a
        new one, idle hot agents that start with it use it too (their save jobs)."""
        jobs: list[SaveJob] = []
        with self.ledger.lock:
            if not self.index.share(name, cache):
                return jobs
            for other, c in self.ledger.idle_agents():
                if other != name and self.index.share(other, c):
                    job = self.ledger.resave(other, c)
                    if job is not None:
                        jobs.append(job)
        return jobs

    # -- writes, memory, gc ------------------------------------------------------------
    def block(self, key: str | None) -> tuple[str, Callable] | None:
        """What the store writes before a manifest that starts with prefix `key`."""
        return None if key is None else (key, lambda: self.index.host(key))

    def written(self, job: SaveJob) -> None:
        """A save landed: its prefix block is on disk, and the agent's file starts with it
        and with its first block."""
        if job.prefix is not None:
            self.index.mark_on_disk(job.prefix)
        self.index.set_ref(job.name, job.prefix)
        with self.ledger.lock:
            self._lead(job.name, lead_of(job.tensors["tokens"][:LEAD_TOKENS].tolist()))

    def removed(self, name: str) -> None:
        self.index.set_ref(name, None)
        with self.ledger.lock:
            self._lead(name, None)

    def release_unused(self) -> None:
        """Drop from memory the prefixes no cache in memory uses (their file is on disk)."""
        self.index.release_unused(self.ledger.caches())

    def gc(self) -> list[str]:
        """Delete block files no agent file and no cache in memory uses; the keys removed."""
        keep = {p[0] for p in map(prefix_of, self.ledger.caches()) if p} | self.index.unwritten()
        removed = self.store.gc_blocks(keep)
        for key in removed:
            self.index.forget(key)
        return removed


def sharing_for(ledger: Ledger, store: AgentStore, probe: AgentCache, warn: Callable[[str], None],
                make_room: Callable[[str, int], None]) -> PrefixSharing | None:
    """Shared prefixes for this model's caches, or None where its layers cannot share."""
    if not eligible(probe):
        return None
    return PrefixSharing(PrefixIndex(store.fingerprint, probe.layers[0].mode), ledger, store, warn, make_room)

