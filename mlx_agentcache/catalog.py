"""The cache directory as files: list, inspect, remove, export, import, clean up.

Everything here reads headers and checksums only and never loads a model, so
`agentcache agents ...` answers at once and can manage caches of models that
are not installed. A "cache card" is one self-contained agent file (shared
prefix blocks inlined, conversation history in its metadata) that can be
imported under another name, on another machine with the same model.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from filelock import FileLock

from . import cachefile
from .pool import NAME_RE, TMP_RE, _alive, lock_path, validate_agent_name

CARD_SUFFIX = ".card" + cachefile.SUFFIX


def _history(cache_dir: Path, name: str) -> dict | None:
    p = cache_dir / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _peek(path: Path) -> dict | None:
    """Metadata of a safetensors file without any check (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > cachefile.MAX_HEADER_BYTES:
                return None
            meta = json.loads(f.read(n)).get("__metadata__")
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def names(cache_dir: Path) -> list[str]:
    """Agents with a cache file or a history in `cache_dir`."""
    found = {p.name[: -len(cachefile.SUFFIX)] for p in cache_dir.glob("*" + cachefile.SUFFIX)}
    found |= {p.stem for p in cache_dir.glob("*.json")}
    return sorted(n for n in found if NAME_RE.match(n) and ".." not in n and not n.endswith(".card"))


def describe(cache_dir: Path, name: str, verify: bool = False) -> dict:
    """One agent as stored: tier (warm: cache file, cold: history only), tokens,
    bytes, shared prefix, model, last use; `verify` also checks every checksum."""
    cache_dir = Path(cache_dir)
    path = cache_dir / (name + cachefile.SUFFIX)
    hist = _history(cache_dir, name)
    info = {"name": name, "tier": "cold", "tokens": 0, "bytes": 0, "shared_bytes": 0, "model": None, "last_used": None, "messages": len(hist.get("messages", [])) if hist else 0}
    if not path.exists():
        return info
    st = path.stat()
    info.update(bytes=st.st_size, last_used=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)))
    try:
        _, meta, _ = cachefile.read_header(path, (cachefile.FORMAT,))
        if verify:
            cachefile.read_tensors(path)
        ref = json.loads(meta.get("prefix", "null"))
        info.update(tier="warm", tokens=int(meta["n_tokens"]), model=meta.get("model") or None, fingerprint=meta.get("fingerprint"), kv_bits=int(meta["kv_bits"]))
        if ref:
            block = cache_dir / "blocks" / f"{ref['hash']}{cachefile.SUFFIX}"
            info["shared_prefix"] = {"hash": ref["hash"], "tokens": ref["tokens"], "present": block.exists()}
            if block.exists():
                _, bmeta, _ = cachefile.read_header(block, (cachefile.BLOCK_FORMAT,))
                info["shared_bytes"] = block.stat().st_size * ref["tokens"] // max(len(json.loads(bmeta["tokens"])), 1)
                if verify:
                    cachefile.read_tensors(block, (cachefile.BLOCK_FORMAT,))
        if verify:
            info["layers"] = len(json.loads(meta["layers"]))
            info["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(meta["saved_at"])))
            info["status"] = "ok"
    except (cachefile.CacheFileError, KeyError, ValueError, TypeError) as e:
        info.update(tier="invalid", error=str(e))
    return info


def listing(cache_dir: Path) -> list[dict]:
    return [describe(cache_dir, n) for n in names(Path(cache_dir))]


def remove(cache_dir: Path, name: str, history: bool = True) -> list[Path]:
    """Delete an agent's cache file (and history), under its lock. Returns removed paths."""
    cache_dir = Path(cache_dir)
    validate_agent_name(name)
    removed = []
    with FileLock(lock_path(cache_dir, name), timeout=30):
        for p in [cache_dir / (name + cachefile.SUFFIX)] + ([cache_dir / f"{name}.json"] if history else []):
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed


# -- cache cards ---------------------------------------------------------------


def export_card(cache_dir: Path, name: str, out: Path) -> Path:
    """Write one self-contained, checked file holding the agent's cache and history."""
    cache_dir = Path(cache_dir)
    path = cache_dir / (validate_agent_name(name) + cachefile.SUFFIX)
    if not path.exists():
        raise FileNotFoundError(f"agent '{name}' has no cache file in {cache_dir}")
    arrays, meta = cachefile.read_tensors(path)
    spans = json.loads(meta["layers"])
    ref = json.loads(meta.get("prefix", "null"))
    tensors = dict(arrays)
    if ref:  # inline the shared prefix: the card must not depend on blocks/
        block = cache_dir / "blocks" / f"{ref['hash']}{cachefile.SUFFIX}"
        if not block.exists():
            raise cachefile.CacheFileError(f"{path.name}: shared prefix {ref['hash']} is missing")
        battrs, bmeta = cachefile.read_tensors(block, (cachefile.BLOCK_FORMAT,))
        n = int(ref["tokens"])
        if json.loads(bmeta["tokens"])[:n] != arrays["tokens"][:n].tolist():
            raise cachefile.CacheFileError(f"{block.name}: prefix block does not hold this agent's tokens")
        for i, s in enumerate(spans):
            for part in ("k", "v"):
                for j in range(3):
                    key = f"layers.{i}.{part}.{j}"
                    if key in battrs:
                        head = battrs[key][..., :n, :]
                        tensors[key] = np.concatenate([head, arrays[key]], axis=-2) if key in arrays else np.ascontiguousarray(head)
            s["start"] = 0
    card = {"name": name, "history": _history(cache_dir, name), "exported_at": int(time.time())}
    keep = ("format", "fingerprint", "model", "kv_bits", "kv_keys", "group_size", "block_tokens", "n_tokens", "extra")
    new_meta = {k: meta[k] for k in keep if k in meta}
    new_meta.update(layers=json.dumps(spans), prefix="null", card=json.dumps(card))
    out = Path(out)
    cachefile.write_tensors(out, tensors, new_meta)
    return out


def import_card(cache_dir: Path, card: Path, name: str | None = None, force: bool = False) -> str:
    """Check a card completely, then install it as agent `name` (default: its original name)."""
    cache_dir = Path(cache_dir)
    card = Path(card)
    arrays, meta = cachefile.read_tensors(card)
    try:
        info = json.loads(meta["card"])
        original = info["name"]
    except (KeyError, ValueError, TypeError):
        raise cachefile.CacheFileError(f"{card.name}: not a cache card (no card metadata)") from None
    name = validate_agent_name(name or original)
    path = cache_dir / (name + cachefile.SUFFIX)
    hist_path = cache_dir / f"{name}.json"
    if not force and (path.exists() or hist_path.exists()):
        raise FileExistsError(f"agent '{name}' already exists in {cache_dir} (use --force to replace it, or --name)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != "card"}
    history = dict(info.get("history") or {"messages": [], "system": None})
    history["name"] = name
    with FileLock(lock_path(cache_dir, name), timeout=30):
        cachefile.write_tensors(path, arrays, meta)
        cachefile.atomic_write(hist_path, [json.dumps(history, indent=1).encode()])
    return name


# -- clean up ------------------------------------------------------------------


def installed_fingerprints(home: Path) -> set[str]:
    """Fingerprints of the model folders under `<home>/models` (every cache layout of each)."""
    from .runner import fingerprint

    out = set()
    for cfg in Path(home).glob("models/*/config.json"):
        fp = fingerprint(cfg.parent)
        out.add(fp)
        try:
            if json.loads(cfg.read_text()).get("model_type") == "deepseek_v2":  # runner.py mixes the MLA mode in
                out |= {hashlib.sha256(f"{fp}:mla={m}".encode()).hexdigest()[:32] for m in ("latent", "full")}
        except ValueError:
            pass
    return out


def gc_plan(cache_dir: Path, known_fingerprints: set[str]) -> list[tuple[Path, str]]:
    """Files that can go, with the reason: caches of models not installed (only if
    some model is installed), older formats, damaged files set aside, prefix
    blocks nothing refers to, temporary files of crashed saves. Histories stay."""
    cache_dir = Path(cache_dir)
    plan, used = [], set()
    for p in sorted(cache_dir.glob("*" + cachefile.SUFFIX)):
        meta = _peek(p)
        if meta is None or meta.get("format") != cachefile.FORMAT:
            continue  # not ours, or damaged: it is moved aside when an agent tries to use it
        if meta.get("version") != str(cachefile.VERSION):
            plan.append((p, f"older cache format (version {meta.get('version')})"))
        elif known_fingerprints and meta.get("fingerprint") not in known_fingerprints:
            plan.append((p, f"model not installed ({meta.get('model') or meta.get('fingerprint')})"))
        else:
            try:
                ref = json.loads(meta.get("prefix", "null"))
            except ValueError:
                ref = None
            if isinstance(ref, dict):
                used.add(str(ref.get("hash")))
    for p in sorted((cache_dir / "blocks").glob("*" + cachefile.SUFFIX)):
        if p.stem not in used:
            plan.append((p, "shared prefix block no agent uses"))
    for p in sorted(cache_dir.glob("*" + cachefile.SUFFIX + ".bad-*")):
        plan.append((p, "damaged cache file set aside"))
    for d in (cache_dir, cache_dir / "blocks"):
        for p in sorted(d.glob(".*.tmp*")):
            m = TMP_RE.match(p.name)
            if m and not _alive(int(m.group(1))):
                plan.append((p, "temporary file of an interrupted save"))
    return plan


def gc_apply(cache_dir: Path, plan: list[tuple[Path, str]]) -> int:
    """Delete planned files; prefix blocks last, rechecked under the blocks lock
    (the lock every save that refers to a block holds). Returns bytes freed."""
    blocks = Path(cache_dir) / "blocks"

    def rm(p: Path) -> int:
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0

    freed = sum(rm(p) for p, _ in plan if p.parent != blocks)
    planned = [p for p, _ in plan if p.parent == blocks]
    if planned:
        with FileLock(str(blocks / ".lock"), timeout=30):
            unused = {p for p, _ in gc_plan(cache_dir, set()) if p.parent == blocks}
            freed += sum(rm(p) for p in planned if p in unused)
    return freed
