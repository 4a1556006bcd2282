"""The cache directory as the user sees it: list, inspect, remove, export, import, clean up.

Every read-side view lives here, on top of store/: nothing loads a model or
a cache into memory, so `agentcache agents ...` answers at once and can
manage caches of models that are not installed. An agent archive (what
`agents export` writes, NAME.archive.safetensors; not a cards.py cache card)
is one self-contained agent file (shared prefix blocks inlined, conversation
history in its metadata) that can be imported under another name, on
another machine with the same model.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .store import codec, container, formats, history, index, segments
from .store.container import CacheFileError
from .store.layout import ARCHIVE_SUFFIX, SUFFIX, Layout, validate_agent_name

__all__ = ["ARCHIVE_SUFFIX", "names", "describe", "listing", "remove", "export_archive", "import_archive", "installed_fingerprints", "gc_plan", "gc_apply"]

LOCK_TIMEOUT_S = 30.0


def names(cache_dir: Path) -> list[str]:
    """Agents with a cache file or a history in `cache_dir`."""
    return Layout(cache_dir).names()


def describe(cache_dir: Path, name: str, verify: bool = False) -> dict:
    """One agent as stored: tier (warm: cache file, cold: history only), tokens,
    bytes, shared prefix, model, last use; `verify` also checks every checksum."""
    layout = Layout(cache_dir)
    info, meta = index.describe(layout, name)
    if not verify or meta is None:
        return info
    try:  # every checksum, and the structure (spans, shapes, dtypes, finite scales)
        codec.load(layout.agent_file(name), meta.get("fingerprint", ""))
        if info.get("shared_prefix", {}).get("present"):
            container.read_tensors(layout.block_file(info["shared_prefix"]["hash"]), (codec.BLOCK_FORMAT,))
        info.update(layers=len(json.loads(meta["layers"])), saved_at=index.when(int(meta["saved_at"])), status="ok")
    except (CacheFileError, OSError, KeyError, ValueError, TypeError) as e:
        info.update(tier="invalid", error=str(e))
    return info


def listing(cache_dir: Path) -> list[dict]:
    """Every agent, from the listing index (store/index.py)."""
    return index.listing(cache_dir)


def remove(cache_dir: Path, name: str, history: bool = True, timeout: float = LOCK_TIMEOUT_S) -> list[Path]:
    """Delete an agent's cache file, its segments (and history), under its lock. Returns removed paths."""
    layout = Layout(cache_dir)
    validate_agent_name(name)
    removed = []
    with layout.agent_lock(name, timeout):
        for p in [layout.agent_file(name)] + ([layout.history_file(name)] if history else []) + layout.segment_files(name):
            if p.exists():
                p.unlink()
                removed.append(p)
        segments.collect(layout, name, set())
    return removed


# -- agent archives ------------------------------------------------------------
ARCHIVE_KEY = "archive"  # the metadata entry naming the agent and holding its history
OLD_ARCHIVE_KEY = "card"  # the same entry in archives written before the name "card" was kept for cache cards


def export_archive(cache_dir: Path, name: str, out: Path) -> Path:
    """Write one self-contained, checked file holding the agent's cache and history."""
    layout = Layout(cache_dir)
    path = layout.agent_file(name)
    if not path.exists():
        raise FileNotFoundError(f"agent '{name}' has no cache file in {layout.dir}")
    arrays, meta = container.read_tensors(path, codec.FORMATS)
    if meta["format"] == codec.MANIFEST:
        joined, meta = segments.assemble(path, arrays, meta, meta.get("fingerprint", ""), codec.NAMES)
        arrays = segments.numpy(joined)
    ref = formats.prefix_ref(meta)
    tensors = dict(arrays)
    if ref:  # inline the shared prefix: the archive must not depend on the blocks folder
        block = layout.block_file(ref["hash"])
        if not block.exists():
            raise CacheFileError(f"{path.name}: shared prefix {ref['hash']} is missing")
        battrs, bmeta = container.read_tensors(block, (codec.BLOCK_FORMAT,))
        n = int(ref["tokens"])
        if formats.block_tokens(bmeta)[:n] != arrays["tokens"][:n].tolist():
            raise CacheFileError(f"{block.name}: prefix block does not hold this agent's tokens")
        tensors, meta = codec.inline_prefix(arrays, meta, battrs, n)
    about = {"name": name, "history": history.read(layout.history_file(name)), "exported_at": int(time.time())}
    new_meta = {k: meta[k] for k in codec.ARCHIVE_KEYS if k in meta}
    new_meta.update(format=codec.FORMAT, layers=meta["layers"], prefix="null")
    new_meta[ARCHIVE_KEY] = json.dumps(about)
    out = Path(out)
    container.write_tensors(out, tensors, new_meta)
    return out


def import_archive(cache_dir: Path, archive: Path, name: str | None = None, force: bool = False, model: tuple[str, list] | None = None) -> str:
    """Check an archive completely, then install it as agent `name` (default: its original name).

    Every checksum, the history and the cache's structure (spans, shapes,
    dtypes, finite scales) are checked before anything is written; with
    `model` = (fingerprint, a new cache's layers) the archive must also be that
    model's, in that KV mode, with the shapes each of its layers stores."""
    layout = Layout(cache_dir)
    archive = Path(archive)
    arrays, meta = container.read_tensors(archive, codec.FORMATS)
    fingerprint, expect = model if model is not None else (meta.get("fingerprint", ""), None)
    codec.load(archive, fingerprint, expect)
    key = ARCHIVE_KEY if ARCHIVE_KEY in meta else OLD_ARCHIVE_KEY
    try:
        info = json.loads(meta[key])
        original = info["name"]
    except (KeyError, ValueError, TypeError, RecursionError):
        raise CacheFileError(f"{archive.name}: not an agent archive (no archive metadata)") from None
    if not isinstance(info, dict) or not isinstance(original, str):
        raise CacheFileError(f"{archive.name}: not an agent archive (malformed archive metadata)")
    try:
        saved = info.get("history")
        saved_history = history.check({"messages": [], "system": None} if saved is None else saved, f"{archive.name}: history")
    except history.HistoryError as e:
        raise CacheFileError(str(e)) from None
    name = validate_agent_name(original if name is None else name)
    path, hist_path = layout.agent_file(name), layout.history_file(name)
    if not force and (path.exists() or hist_path.exists()):
        raise FileExistsError(f"agent '{name}' already exists in {layout.dir} (use --force to replace it, or --name)")
    layout.dir.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != key}
    meta["foreign_from"] = "0"  # uploaded tensors: never made into a shared prefix block (prefixes.py)
    hist = {"name": name, "system": saved_history["system"], "messages": saved_history["messages"]}
    if saved_history.get("context") is not None:  # tokens handed over by cache cards (cards.py)
        hist["context"] = saved_history["context"]
    with layout.agent_lock(name, LOCK_TIMEOUT_S):
        container.write_tensors(path, arrays, meta)
        try:
            history.write_dict(hist_path, hist)
        except OSError:  # no cache without its history: the agent would continue another conversation
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            raise
    return name


# -- clean up ------------------------------------------------------------------


def installed_fingerprints(home: Path) -> set[str]:
    """Fingerprints of the model folders under `<home>/models` (every cache layout of each)."""
    from .models.model_store import installed_models
    from .models.runner import fingerprint

    out = set()
    for folder in installed_models(Path(home)):
        fp = fingerprint(folder)
        out.add(fp)
        try:
            if json.loads((folder / "config.json").read_text()).get("model_type") == "deepseek_v2":  # the runner mixes the MLA mode in
                out |= {hashlib.sha256(f"{fp}:mla={m}".encode()).hexdigest()[:32] for m in ("latent", "full")}
        except ValueError:
            pass
    return out


def gc_plan(cache_dir: Path, known_fingerprints: set[str]) -> list[tuple[Path, str]]:
    """Files that can go, with the reason: caches of models not installed (only if
    some model is installed), older formats, damaged files set aside, prefix
    blocks nothing refers to, temporary files of crashed saves. Histories stay."""
    layout = Layout(cache_dir)
    plan, used, named = [], set(), {}
    for p in layout.agent_files():
        meta = container.peek_meta(p)
        named[p.name[: -len(SUFFIX)]] = segments.referenced(meta or {})
        if meta is None or meta.get("format") not in codec.FORMATS:
            continue  # not ours, or damaged: it is moved aside when an agent tries to use it
        if meta.get("version") != str(container.VERSION):
            plan.append((p, f"older cache format (version {meta.get('version')})"))
        elif known_fingerprints and meta.get("fingerprint") not in known_fingerprints:
            plan.append((p, f"model not installed ({meta.get('model') or meta.get('fingerprint')})"))
        elif (damage := _header_damage(p)) is not None:
            plan.append((p, f"damaged cache file ({damage})"))
        else:
            ref = formats.prefix_ref(meta)
            if ref:
                used.add(str(ref.get("hash")))
    for p in layout.block_files():
        if layout.block_key(p) not in used:
            plan.append((p, "shared prefix block no agent uses"))
    for name in layout.segment_owners():
        for p in segments.unreferenced(layout, name, named.get(name, set())):
            plan.append((p, "segment no manifest names"))
    for p in layout.set_aside_files():
        plan.append((p, "damaged cache file set aside"))
    for p in layout.stale_tmp_files():
        plan.append((p, "temporary file of an interrupted save"))
    return plan


def _header_damage(path: Path) -> str | None:
    """Why the file's header fails its checks (numbers.py, checksums), or None."""
    try:
        container.read_header(path, codec.FORMATS)
    except CacheFileError as e:
        return str(e).split(": ", 1)[-1]
    return None


def gc_apply(cache_dir: Path, plan: list[tuple[Path, str]]) -> int:
    """Delete planned files; prefix blocks last, rechecked under the blocks lock
    (the lock every save that refers to a block holds). Returns bytes freed."""
    layout = Layout(cache_dir)

    def rm(p: Path) -> int:
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0

    freed = sum(rm(p) for p, _ in plan if not layout.is_block_file(p) and not layout.is_segment_file(p))
    owners = sorted({p.parent.name for p, _ in plan if layout.is_segment_file(p)})
    for name in owners:  # rechecked under the agent's lock: a save may have named a new segment meanwhile
        with layout.agent_lock(name, LOCK_TIMEOUT_S):
            keep = segments.referenced(container.peek_meta(layout.agent_file(name)) or {}) if layout.agent_file(name).exists() else set()
            gone = {p for p in segments.unreferenced(layout, name, keep)}
            freed += sum(rm(p) for p, _ in plan if p in gone)
    planned = [p for p, _ in plan if layout.is_block_file(p)]
    if planned:
        with layout.blocks_lock(LOCK_TIMEOUT_S):
            unused = {p for p, _ in gc_plan(cache_dir, set()) if layout.is_block_file(p)}
            freed += sum(rm(p) for p in planned if p in unused)
    return freed
