"""The listing index: `agents ls`, the server's agent list and gc's view read it
instead of every agent's files.

`<cache_dir>/.index/agents.json` keeps, per agent, what `describe` found in its files
and the stat (modification time, size, inode) of each file it read. The files
stay the truth: a listing scans the directory once (one stat per file),
describes again only the agents whose files changed, drops the ones that are
gone, and rewrites the index (atomically) when anything changed. An index that
is missing or cannot be read is rebuilt from the files, with one line saying
so (silently the first time a directory is listed). A directory where it cannot be written is listed all the same. Nothing
here imports MLX, so `agentcache agents ls` starts quickly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from ..config import warn as default_warn
from . import formats, history
from .container import CacheFileError, atomic_write, read_header
from .layout import Layout

VERSION = 2  # 2: entries name the agent's KV mode and first block (`lead`)
SETTLE_S = 2.0  # file times are coarser than nanoseconds: a change this close to a scan may share its timestamp


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _key(st: os.stat_result | None) -> list[int] | None:
    return None if st is None else [st.st_mtime_ns, st.st_size, st.st_ino]


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def describe(layout: Layout, name: str) -> tuple[dict, dict | None]:
    """One agent as its files say, without reading tensors: (info, the cache file's
    checked metadata or None). Tier warm (cache file), cold (history only) or invalid."""
    path = layout.agent_file(name)
    hist = history.read(layout.history_file(name))
    messages = hist.get("messages") if hist else None
    info = {"name": name, "tier": "cold", "tokens": 0, "bytes": 0, "shared_bytes": 0, "model": None, "last_used": None,
            "messages": len(messages) if isinstance(messages, list) else 0}
    st = _stat(path)
    if st is None:
        return info, None
    info.update(bytes=st.st_size, file_bytes=st.st_size, last_used=when(st.st_mtime))
    try:
        header, meta, start = read_header(path, formats.AGENT_FORMATS)
        ref = formats.prefix_ref(meta)
        info.update(tier="warm", tokens=int(meta["n_tokens"]), model=meta.get("model") or None, fingerprint=meta.get("fingerprint"),
                    kv_bits=int(meta["kv_bits"]), kv_mode=meta.get("kv_mode"), lead=_lead(path, header, start),
                    bytes=st.st_size + formats.stored_bytes(meta))
        if ref:
            block = layout.block_file(ref["hash"])
            info["shared_prefix"] = {"hash": ref["hash"], "tokens": ref["tokens"], "present": block.exists()}
            if block.exists():
                _, bmeta, _ = read_header(block, (formats.BLOCK,))
                info["shared_bytes"] = block.stat().st_size * ref["tokens"] // max(len(formats.block_tokens(bmeta)), 1)
    except (CacheFileError, OSError, KeyError, ValueError, TypeError) as e:
        info.update(tier="invalid", error=str(e))
        return info, None
    return info, meta


def _lead(path: Path, header: dict, start: int) -> str | None:
    """The key of the agent's first block (formats.lead_of), read from the first token ids of
    its `tokens` tensor; a hint for finding agents that share a prompt start (sharing.py
    compares the checked tokens themselves before using one)."""
    n = 4 * formats.LEAD_TOKENS
    raw = formats.token_bytes(path, header, start, n)
    return formats.lead_of_bytes(raw) if len(raw) == n else None


def _keys(layout: Layout, name: str, cache: os.stat_result | None, hist: os.stat_result | None, info: dict | None) -> list:
    """What an entry was read from: the agent's files and the prefix block it names."""
    block = info.get("shared_prefix") if info else None
    return [_key(cache), _key(hist), _key(_stat(layout.block_file(block["hash"]))) if block else None]


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("agents"), dict):
        return None
    return data


def _mtime(path: Path) -> int | None:
    st = _stat(path)
    return None if st is None else st.st_mtime_ns


def listing(cache_dir: Path | str, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Every agent with a cache file or a history, described as `describe` would, from the
    index where the files did not change since it was written.

    Every save replaces files by renaming them into the directory, which moves the
    directory's modification time: when it (and the blocks folder's) is what the index
    saw before its scan, and that scan came more than `SETTLE_S` after it (so no change
    could share its timestamp), nothing was added, replaced or removed since, and the
    index answers without a scan."""
    layout = Layout(cache_dir)
    path = layout.index_file
    data = _load(path)
    lost = data is None
    existed = path.parent.is_dir()
    entries = {} if lost else data["agents"]
    dirs = [_mtime(layout.dir), _mtime(layout.blocks_dir)]
    if not lost and data.get("dirs") == dirs and data.get("settled"):
        return [e[1] for _, e in sorted(entries.items())]
    t0 = time.time_ns()
    found = layout.scan(known=set(entries))
    changed = lost or bool(set(entries) - set(found))
    out = []
    for name, (cache, hist) in sorted(found.items()):
        e = entries.get(name)
        if isinstance(e, list) and len(e) == 2 and isinstance(e[1], dict) and e[0] == _keys(layout, name, cache, hist, e[1]):
            out.append(e[1])
            continue
        info, _ = describe(layout, name)
        entries[name] = [_keys(layout, name, cache, hist, info), info]
        out.append(info)
        changed = True
    settled = None not in dirs[:1] and t0 - dirs[0] > SETTLE_S * 1e9
    if (changed or settled != data.get("settled") or dirs != data.get("dirs")) and layout.dir.is_dir():
        try:
            path.parent.mkdir(exist_ok=True)
            body = {"version": VERSION, "dirs": dirs, "settled": settled, "agents": {n: entries[n] for n in found}}
            atomic_write(path, [json.dumps(body, separators=(",", ":")).encode()])
        except OSError:
            pass  # a read-only directory: listed from the files every time
    if lost and existed and found:  # the first listing of a directory builds it silently
        (warn or default_warn)(f"note: agent index {path.relative_to(layout.dir)} was missing, unreadable or of an older version; rebuilt from the files of {len(found)} agents")
    return out
