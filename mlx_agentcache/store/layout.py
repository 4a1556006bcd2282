"""Where an agent's files live and what their names mean: the disk layout, spelled once.

    <cache_dir>/<agent>.safetensors            the agent's KV cache: a manifest (segments.py; older: codec.FORMAT)
    <cache_dir>/segments/<agent>/<id>.safetensors  an immutable segment of the agent's cache
    <cache_dir>/<agent>.json                   its conversation history
    <cache_dir>/<agent>.safetensors.bad-<t>-<pid>  a refused file, moved aside (histories too)
    <cache_dir>/.<file>.tmp<pid>               a save in progress (stale once <pid> is gone)
    <cache_dir>/.locks/<agent>.lock            held by every writer of the agent's files
    <cache_dir>/.locks/<agent>.turn            held by a turn from reading the history to its saves
    <cache_dir>/blocks/<hash>.safetensors      a shared prefix (codec.BLOCK_FORMAT)
    <cache_dir>/blocks/.lock                   held while a block is written or collected
    <cache_dir>/.index/agents.json             the listing index (index.py): what each agent's files said
    <anything>.card.safetensors                an agent archive (`agents export`; cards.py writes cache cards)

Every other module asks a `Layout` for paths and never builds one itself.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filelock import FileLock

SUFFIX = ".safetensors"
HISTORY_SUFFIX = ".json"
ARCHIVE_SUFFIX = ".archive" + SUFFIX  # an agent archive (`agents export`): the agent's whole cache and history
OLD_ARCHIVE_SUFFIX = ".card" + SUFFIX  # what archives were called before: still kept out of listings and agent names
CACHE_CARD_SUFFIX = ".card"  # a cache card (cards.py), wherever the user keeps it
BLOCKS_DIR = "blocks"
SEGMENTS_DIR = "segments"
LOCKS_DIR = ".locks"
INDEX_DIR, INDEX = ".index", "agents.json"
# Anchored at both ends (\Z, not $: `$` also matches before a trailing newline).
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
TMP_RE = re.compile(r"\A\..+\.tmp(\d+)\Z")
BAD_MARK = ".bad-"
BAD_RE = re.compile(r"\A.+\.(safetensors|json)\.bad-\d{8}-\d{6}-\d+\Z")
# Parts of the store's own file names that an agent name must not contain:
# a name holding one could make the agent's files look like a file set aside,
# which listings skip and gc removes. (Temporary names start with a dot, which
# no agent name does.) Nor may a name end as an archive's does (`ARCHIVE_ENDS`):
# an archive left in the cache directory would look like that agent's file.
RESERVED = (SUFFIX, HISTORY_SUFFIX + ".", BAD_MARK)
ARCHIVE_ENDS = tuple(s[: -len(SUFFIX)] for s in (ARCHIVE_SUFFIX, OLD_ARCHIVE_SUFFIX))


def validate_agent_name(name: str) -> str:
    """The one rule for agent names, which become file names: 1-64 letters,
    digits, '_', '-', '.', starting with a letter or digit, no '..', and
    nothing that the store's own file names use (see `RESERVED`, `ARCHIVE_ENDS`)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid agent name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    clash = next((r for r in RESERVED if r in name), None) or next((e for e in ARCHIVE_ENDS if name.endswith(e)), None)
    if clash:
        raise ValueError(f"invalid agent name {name!r}: {clash!r} is part of the cache directory's own file names")
    return name


def is_agent_name(name: str) -> bool:
    try:
        validate_agent_name(name)
        return True
    except ValueError:
        return False


def tmp_name(path: Path) -> Path:
    """The temporary file a save writes first; the pid lets a later run remove leftovers."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def bad_name(path: Path) -> Path:
    """Where a refused file is moved: never deleted, recognisable by `gc`."""
    path = Path(path)
    return path.with_name(f"{path.name}{BAD_MARK}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_tmp(path: Path) -> bool:
    """A temporary file whose writing process is gone."""
    m = TMP_RE.match(Path(path).name)
    return bool(m) and not pid_alive(int(m.group(1)))


class Layout:
    """Paths and names of one cache directory."""

    def __init__(self, cache_dir: Path | str):
        self.dir = Path(cache_dir)

    # -- one agent ------------------------------------------------------------
    def agent_file(self, name: str) -> Path:
        return self.dir / (validate_agent_name(name) + SUFFIX)

    @staticmethod
    def agent_of(path: Path) -> str:
        """The agent whose cache file `path` is."""
        return Path(path).name[: -len(SUFFIX)]

    def history_file(self, name: str) -> Path:
        return self.dir / (validate_agent_name(name) + HISTORY_SUFFIX)

    def lock_file(self, name: str) -> str:
        """The per-agent lock file, shared by every process using this directory."""
        d = self.dir / LOCKS_DIR
        d.mkdir(parents=True, exist_ok=True)
        return str(d / f"{validate_agent_name(name)}.lock")

    def turn_lock_file(self, name: str) -> Path:
        """The per-agent turn lock (turnlock.py): one turn of an agent at a time, across processes.
        The folder is not created here: a read-only directory is handled by the lock."""
        return self.dir / LOCKS_DIR / f"{validate_agent_name(name)}.turn"

    def agent_lock(self, name: str, timeout: float) -> FileLock:
        from filelock import FileLock  # here: listings take no locks, and start faster without it

        return FileLock(self.lock_file(name), timeout=timeout)

    # -- an agent's segments ------------------------------------------------------
    def segments_dir(self, name: str) -> Path:
        return self.dir / SEGMENTS_DIR / validate_agent_name(name)

    def segment_file(self, name: str, seg_id: str) -> Path:
        return self.segments_dir(name) / f"{seg_id}{SUFFIX}"

    @staticmethod
    def segment_id(path: Path) -> str:
        return Path(path).name[: -len(SUFFIX)]

    def segment_files(self, name: str) -> list[Path]:
        """The agent's segment files (not temporary files of saves in progress)."""
        d = self.segments_dir(name)
        return sorted(d.glob("[!.]*" + SUFFIX)) if d.is_dir() else []

    def is_segment_file(self, path: Path) -> bool:
        return Path(path).parent.parent == self.dir / SEGMENTS_DIR

    def segment_owners(self) -> list[str]:
        """Agents with a segments folder (their manifest may be gone)."""
        d = self.dir / SEGMENTS_DIR
        return sorted(p.name for p in d.iterdir() if p.is_dir() and is_agent_name(p.name)) if d.is_dir() else []

    # -- shared prefix blocks ---------------------------------------------------
    @property
    def blocks_dir(self) -> Path:
        return self.dir / BLOCKS_DIR

    def block_file(self, key: str) -> Path:
        return self.blocks_dir / f"{key}{SUFFIX}"

    def blocks_lock(self, timeout: float) -> FileLock:
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        return FileLock(str(self.blocks_dir / ".lock"), timeout=timeout)

    @staticmethod
    def block_key(path: Path) -> str:
        """The prefix hash a block file holds."""
        return Path(path).name[: -len(SUFFIX)]

    def is_block_file(self, path: Path) -> bool:
        return Path(path).parent == self.blocks_dir

    def block_files(self) -> list[Path]:
        return sorted(self.blocks_dir.glob("*" + SUFFIX))

    @property
    def index_file(self) -> Path:
        return self.dir / INDEX_DIR / INDEX

    def scan(self, known: set[str] = frozenset()) -> dict[str, tuple[os.stat_result | None, os.stat_result | None]]:
        """Agents with a cache file or a history, from one directory read:
        name -> (stat of the cache file, stat of the history), None where it has none.
        Names in `known` were checked before and are not checked again."""
        out: dict[str, list] = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return {}
        for e in entries:
            for slot, suffix in ((0, SUFFIX), (1, HISTORY_SUFFIX)):
                if e.name.endswith(suffix) and (e.name[: -len(suffix)] in known or self._listed(e.name[: -len(suffix)])):
                    try:
                        out.setdefault(e.name[: -len(suffix)], [None, None])[slot] = e.stat()
                    except FileNotFoundError:
                        pass
        return {n: (c, h) for n, (c, h) in out.items()}

    # -- listing ------------------------------------------------------------------
    def agent_files(self) -> list[Path]:
        """Agent cache files (not archives, not blocks, not files set aside)."""
        return [p for p in sorted(self.dir.glob("*" + SUFFIX)) if self._listed(p.name[: -len(SUFFIX)])]

    def cache_names(self) -> list[str]:
        """Agents with a cache file."""
        return [p.name[: -len(SUFFIX)] for p in self.agent_files()]

    def names(self) -> list[str]:
        """Agents with a cache file or a history."""
        found = set(self.cache_names())
        found |= {p.name[: -len(HISTORY_SUFFIX)] for p in self.dir.glob("*" + HISTORY_SUFFIX)}
        return sorted(n for n in found if self._listed(n))

    @staticmethod
    def _listed(name: str) -> bool:
        return is_agent_name(name) and not name.endswith(ARCHIVE_ENDS)

    def set_aside_files(self) -> list[Path]:
        """Refused cache files moved aside (exactly `bad_name`'s pattern: never a live agent's file)."""
        return [p for p in sorted(self.dir.glob("*" + SUFFIX + BAD_MARK + "*")) if BAD_RE.fullmatch(p.name)]

    def stale_tmp_files(self, agents: list[str] | None = None) -> list[Path]:
        """Temporary files of saves whose process died: in the directory, the blocks
        folder and the segment folders of `agents` (None: of every agent)."""
        top = [p for d in (self.dir, self.blocks_dir) for p in sorted(d.glob(".*.tmp*")) if is_stale_tmp(p)]
        return top + [p for n in (self.segment_owners() if agents is None else agents) for p in self.stale_segment_tmp(n)]

    def stale_segment_tmp(self, name: str) -> list[Path]:
        """Segments that a killed save of the agent left half written."""
        return [p for p in sorted(self.segments_dir(name).glob(".*.tmp*")) if is_stale_tmp(p)]

    def remove_stale_tmp(self, agents: list[str] | None = None) -> None:
        for p in self.stale_tmp_files(agents):
            p.unlink(missing_ok=True)
