"""Shared prompt prefixes: which agents start with the same blocks, and who uses them.

Many agents start with the same long system prompt, so their caches would
hold identical leading blocks. Instead, the full 256-token blocks that agents
have in common are kept once, content-addressed by a hash chained over the
token ids (salted with the model fingerprint and KV precision), and each
agent's layer caches begin with a read-only `SharedSegment` over them.
Appends go to the agent's own segment; trimming into the prefix copies what
is kept (`LayerCache.trim_to`), so sharing is copy-on-write.

Every KV mode of global-attention caches shares. A block holds what the
mode's body stores for its tokens: q4/q8/fp16 (and q4k, whose keys are
rotated the same way every run), or for q4c the 4-bit body (256-token
blocks hold whole 128-token key groups, aligned to absolute positions) plus
the exact attention sinks of positions 0..3, which every agent attaching it
takes too. q4c's 8-bit open tail never is in a block: only whole groups are
shared. docs/pool.md says where an attached block differs from what the
agent's own prefill would have written.

A prefix is created when a second agent checks in with the same leading
blocks as one seen before; later agents whose prompt starts with those
blocks attach to it before prefill and skip computing them at all. An agent
may use fewer blocks than a prefix holds (a view, no copy).

This module is the index and the reference counts only: it never touches a
file. Block files (`Layout.block_file`) are read and written by the pool
through store/, which hands the index what it read (`add`, `segments(...,
load=...)`) and asks it what to write (`host`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .kvcache import KV_MODES, AgentCache, LayerCache, Segment, slice_tokens
from .q4 import BLOCK_TOKENS
from .store.codec import block_snapshot

MAX_SEEN = 1 << 16  # chain hashes remembered from agents' own blocks

Layer = tuple[tuple, tuple | None, tuple | None]  # one layer of a prefix: keys, values, q4c sinks
BlockLoader = Callable[[str, list[int]], list[Layer]]


class PrefixMissing(LookupError):
    """A prefix the index does not know, or that does not hold the requested tokens."""


@dataclass
class SharedSegment(Segment):
    """A read-only view of a prefix's first `length` tokens."""

    prefix: str = ""
    sinks: tuple | None = None  # q4c: the exact sinks the prefix was made with


def chain_hashes(tokens: list[int], salt: str) -> list[str]:
    """Hash after each full block: entry j identifies tokens[: (j + 1) * 256]."""
    h = hashlib.sha256(salt.encode())
    out = []
    for a in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h.update(np.asarray(tokens[a : a + BLOCK_TOKENS], dtype=np.int32).tobytes())
        out.append(h.copy().hexdigest()[:32])
    return out


def salt(fingerprint: str, mode: str) -> str:
    """What chain hashes are salted with. q4, q8 and fp16 keep the bit width alone, so
    their block files written before other modes shared stay found."""
    return f"{fingerprint}:{KV_MODES[mode][0]}" if mode in ("q4", "q8", "fp16") else f"{fingerprint}:{mode}"


def eligible(cache: AgentCache) -> bool:
    """Global-attention caches whose layers store their mode's body encoding (a sliding
    window drops the front; a latent q4c layer turns q4 and has no sinks)."""
    return all(layer.window is None and layer.start == 0 and layer.encoding == KV_MODES[layer.mode][2] for layer in cache.layers)


def _body_tokens(layer: LayerCache) -> int:
    """Leading stored tokens in the body encoding (q4c: whole key groups, not the 8-bit tail)."""
    n = 0
    for s in layer.segments:
        if s.encoding != layer.encoding:
            break
        n += s.length
    return n


def shareable(cache: AgentCache) -> int:
    """How many leading tokens this cache could give a prefix: its own prefill, in the body encoding."""
    return cache.own_tokens(min(min(map(_body_tokens, cache.layers)), len(cache.tokens)))


def prefix_of(cache: AgentCache) -> tuple[str, int] | None:
    """(hash, tokens) when every layer starts with the same shared prefix view."""
    firsts = [layer.segments[0] if layer.segments else None for layer in cache.layers]
    s0 = firsts[0]
    if not isinstance(s0, SharedSegment) or any(not isinstance(s, SharedSegment) or (s.prefix, s.length) != (s0.prefix, s0.length) for s in firsts):
        return None
    return s0.prefix, s0.length


def own_bytes(cache: AgentCache) -> int:
    """Memory an agent holds apart from shared prefixes (allocated capacity, q4c sinks)."""
    return sum(
        sum(x.nbytes for x in s.keys) + sum(x.nbytes for x in s.values or ())
        for layer in cache.layers
        for s in layer.segments
        if not isinstance(s, SharedSegment)
    ) + sum(x.nbytes for layer in cache.layers if layer.sinks is not None for x in layer.sinks)


def shared_bytes(cache: AgentCache) -> int:
    """Bytes of the shared prefix views a cache starts with."""
    return sum(layer.segments[0].nbytes for layer in cache.layers if layer.segments and isinstance(layer.segments[0], SharedSegment))


def _copy(t: tuple | None, a: int, b: int) -> tuple | None:
    """A fresh buffer for tokens [a, b): slices alone would keep the whole source alive."""
    return None if t is None else tuple(mx.array(x) for x in slice_tokens(t, a, b))


def _take(layer: LayerCache, n: int) -> Layer:
    """A copy of a layer's first `n` body tokens and its sinks."""
    _, k, v = layer.stored_segments(0)[0]
    return _copy(k, 0, n), _copy(v, 0, n), None if layer.sinks is None else tuple(mx.array(x) for x in layer.sinks)


@dataclass
class Prefix:
    key: str
    tokens: list[int]
    encoding: str
    layers: list[Layer] | None = None  # None: on disk only
    host: tuple[dict, dict] | None = None  # (numpy views, meta) of `layers`, for writing its file
    on_disk: bool = False  # its block file is known to exist

    @property
    def nbytes(self) -> int:
        if self.layers is None:
            return 0
        return sum(x.nbytes for layer in self.layers for t in layer if t is not None for x in t)

    def segments(self, n: int) -> list[SharedSegment]:
        def cut(t):
            return None if t is None else slice_tokens(t, 0, n)

        return [SharedSegment(cut(k), cut(v), n, shared=True, encoding=self.encoding, prefix=self.key, sinks=s) for k, v, s in self.layers]


class PrefixIndex:
    """Prefixes of one model and KV mode: the index, what is in memory, who uses them."""

    def __init__(self, fingerprint: str, mode: str):
        self.fingerprint = fingerprint
        self.mode = mode
        self.encoding = KV_MODES[mode][2]
        self.salt = salt(fingerprint, mode)
        self.entries: dict[str, Prefix] = {}
        self.index: dict[str, tuple[str, int]] = {}  # chain hash -> (prefix key, blocks)
        self.refs: dict[str, set[str]] = {}  # prefix key -> agents whose file uses it
        self._seen: OrderedDict[str, str] = OrderedDict()  # chain hash -> agent that held it
        self._lock = threading.RLock()

    # -- index -------------------------------------------------------------
    def add(self, key: str, tokens: list[int], on_disk: bool = True) -> None:
        """A prefix known from its block file (its tokens), not in memory yet."""
        with self._lock:
            self._add(Prefix(key, list(tokens), self.encoding, on_disk=on_disk))

    def _add(self, entry: Prefix) -> None:
        chain = chain_hashes(entry.tokens, self.salt)
        if not chain or chain[-1] != entry.key:
            return
        self.entries[entry.key] = entry
        for j, h in enumerate(chain, 1):
            if self.index.get(h, (None, 0))[1] < j:
                self.index[h] = (entry.key, j)

    def match(self, tokens: list[int], limit: int | None = None) -> tuple[str, int] | None:
        """Longest known prefix (key, tokens) that `tokens[:limit]` starts with."""
        chain = chain_hashes(tokens[:limit], self.salt)
        with self._lock:
            return self._existing(chain)

    # -- sharing -------------------------------------------------------------
    def share(self, name: str, cache: AgentCache) -> bool:
        """Point `cache` at a prefix for its leading blocks when one exists or a
        second agent has the same ones. Returns True if the cache changed.

        A prefix known only on disk is left alone: its file may hold other bytes
        than this cache (another agent's prefill, q4c groups of other turns), and
        an agent's memory must be what its restore gives. The next agent that
        attaches it or restores from it reads it (outside any lock)."""
        if not eligible(cache):
            return False
        stored = shareable(cache)
        chain = chain_hashes(cache.tokens[: min(stored, len(cache.tokens))], self.salt)
        if not chain:
            return False
        with self._lock:
            target = self._existing(chain) or self._new_from_peer(name, chain, cache)
            for h in chain[(target[1] // BLOCK_TOKENS if target else 0) :]:
                self._seen[h] = name
                self._seen.move_to_end(h)
            while len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
            current = prefix_of(cache)
            if target is None or (current and current[1] >= target[1]):
                return False
            key, n = target
            entry = self.entries[key]
            if entry.layers is None:
                return False
            attach(cache, entry.segments(n), n, cache.tokens[:n])
            return True

    def _existing(self, chain: list[str]) -> tuple[str, int] | None:
        for j in range(len(chain), 0, -1):
            hit = self.index.get(chain[j - 1])
            if hit:
                return hit[0], j * BLOCK_TOKENS
        return None

    def _new_from_peer(self, name: str, chain: list[str], cache: AgentCache) -> tuple[str, int] | None:
        for j in range(len(chain), 0, -1):
            peer = self._seen.get(chain[j - 1])
            if peer is not None and peer != name:
                return self.create(cache, j * BLOCK_TOKENS), j * BLOCK_TOKENS
        return None

    def peer(self, tokens: list[int], limit: int | None = None) -> tuple[str, int] | None:
        """The agent last seen holding the longest run of these leading blocks: (name, tokens)."""
        chain = chain_hashes(tokens[:limit], self.salt)
        with self._lock:
            for j in range(len(chain), 0, -1):
                name = self._seen.get(chain[j - 1])
                if name is not None:
                    return name, j * BLOCK_TOKENS
        return None

    def create(self, cache: AgentCache, n: int) -> str:
        """A new prefix from a copy of the first `n` (full blocks) tokens of `cache`; returns its key."""
        with self._lock:
            key = chain_hashes(cache.tokens[:n], self.salt)[-1]
            entry = self.entries.get(key)
            if entry is not None and entry.layers is not None:
                return key
            entry = entry or Prefix(key, list(cache.tokens[:n]), self.encoding)
            self._fill(entry, cache)
            self._add(entry)
            return key

    def _fill(self, entry: Prefix, cache: AgentCache) -> None:
        n = len(entry.tokens)
        entry.layers = [_take(layer, n) for layer in cache.layers]
        entry.host = block_snapshot(entry.layers, entry.tokens, self.fingerprint, self.mode)

    def segments(self, key: str, n: int, tokens: list[int] | None = None, load: BlockLoader | None = None) -> list[SharedSegment]:
        """Shared views of a prefix's first `n` tokens. A prefix that is on disk
        only is read with `load(key, tokens)`, outside the index's lock."""
        with self._lock:
            entry = self._checked(key, n, tokens)
            if entry.layers is not None:
                return entry.segments(n)
            want = list(entry.tokens)
        if load is None:
            raise PrefixMissing(f"shared prefix {key} is not in memory")
        layers = load(key, want)
        with self._lock:
            entry = self._checked(key, n, tokens)
            if entry.layers is None:  # another thread may have filled it meanwhile
                entry.layers = layers
                entry.host = block_snapshot(layers, entry.tokens, self.fingerprint, self.mode)
                entry.on_disk = True
            return entry.segments(n)

    def _checked(self, key: str, n: int, tokens: list[int] | None) -> Prefix:
        entry = self.entries.get(key)
        if entry is None:
            raise PrefixMissing(f"shared prefix {key} is missing")
        if n > len(entry.tokens) or (tokens is not None and entry.tokens[:n] != list(tokens)):
            raise PrefixMissing(f"shared prefix {key} does not hold these {n} tokens")
        return entry

    # -- what to write -----------------------------------------------------------
    def host(self, key: str) -> tuple[dict, dict] | None:
        """(tensors, metadata) of the prefix's block file, while it is in memory.

        The tensors are numpy views made on the thread that created or read the
        prefix, so a writer thread can write them."""
        with self._lock:
            entry = self.entries.get(key)
            return entry.host if entry else None

    def mark_on_disk(self, key: str, on_disk: bool = True) -> None:
        with self._lock:
            if key in self.entries:
                self.entries[key].on_disk = on_disk

    def unwritten(self) -> set[str]:
        """Prefixes in memory whose block file is not known to be on disk."""
        with self._lock:
            return {k for k, e in self.entries.items() if e.layers is not None and not e.on_disk}

    # -- references and memory ------------------------------------------------------
    def set_ref(self, name: str, key: str | None) -> None:
        with self._lock:
            for users in self.refs.values():
                users.discard(name)
            if key:
                self.refs.setdefault(key, set()).add(name)

    def release_unused(self, caches) -> int:
        """Drop prefixes no cache in memory uses (their file is on disk). Returns bytes freed."""
        used = {p[0] for p in map(prefix_of, caches) if p}
        freed = 0
        with self._lock:
            for e in self.entries.values():
                if e.layers is not None and e.key not in used and e.on_disk:
                    freed += e.nbytes
                    e.layers = e.host = None
        return freed

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.entries.values())

    def in_memory(self) -> int:
        with self._lock:
            return sum(1 for e in self.entries.values() if e.layers is not None)

    def forget(self, key: str) -> None:
        with self._lock:
            self.entries.pop(key, None)
            self.refs.pop(key, None)
            self.index = {}
            for e in list(self.entries.values()):  # another prefix may cover the same shorter chains
                self._add(e)


def attach(cache: AgentCache, segs: list[SharedSegment], n: int, tokens: list[int]) -> None:
    """Make the first `n` tokens (`tokens`) of every layer the shared views `segs`.

    If the cache already holds those tokens, what follows them is copied
    into fresh own segments, one per encoding (so the old buffers can be
    freed); otherwise the cache is reset to exactly the prefix. A q4c layer
    takes the prefix's sinks with its body.
    """
    keep = cache.tokens[:n] == list(tokens) and all(layer.offset == cache.offset for layer in cache.layers)
    for layer, seg in zip(cache.layers, segs):
        rest = []
        if keep and layer.offset > n:
            rest = [Segment(_copy(k, 0, m), _copy(v, 0, m), m, encoding=e) for e, k, v in layer.stored_segments(n) for m in [k[0].shape[-2]]]
        layer.segments = [seg] + rest
        layer.sinks = seg.sinks
        layer.fresh = None
        layer.start = 0
        layer.clean = 0  # its own segments start anew: the next save writes them whole
        if not keep:
            layer.offset = n
    if not keep:
        cache.tokens = list(tokens)
