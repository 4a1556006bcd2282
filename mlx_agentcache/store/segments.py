"""An agent's cache as immutable segments and a manifest: a save writes what changed.

`<agent>.safetensors` is the manifest (`MANIFEST_FORMAT`, a checked container
like every other file): the token ids, the model fingerprint, the KV mode,
each layer's span, the shared prefix the agent starts with, and, per layer,
the pieces that hold its stored tokens in order. A piece is
[segment, run, encoding, run start, from, to]: tokens [from, to) of run `run`
of that segment, which starts at `run start`. Segments
(`<cache_dir>/segments/<agent>/<id>.safetensors`, `SEGMENT_FORMAT`) are never
changed once written.

A save (`save`) writes one new segment holding each layer's tokens from the
first position that changed since the manifest on disk was written
(`LayerCache.take_changed`, gathered by the pool), then a new manifest
(atomic rename) whose pieces of older segments end there, then deletes the
segments no manifest names any more and counts their bytes. Segments are kept
in sizes that grow towards the front: a new segment absorbs the newest ones
that are no larger than itself (a binary counter), so an agent has
O(log tokens) segments and each token is rewritten O(log) times, not once per
turn. A crash at any point leaves the old manifest and the segments it names,
or the new one: segments are written (and fsynced) before the manifest that
names them, and deleted only after it.

`assemble` turns a manifest and its segments back into the tensors and spans
of one self-contained file (codec.py's form), so the checks of codec.load
apply unchanged: each joined run is allocated once and every segment's bytes
are read, in file order, straight into the rows they belong to (no second
copy). The tensor names are codec's, handed in as `names`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np

from ..q4_format import KEY_GROUP
from . import container, formats
from .container import CacheFileError, CacheWriteError, peek_meta, read_header
from .layout import Layout

MANIFEST_FORMAT, SEGMENT_FORMAT = formats.MANIFEST, formats.SEGMENT
ID_RE = re.compile(r"\A[0-9a-f]{16}\Z")

# (layer, "k"|"v", part, run) -> tensor name, and (layer, "k"|"v") -> sinks name: codec's spelling
Names = tuple[Callable[[int, str, int, int], str], Callable[[int, str], str]]


def new_id() -> str:
    return secrets.token_hex(8)


def _cut(x, a: int, b: int, n: int):
    """Tokens [a, b) of a stored part of a run of `n` tokens (rows may be groups of tokens)."""
    per = n // max(x.shape[-2], 1)
    return x[..., a // per : -(-b // per), :]


def _runs(tensors: dict, spans: list[dict], body: str, names: Names) -> list[list[tuple[str, int, int, dict]]]:
    """Per layer: (encoding, first, end, {(part, j): array}) of each stored run, from codec's form."""
    name, _ = names
    out = []
    for i, s in enumerate(spans):
        runs = s.get("runs")
        if runs is None:
            runs = [[body, s["offset"] - s["start"]]] if name(i, "k", 0, 0) in tensors else []
        layer, pos = [], s["start"]
        for r, (enc, n) in enumerate(runs):
            parts = {(p, j): tensors[name(i, p, j, r)] for p in "kv" for j in range(3) if name(i, p, j, r) in tensors}
            layer.append((enc, pos, pos + int(n), parts))
            pos += int(n)
        out.append(layer)
    return out


def _old_manifest(path: Path, base: str | None, meta: dict) -> dict | None:
    """The manifest on disk when it is the one this save continues (same generation, model,
    mode and prefix); None: write everything."""
    if base is None:
        return None
    try:
        _, old, _ = read_header(path, (MANIFEST_FORMAT,))
    except CacheFileError:
        return None
    same = all(old.get(k) == meta.get(k) for k in ("fingerprint", "kv_mode", "prefix")) and old.get("gen") == base
    return old if same else None


def save(layout: Layout, agent: str, tensors: dict, meta: dict, changed: list[int] | None, base: str | None, body: str,
         names: Names) -> tuple[int, int, str]:
    """Write the snapshot `(tensors, meta)` (codec.snapshot's form) as a new segment and
    manifest; the caller holds the agent's lock. `changed`: per layer, the first position
    changed since generation `base` was written (None, or a manifest of another
    generation on disk: everything is written). Returns (bytes written, bytes of
    segments deleted, the new generation)."""
    name, sinks_name = names
    path = layout.agent_file(agent)
    spans = json.loads(meta["layers"])
    runs = _runs(tensors, spans, body, names)
    old = _old_manifest(path, base, meta)
    old_pieces = json.loads(old["pieces"]) if old else None
    old_segs = json.loads(old["segments"]) if old else []
    old_sinks = json.loads(old["sinks"]) if old else None
    old_spans = json.loads(old["layers"]) if old else None
    if old and len(old_pieces) != len(spans):
        old = None
    # per layer: where the new segment starts
    cut = []
    for i, s in enumerate(spans):
        c = s["start"]
        if old and old_spans[i]["start"] == s["start"] and s["window"] is None and changed is not None:
            c = max(s["start"], min(changed[i], old_spans[i]["offset"], s["offset"]))
            inside = [(e, a, b) for e, a, b, _ in runs[i]] + [(e, a, b) for _, _, e, _, a, b in old_pieces[i]]
            c -= c % KEY_GROUP if any(e == "q4c" and a < c < b for e, a, b in inside) else 0
        cut.append(c)

    def kept(i: int) -> list:
        return [[g, r, e, ra, a, min(b, cut[i])] for g, r, e, ra, a, b in (old_pieces[i] if old else []) if a < cut[i]]

    # absorb the newest kept segments no larger than what is written now (a binary counter)
    while old:
        pieces = [kept(i) for i in range(len(spans))]
        used = sorted({p[0] for ps in pieces for p in ps})
        if not used:
            break
        last = used[-1]
        size = max(sum(p[5] - p[4] for p in ps if p[0] == last) for ps in pieces)
        new = max(s["offset"] - c for s, c in zip(spans, cut))
        if size > new:
            break
        for i, ps in enumerate(pieces):
            firsts = [p[4] for p in ps if p[0] == last]
            if firsts:
                cut[i] = min(firsts)
    pieces = [kept(i) for i in range(len(spans))]
    # the new segment: every layer's runs from its cut on, and sinks that changed
    seg_id = new_id()
    seg_tensors, seg_runs, seg_sinks, sinks_ref = {}, [], [], []
    for i, s in enumerate(spans):
        layer_runs = []
        for enc, a, b, parts in runs[i]:
            if b <= cut[i]:
                continue
            a0 = max(a, cut[i])
            r = len(layer_runs)
            for (p, j), x in parts.items():
                seg_tensors[name(i, p, j, r)] = _cut(x, a0 - a, b - a, b - a)
            layer_runs.append([enc, a0, b])
            pieces[i].append([None, r, enc, a0, a0, b])
        seg_runs.append(layer_runs)
        n_sinks = s.get("sinks")
        keep_old = n_sinks and old and old_sinks[i] is not None and cut[i] >= n_sinks
        if n_sinks and not keep_old:
            for p in "kv":
                seg_tensors[sinks_name(i, p)] = tensors[sinks_name(i, p)]
        seg_sinks.append(n_sinks if n_sinks and not keep_old else None)
        sinks_ref.append(old_segs[old_sinks[i]] if keep_old else (None if not n_sinks else seg_id))
    still = {p[0] for ps in pieces for p in ps if p[0] is not None} | {old_segs.index(g) for g in sinks_ref if g not in (None, seg_id)}
    segs = [old_segs[g] for g in sorted(still)]
    written = 0
    if seg_tensors:
        segs.append(seg_id)
        seg_meta = {"format": SEGMENT_FORMAT, "fingerprint": meta["fingerprint"], "kv_mode": meta["kv_mode"], "id": seg_id,
                    "runs": json.dumps(seg_runs), "sinks": json.dumps(seg_sinks)}
        try:
            layout.segments_dir(agent).mkdir(parents=True, exist_ok=True)
            for p in layout.stale_segment_tmp(agent):  # the pool's start leaves them to the agent's next save
                p.unlink(missing_ok=True)
            written += container.write_tensors(layout.segment_file(agent, seg_id), seg_tensors, seg_meta)
        except OSError as e:  # named after the agent's file, as every save error is
            raise CacheWriteError(e.errno, f"could not save {path.name}: {os.strerror(e.errno) if e.errno else e}") from e
    index = {g: k for k, g in enumerate(segs)}
    pieces = [[[index[seg_id if g is None else old_segs[g]], r, e, ra, a, b] for g, r, e, ra, a, b in ps] for ps in pieces]
    sizes = {g: _size(layout.segment_file(agent, g)) for g in segs}
    man = {**meta, "format": MANIFEST_FORMAT, "gen": seg_id, "segments": json.dumps(segs), "pieces": json.dumps(pieces),
           "sinks": json.dumps([None if g is None else index[g] for g in sinks_ref]), "stored_bytes": str(sum(sizes.values()))}
    written += container.write_tensors(path, {"tokens": tensors["tokens"]}, man)
    return written, collect(layout, agent, set(segs)), seg_id


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def disk_bytes(path: Path) -> int:
    """Bytes an agent's cache takes on disk: its file and, for a manifest, the segments it names."""
    return Path(path).stat().st_size + formats.stored_bytes(peek_meta(path) or {})


def referenced(meta: dict) -> set[str]:
    """Segment ids a manifest names (empty for other formats)."""
    if meta.get("format") != MANIFEST_FORMAT:
        return set()
    try:
        return {str(g) for g in json.loads(meta["segments"])}
    except (KeyError, ValueError, TypeError):
        return set()


def unreferenced(layout: Layout, agent: str, keep: set[str]) -> list[Path]:
    """The agent's segment files that `keep` does not name (not temporary files of saves)."""
    return [p for p in layout.segment_files(agent) if layout.segment_id(p) not in keep]


def collect(layout: Layout, agent: str, keep: set[str]) -> int:
    """Delete the agent's segments not in `keep` (caller holds the agent's lock); bytes freed."""
    freed = 0
    for p in unreferenced(layout, agent, keep):
        try:
            size = p.stat().st_size
            p.unlink()
            freed += size
        except FileNotFoundError:
            pass
    if not keep:
        try:
            layout.segments_dir(agent).rmdir()
        except OSError:
            pass
    return freed


def assemble(path: Path, arrays: dict, meta: dict, fingerprint: str, names: Names) -> tuple[dict, dict]:
    """A manifest's segments read, checked and joined: (tensors, metadata) in the form of one
    self-contained file, for codec.load. Raises CacheFileError naming the file at fault.

    Every segment's header is checked first; then each joined run is allocated once and
    every segment's bytes are read, in file order, straight into the rows they belong to
    (rows no piece uses into scratch, so that each tensor's checksum still covers all of it)."""
    path = Path(path)
    layout = Layout(path.parent)
    agent = layout.agent_of(path)
    try:
        segs = [str(g) for g in json.loads(meta["segments"])]
        pieces = json.loads(meta["pieces"])
        sinks = json.loads(meta["sinks"])
        spans = json.loads(meta["layers"])
        if any(not ID_RE.fullmatch(g) for g in segs) or len(pieces) != len(spans) or len(sinks) != len(spans):
            raise ValueError("segment list does not match the layers")
    except (KeyError, ValueError, TypeError) as e:
        raise CacheFileError(f"{path.name}: malformed manifest ({e})") from None
    with ExitStack() as stack, container.ReadThreads() as threads:
        opened = []
        for g in segs:
            seg = layout.segment_file(agent, g)

            def same(m: dict, seg=seg, g=g) -> None:
                if m.get("fingerprint") != fingerprint or m.get("kv_mode") != meta.get("kv_mode") or m.get("id") != g:
                    raise CacheFileError(f"{seg.name}: segment of another agent, model or KV mode")

            if not seg.exists():
                raise CacheFileError(f"{path.name}: segment {seg.relative_to(layout.dir)} is missing")
            opened.append(stack.enter_context(container.open_checked(seg, (SEGMENT_FORMAT,), same)))
        try:
            shapes, dests = _plan([(r.header, json.loads(r.meta["runs"]), json.loads(r.meta["sinks"])) for r in opened],
                                  pieces, sinks, spans, names)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CacheFileError(f"{path.name}: segments do not fit the manifest ({e})") from None
        out = container.Arrays(shapes, [d[0] for k, r in enumerate(opened) for t, _ in r.entries() for d in dests[k].get(t, ())])
        jobs = [r.scatter(lambda t, e, k=k: _buffers(dests[k].get(t), e, out.bytes), threads) for k, r in enumerate(opened)]
        for r, j in zip(opened, jobs):
            r.verify(j)
    return {"tokens": arrays["tokens"], **out.all()}, {**meta, "layers": json.dumps(spans)}


Dest = tuple[str, int, int, int, int]  # (joined tensor, first source row, end row, first row there, its rows)


def _plan(segs: list[tuple[dict, list, list]], pieces: list, sinks: list, spans: list[dict], names: Names):
    """Where every stored row goes. `segs`: per segment (tensor table, runs, sinks). Returns
    ({joined tensor: (shape, dtype)}, per segment {its tensor: [Dest, ...] in row order}).
    Rewrites `spans` to codec's form (runs and sinks as joined). Raises ValueError (or
    KeyError, TypeError, IndexError) where pieces do not follow on or do not match."""
    name, sinks_name = names
    shapes: dict[str, tuple[list, str]] = {}
    dests: list[dict[str, list[Dest]]] = [{} for _ in segs]
    for i, s in enumerate(spans):
        merged, pos = [], s["start"]  # merged: [encoding, tokens, {(part, j): [(segment, tensor, r0, r1), ...]}]
        for g, r, enc, ra, a, b in pieces[i]:
            header, runs, _ = segs[g]
            e, rs, re_ = runs[i][r]
            if e != enc or rs != ra or a != pos or not ra <= a < b <= re_:
                raise ValueError(f"piece [{a}, {b}) of layer {i} does not follow on or is not in its segment")
            part = {}
            for p in "kv":
                for j in range(3):
                    t = name(i, p, j, r)
                    if t in header:
                        rows = _rows(header[t])
                        per = (re_ - ra) // rows if rows else 0
                        if not per or per * rows != re_ - ra:
                            raise ValueError(f"{t} has {rows} rows for {re_ - ra} tokens")
                        part[(p, j)] = [(g, t, (a - ra) // per, -(-(b - ra) // per))]
            if merged and merged[-1][0] == enc:
                if set(part) != set(merged[-1][2]):
                    raise ValueError(f"pieces of layer {i} hold different parts")
                merged[-1][1] += b - a
                for k, x in part.items():
                    merged[-1][2][k] += x
            else:
                merged.append([enc, b - a, part])
            pos = b
        if pos != s["offset"]:
            raise ValueError(f"layer {i} pieces end at {pos}, its span at {s['offset']}")
        for r, (_, _, part) in enumerate(merged):
            for (p, j), srcs in part.items():
                joined, first = name(i, p, j, r), segs[srcs[0][0]][0][srcs[0][1]]
                total, at = sum(r1 - r0 for _, _, r0, r1 in srcs), 0
                for g, t, r0, r1 in srcs:
                    e = segs[g][0][t]
                    if e["dtype"] != first["dtype"] or e["shape"][:-2] != first["shape"][:-2] or e["shape"][-1] != first["shape"][-1]:
                        raise ValueError(f"{t} does not match the other pieces of its run")
                    dests[g].setdefault(t, []).append((joined, r0, r1, at, total))
                    at += r1 - r0
                shapes[joined] = (first["shape"][:-2] + [total, first["shape"][-1]], container.dtype_name(first))
        if "runs" in s or len(merged) > 1:  # codec's form: runs are listed for q4c layers only
            s["runs"] = [[e, n] for e, n, _ in merged]
        s.pop("sinks", None)
        if sinks[i] is not None:
            header, _, seg_sinks = segs[sinks[i]]
            s["sinks"] = seg_sinks[i]
            for p in "kv":
                t = sinks_name(i, p)
                shapes[t] = (header[t]["shape"], container.dtype_name(header[t]))
                dests[sinks[i]][t] = [(t, 0, _rows(header[t]), 0, _rows(header[t]))]
    for d in dests:
        for t, ds in d.items():
            ds.sort(key=lambda x: x[1])
            if any(x[2] > y[1] for x, y in zip(ds, ds[1:])):
                raise ValueError(f"pieces overlap in {t}")
    return shapes, dests


def _rows(entry: dict) -> int:
    """Rows (tokens, or token groups) of a stored tensor: its second-last dimension."""
    if len(entry["shape"]) < 2:
        raise ValueError("a stored tensor has fewer than 2 dimensions")
    return entry["shape"][-2]


def _buffers(dests: list[Dest] | None, entry: dict, view: Callable[[str], np.ndarray]) -> list:
    """A segment tensor's bytes as buffers in file order: the rows of each destination,
    scratch for rows no piece uses."""
    nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
    if not dests:
        return [np.empty(nbytes, np.uint8)]
    rows = _rows(entry)
    outer = math.prod(entry["shape"][:-2])
    row = nbytes // max(outer * rows, 1)
    if len(dests) == 1 and dests[0][1:] == (0, rows, 0, rows):  # the whole tensor is the whole joined one
        return [view(dests[0][0])]
    scratch = np.empty(nbytes - sum(r1 - r0 for _, r0, r1, _, _ in dests) * outer * row, np.uint8)
    out, used = [], 0

    def skip(n: int) -> None:
        nonlocal used
        if n:
            out.append(scratch[used : used + n])
            used += n

    for h in range(outer):
        at = 0
        for joined, r0, r1, first, total in dests:
            skip((r0 - at) * row)
            v = view(joined)
            out.append(v[(h * total + first) * row : (h * total + first + r1 - r0) * row])
            at = r1
        skip((rows - at) * row)
    return out


def numpy(tensors: dict) -> dict[str, np.ndarray]:
    """MLX arrays as numpy (a card is written from them)."""
    return {k: np.array(v) for k, v in tensors.items()}

