"""Every file operation on one model's agents in a cache directory.

The residency ledger (ledger.py) decides what to load, save, evict and
remove; this store does the file work and reports back by return value:
what it read and how many bytes, what it wrote and the manifest generation
that now stands, what it removed. It keeps no residency state of its own,
so any thread may call it with no lock of the caller held. File locks (one
per agent, one for the shared blocks) are taken here and nowhere else in
the runtime's turn path.

A file that fails any check is moved aside (`container.quarantine`) and
never used; the caller learns why from `Refused` and the agent re-prefills.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock, Timeout

from .. import catalog
from ..kvcache import AgentCache, LayerCache
from . import codec, container, formats, index, segments
from .container import CacheFileError, CacheWriteError
from .layout import Layout

LOCK_TIMEOUT_S = 30.0


class AgentBusyError(CacheWriteError):
    """Another process holds the agent's lock."""


@dataclass
class Loaded:
    cache: AgentCache
    bytes_read: int
    gen: str | None  # the manifest generation read (None: an older format, rewritten whole on its next save)


@dataclass
class Refused:
    reason: str  # one line naming the file and what failed
    where: str  # what became of the file


@dataclass
class Saved:
    bytes_written: int
    bytes_collected: int  # segments no manifest names any more, deleted by this save
    gen: str


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _set_aside(path: Path, inode: int | None) -> str:
    try:
        moved = container.quarantine(path, inode)
        return f"moved to {moved.name}" if moved else "left in place (it changed meanwhile)"
    except OSError as err:  # e.g. a read-only directory: still never used
        return f"left in place (could not move it: {err.strerror or err})"


class AgentStore:
    """The agent files, segments and shared-prefix block files of one model."""

    def __init__(self, cache_dir: Path, fingerprint: str, new_layers: Callable[[], list[LayerCache]], *,
                 model: str | None = None, lock_timeout: float = LOCK_TIMEOUT_S):
        self.layout = Layout(cache_dir)
        self.dir = self.layout.dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.model = model
        self.new_layers = new_layers
        self.lock_timeout = lock_timeout
        self.layout.remove_stale_tmp(agents=[])  # not one glob per agent: a save cleans its own segments folder

    # -- names -----------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.layout.agent_file(name)

    def lock(self, name: str, timeout: float | None = None) -> FileLock:
        """The per-agent lock every writer (in any process) holds while replacing the file."""
        return self.layout.agent_lock(name, self.lock_timeout if timeout is None else timeout)

    def names(self) -> list[str]:
        return self.layout.cache_names()

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def disk_bytes(self, name: str) -> int | None:
        """The agent's manifest plus its segments, or None without a cache file."""
        try:
            return segments.disk_bytes(self.path(name))
        except FileNotFoundError:
            return None

    # -- reads -----------------------------------------------------------------
    def read(self, name: str, prefix_source: codec.PrefixSource | None) -> Loaded | Refused | None:
        """The agent's cache from its files; None without one, Refused (file set aside) when any check fails.

        A save by another process between opening the manifest and reading its
        segments is read again once."""
        path = self.path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        meta: dict = {}

        def source(key: str, n: int, tokens: list[int]):
            if prefix_source is None:
                raise CacheFileError(f"{path.name}: shared prefix {key} is missing (this pool shares none)")
            return prefix_source(key, n, tokens)

        try:
            try:
                cache, _ = codec.load(path, self.fingerprint, self.new_layers(), prefix_source=source, meta_out=meta)
            except CacheFileError:
                if _inode(path) in (st.st_ino, None):
                    raise
                st = path.stat()  # another process saved meanwhile (and collected the segments read): read its save
                cache, _ = codec.load(path, self.fingerprint, self.new_layers(), prefix_source=source, meta_out=meta)
        except (CacheFileError, LookupError, FileNotFoundError) as e:
            return Refused(str(e), _set_aside(path, st.st_ino))
        cache.take_changed()
        return Loaded(cache, st.st_size + formats.stored_bytes(meta), meta.get("gen"))

    def read_block(self, key: str, mode: str, tokens: list[int]) -> tuple[list, int]:
        """A shared prefix's block file: (layers, bytes read). One that fails a check is
        moved aside and CacheFileError raised, naming it."""
        path = self.layout.block_file(key)
        rel = path.relative_to(self.dir)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CacheFileError(f"shared prefix {key} is missing (no {rel})") from None
        try:
            layers = codec.read_block(path, self.fingerprint, mode, tokens, [layer.expect for layer in self.new_layers()])
        except CacheFileError as e:
            try:
                container.quarantine(path, st.st_ino)
            except OSError:
                pass  # a read-only directory: still refused
            raise CacheFileError(f"shared prefix block {rel} refused: {e}") from None
        return layers, st.st_size

    def blocks(self, mode: str) -> list[tuple[str, list[int]]]:
        """(key, tokens) of every readable block file of this model and mode (headers only)."""
        out = []
        for p in self.layout.block_files():
            try:
                _, meta, _ = container.read_header(p, (codec.BLOCK_FORMAT,))
                tokens = formats.block_tokens(meta)
            except (CacheFileError, KeyError, ValueError):
                continue  # gc reports and removes it; loads of agents using it will refuse
            if meta.get("fingerprint") == self.fingerprint and codec.block_mode(meta) == mode:
                out.append((self.layout.block_key(p), tokens))
        return out

    def tokens(self, name: str) -> list[int]:
        """The token ids an agent's file holds, from its header and tokens tensor alone: a
        hint for choosing whose files to read (a read checks everything); [] if unreadable."""
        path = self.path(name)
        try:
            header, _, start = container.read_header(path, formats.AGENT_FORMATS)
            raw = formats.token_bytes(path, header, start)
        except (CacheFileError, OSError):
            return []
        return np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<i4").tolist()

    def listing(self) -> list[dict]:
        """Every agent as the listing index describes it (store/index.py), without opening
        the files of agents that did not change since it was written."""
        return index.listing(self.dir)

    # -- writes ----------------------------------------------------------------
    def write(self, name: str, tensors: dict, meta: dict, owed: Callable[[], tuple[list[int] | None, str | None]],
              block: tuple[str, Callable[[], tuple[dict, dict] | None]] | None = None) -> Saved:
        """Append a snapshot's changes as a new segment and replace the manifest, under the
        agent's lock. `owed()`, asked under that lock, gives the first changed position per
        layer and the generation to append to (None, None: write everything). `block` =
        (key, host): the shared block the snapshot starts with, written first if it is not
        on disk (under the blocks' lock, which gc holds too). Raises CacheWriteError
        (AgentBusyError when another process holds the agent's lock)."""
        try:
            with self.lock(name):
                written = 0
                if block is None:
                    n, freed, gen = codec.save_segments(self.layout, name, tensors, meta, *owed())
                else:
                    with self.layout.blocks_lock(self.lock_timeout):
                        written = self.ensure_block(*block)
                        n, freed, gen = codec.save_segments(self.layout, name, tensors, meta, *owed())
        except Timeout:
            raise AgentBusyError(errno.EBUSY, f"agent '{name}' is being saved by another process (waited {self.lock_timeout:g} s)") from None
        except CacheWriteError:
            raise
        except OSError as e:  # the lock folder or file cannot be made: a read-only or full directory
            raise CacheWriteError(e.errno, f"could not save {self.path(name).name}: {e.strerror or e}") from e
        return Saved(written + n, freed, gen)

    def ensure_block(self, key: str, host: Callable[[], tuple[dict, dict] | None]) -> int:
        """Write the block file if it is not on disk (new, or removed meanwhile); bytes written."""
        path = self.layout.block_file(key)
        if path.exists():
            return 0
        got = host()
        if got is None:
            raise CacheWriteError(errno.ENOENT, f"shared prefix {key} is neither on disk nor in memory")
        path.parent.mkdir(parents=True, exist_ok=True)
        return container.write_tensors(path, *got)

    # -- removal ---------------------------------------------------------------
    def remove(self, name: str) -> list[Path]:
        """Delete the agent's cache file and segments (under its lock); the removed paths."""
        return catalog.remove(self.dir, name, history=False, timeout=self.lock_timeout)

    def gc_blocks(self, keep: set[str]) -> list[str]:
        """Delete block files that no agent file (of any process) uses and that are not in
        `keep` (see catalog.gc_plan); the keys removed."""
        plan = [(p, why) for p, why in catalog.gc_plan(self.dir, set()) if self.layout.is_block_file(p) and self.layout.block_key(p) not in keep]
        catalog.gc_apply(self.dir, plan)
        return [self.layout.block_key(p) for p, _ in plan if not p.exists()]
