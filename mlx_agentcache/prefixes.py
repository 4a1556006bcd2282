"""Shared prompt prefixes: the KV of common leading blocks, kept once.

Many agents start with the same long system prompt, so their caches would
hold identical leading blocks. Instead, the full 256-token blocks that agents
have in common are stored once, content-addressed by a hash chained over the
token ids (salted with the model fingerprint and KV precision), and each
agent's layer caches begin with a read-only `SharedSegment` over them.
Appends go to the agent's own segment; trimming into the prefix copies what
is kept (`LayerCache.trim_to`), so sharing is copy-on-write.

A prefix is created when a second agent checks in with the same leading
blocks as one seen before; later agents whose prompt starts with those
blocks attach to it before prefill and skip computing them at all. An agent
may use fewer blocks than a prefix holds (a view, no copy).

On disk a prefix is `<cache_dir>/blocks/<hash>.safetensors` (BLOCK_FORMAT,
token ids in its metadata); agent files name it and store only what follows.
Reference counts are rebuilt from the agent files; `gc` removes block files
nothing refers to. Only models whose layers all attend globally share
prefixes: a sliding-window layer does not keep the early blocks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import cachefile
from .kvcache import AgentCache, LayerCache, Segment
from .q4 import BLOCK_TOKENS

MAX_SEEN = 1 << 16  # chain hashes remembered from agents' own blocks


@dataclass
class SharedSegment(Segment):
    """A read-only view of a prefix's first `length` tokens."""

    prefix: str = ""


def chain_hashes(tokens: list[int], salt: str) -> list[str]:
    """Hash after each full block: entry j identifies tokens[: (j + 1) * 256]."""
    h = hashlib.sha256(salt.encode())
    out = []
    for a in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h.update(np.asarray(tokens[a : a + BLOCK_TOKENS], dtype=np.int32).tobytes())
        out.append(h.copy().hexdigest()[:32])
    return out


def eligible(cache: AgentCache) -> bool:
    """Global-attention caches only; q4k (rotated keys) is not shared: blocks are keyed by bits alone."""
    return all(layer.window is None and layer.start == 0 and not layer.rotate_keys for layer in cache.layers)


def prefix_of(cache: AgentCache) -> tuple[str, int] | None:
    """(hash, tokens) when every layer starts with the same shared prefix view."""
    firsts = [layer.segments[0] if layer.segments else None for layer in cache.layers]
    s0 = firsts[0]
    if not isinstance(s0, SharedSegment) or any(not isinstance(s, SharedSegment) or (s.prefix, s.length) != (s0.prefix, s0.length) for s in firsts):
        return None
    return s0.prefix, s0.length


def own_bytes(cache: AgentCache) -> int:
    """Memory an agent holds apart from shared prefixes (allocated capacity)."""
    return sum(
        sum(x.nbytes for x in s.keys) + sum(x.nbytes for x in s.values or ())
        for layer in cache.layers
        for s in layer.segments
        if not isinstance(s, SharedSegment)
    )


def _copy(t: tuple | None, a: int, b: int) -> tuple | None:
    """A fresh buffer for tokens [a, b): slices alone would keep the whole source alive."""
    return None if t is None else tuple(mx.array(x[..., a:b, :]) for x in t)


@dataclass
class Prefix:
    key: str
    tokens: list[int]
    layers: list[tuple[tuple, tuple | None]] | None = None  # None: on disk only
    host: tuple[dict, dict] | None = None  # (numpy views, meta) of `layers`, for writing its file

    @property
    def nbytes(self) -> int:
        if self.layers is None:
            return 0
        return sum(sum(x.nbytes for x in k) + sum(x.nbytes for x in v or ()) for k, v in self.layers)

    def segments(self, n: int) -> list[SharedSegment]:
        def cut(t):
            return None if t is None else tuple(x[..., :n, :] for x in t)

        return [SharedSegment(cut(k), cut(v), n, shared=True, prefix=self.key) for k, v in self.layers]


class PrefixStore:
    """Prefixes of one model and KV precision: in memory, on disk, and who uses them."""

    def __init__(self, cache_dir: Path, fingerprint: str, bits: int):
        self.dir = Path(cache_dir) / "blocks"
        self.fingerprint = fingerprint
        self.bits = bits
        self.salt = f"{fingerprint}:{bits}"
        self.entries: dict[str, Prefix] = {}
        self.index: dict[str, tuple[str, int]] = {}  # chain hash -> (prefix key, blocks)
        self.refs: dict[str, set[str]] = {}  # prefix key -> agents whose file uses it
        self.bytes_read = 0
        self._seen: OrderedDict[str, str] = OrderedDict()  # chain hash -> agent that held it
        self._lock = threading.RLock()
        self._scan()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{cachefile.SUFFIX}"

    def lock_path(self) -> str:
        return str(self.dir / ".lock")

    # -- index -------------------------------------------------------------
    def _scan(self) -> None:
        for p in sorted(self.dir.glob("*" + cachefile.SUFFIX)):
            try:
                _, meta, _ = cachefile.read_header(p, (cachefile.BLOCK_FORMAT,))
                tokens = json.loads(meta["tokens"])
            except (cachefile.CacheFileError, KeyError, ValueError):
                continue  # gc reports and removes it; loads of agents using it will refuse
            if meta.get("fingerprint") == self.fingerprint and meta.get("kv_bits") == str(self.bits):
                self._add(Prefix(p.stem, tokens))

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
            for j in range(len(chain), 0, -1):
                hit = self.index.get(chain[j - 1])
                if hit:
                    return hit[0], j * BLOCK_TOKENS
        return None

    # -- sharing -------------------------------------------------------------
    def share(self, name: str, cache: AgentCache) -> bool:
        """Point `cache` at a prefix for its leading blocks when one exists or a
        second agent has the same ones. Returns True if the cache changed."""
        if not eligible(cache):
            return False
        stored = min(layer.stored for layer in cache.layers)
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
            self.attach(cache, *target, cache.tokens[: target[1]])
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
            entry = Prefix(chain_hashes(cache.tokens[:n], self.salt)[-1], list(cache.tokens[:n]))
            if entry.key in self.entries and self.entries[entry.key].layers is not None:
                return entry.key
            entry.layers = [(_copy(k, 0, n), _copy(v, 0, n)) for k, v in (cachefile.stored_views(layer, 0) for layer in cache.layers)]
            entry.host = self._block_file(entry)
            self._add(entry)
            return entry.key

    def _block_file(self, entry: Prefix) -> tuple[dict, dict]:
        layers = [LayerCache.restore(self.bits, None, 0, len(entry.tokens), k, v) for k, v in entry.layers]
        tensors, spans = cachefile.layer_tensors(layers, lambda layer: 0)
        meta = {
            "format": cachefile.BLOCK_FORMAT,
            "fingerprint": self.fingerprint,
            "kv_bits": str(self.bits),
            "tokens": json.dumps(entry.tokens),
            "layers": json.dumps(spans),
        }
        return tensors, meta

    def attach(self, cache: AgentCache, key: str, n: int, tokens: list[int]) -> None:
        """Make the first `n` tokens (`tokens`) of every layer a view of prefix `key`.

        If the cache already holds those tokens, what follows them is copied
        into a fresh own segment (so the old buffers can be freed); otherwise
        the cache is reset to exactly the prefix.
        """
        segs = self.segments(key, n, tokens)
        keep = cache.tokens[:n] == list(tokens) and all(layer.offset == cache.offset for layer in cache.layers)
        for layer, seg in zip(cache.layers, segs):
            rest = []
            if keep and layer.offset > n:
                k, v = cachefile.stored_views(layer, n)
                rest = [Segment(_copy(k, 0, layer.offset - n), _copy(v, 0, layer.offset - n), layer.offset - n)]
            layer.segments = [seg] + rest
            layer.start = 0
            if not keep:
                layer.offset = n
        if not keep:
            cache.tokens = list(tokens)

    def segments(self, key: str, n: int, tokens: list[int] | None = None) -> list[SharedSegment]:
        """Shared views of a prefix's first `n` tokens, reading its file if needed."""
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                raise cachefile.CacheFileError(f"shared prefix {key} is missing (no {self.path(key).name})")
            if n > len(entry.tokens) or (tokens is not None and entry.tokens[:n] != list(tokens)):
                raise cachefile.CacheFileError(f"shared prefix {key} does not hold these {n} tokens")
            if entry.layers is None:
                entry.layers = self._read(entry)
                entry.host = self._block_file(entry)
            return entry.segments(n)

    def _read(self, entry: Prefix) -> list[tuple[tuple, tuple | None]]:
        path = self.path(entry.key)
        out = cachefile.read_block(path, self.fingerprint, self.bits, entry.tokens)
        self.bytes_read += path.stat().st_size
        return out

    # -- disk ----------------------------------------------------------------
    def ensure_file(self, key: str) -> int:
        """Write the block file if it is not on disk (new, or removed meanwhile); returns bytes written.

        Runs on the writer thread: it only touches numpy views made on the
        thread that created or loaded the prefix.
        """
        with self._lock:
            entry = self.entries.get(key)
            host = entry.host if entry else None
        if self.path(key).exists():
            return 0
        if host is None:
            raise cachefile.CacheWriteError(2, f"shared prefix {key} is neither on disk nor in memory")
        self.dir.mkdir(parents=True, exist_ok=True)
        return cachefile.write_tensors(self.path(key), *host)

    def unwritten(self) -> set[str]:
        """Prefixes in memory whose block file is not on disk yet."""
        with self._lock:
            return {k for k, e in self.entries.items() if e.layers is not None and not self.path(k).exists()}

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
                if e.layers is not None and e.key not in used and self.path(e.key).exists():
                    freed += e.nbytes
                    e.layers = e.host = None
        return freed

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.entries.values())

    def forget(self, key: str) -> None:
        with self._lock:
            self.entries.pop(key, None)
            self.refs.pop(key, None)
            self.index = {}
            for e in list(self.entries.values()):  # another prefix may cover the same shorter chains
                self._add(e)
