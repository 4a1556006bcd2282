"""Cache files: safetensors with a checked header, written atomically.

Layout: the standard safetensors container (8-byte little-endian header
length, JSON header, raw tensor bytes), so any safetensors reader can open
it. Two kinds share the container:

* agent files (`FORMAT`): `tokens` (int32) and, per layer `i`,
  `layers.i.k.j` / `layers.i.v.j` (j = 0 packed codes, 1 fp16 scales,
  2 fp16 biases; one fp16 tensor for 16-bit caches). When the agent uses a
  shared prefix, `prefix` in the metadata names it and the layer tensors hold
  only the tokens after it.
* prefix block files (`BLOCK_FORMAT`, see prefixes.py): the same tensors for
  a run of full 256-token blocks that several agents start with.

`__metadata__` holds the format and version, the model fingerprint, the
quantization parameters, each layer's span, a CRC32 per tensor, a CRC32 of
the tensor table and a CRC32 of the metadata itself: every byte the reader
uses is covered. A file is used only after every check passed; anything
else raises `CacheFileError` with a one-line reason.

Writes go to a temporary file in the same directory, are fsynced, renamed
over the old file, and the directory is fsynced: a crash at any point leaves
either the old or the new file. Reads open the file once and memory-map it,
so a concurrent rename never mixes two versions.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np

from .kvcache import AgentCache, LayerCache, Segment
from .q4 import BLOCK_TOKENS, GROUP_SIZE

FORMAT = "agentcache-kv"
BLOCK_FORMAT = "agentcache-prefix"
VERSION = 2
MAX_HEADER_BYTES = 64 << 20
SUFFIX = ".safetensors"

_DTYPES = {"U32": np.uint32, "F16": np.float16, "I32": np.int32, "F32": np.float32, "U8": np.uint8}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CacheFileError(Exception):
    """A cache file that must not be used; the message says why."""


class CacheWriteError(OSError):
    """A save that did not happen; the previous file is untouched."""


def _crc(buf) -> int:
    return zlib.crc32(memoryview(buf).cast("B")) & 0xFFFFFFFF


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary file a save writes first; the pid lets a later run remove leftovers."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Write chunks to `path` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = tmp_name(path)
    written = 0
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
                written += len(c) if isinstance(c, bytes) else c.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CacheWriteError(e.errno, f"could not save {path.name}: {e.strerror or e}") from e
        raise
    return written


# -- container ---------------------------------------------------------------


def _meta_crc(meta: dict) -> int:
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_crc32"}, sort_keys=True).encode()
    return zlib.crc32(body) & 0xFFFFFFFF


def _table_crc(entries: dict) -> int:
    return zlib.crc32(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def write_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """Checksum `tensors`, build the header and write atomically; returns bytes written."""
    entries, offset = {}, 0
    for name, arr in tensors.items():
        entries[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    arrays = [np.ascontiguousarray(a) for a in tensors.values()]
    meta = {
        **meta,
        "version": str(VERSION),
        "crc32": json.dumps({n: _crc(a) for n, a in zip(tensors, arrays)}),
        "table_crc32": str(_table_crc(entries)),
        "saved_at": str(int(time.time())),
    }
    meta["meta_crc32"] = str(_meta_crc(meta))
    raw = json.dumps({**entries, "__metadata__": meta}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunks = [struct.pack("<Q", len(raw)), raw] + [memoryview(a).cast("B") for a in arrays if a.nbytes]
    return atomic_write(path, chunks)


def _parse_header(buf, name: str, size: int) -> tuple[dict, dict, int]:
    if size < 8:
        raise CacheFileError(f"{name}: truncated ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > MAX_HEADER_BYTES:
        raise CacheFileError(f"{name}: header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if n > size - 8:
        raise CacheFileError(f"{name}: truncated (header needs {n} bytes, file has {size - 8} after the length)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors
        raise CacheFileError(f"{name}: header is not valid JSON ({e.__class__.__name__})") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CacheFileError(f"{name}: not an agent cache (no string metadata)")
    return header, meta, 8 + n


def _check_header(header: dict, meta: dict, name: str, size: int, data_start: int, formats: tuple[str, ...]) -> None:
    if meta.get("format") not in formats:
        raise CacheFileError(f"{name}: not an agent cache file (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CacheFileError(f"{name}: format version {meta.get('version')} is not supported (expected {VERSION}); remove it with `agentcache agents gc`")
    if meta.get("meta_crc32") != str(_meta_crc(meta)):
        raise CacheFileError(f"{name}: metadata checksum mismatch")
    if meta.get("table_crc32") != str(_table_crc(header)):
        raise CacheFileError(f"{name}: tensor table checksum mismatch")
    end = 0
    try:
        for tname, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dt = np.dtype(_DTYPES[e["dtype"]])
            shape = [int(s) for s in e["shape"]]
            a, b = (int(x) for x in e["data_offsets"])
            if a != end or min(shape, default=0) < 0 or b - a != dt.itemsize * math.prod(shape):
                raise CacheFileError(f"{name}: tensor {tname!r} has inconsistent offsets")
            end = b
    except (KeyError, TypeError, ValueError, IndexError):
        raise CacheFileError(f"{name}: malformed tensor table") from None
    if data_start + end != size:
        raise CacheFileError(f"{name}: truncated or padded ({size} bytes, header describes {data_start + end})")


def read_header(path: Path, formats: tuple[str, ...] = (FORMAT, BLOCK_FORMAT)) -> tuple[dict, dict, int]:
    """Parse and check the container: (tensor entries, metadata, data start). Reads the header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            buf = head + f.read(min(n, MAX_HEADER_BYTES, max(size - 8, 0)))
    except OSError as e:
        raise CacheFileError(f"{path.name}: cannot read ({e.strerror or e})") from None
    header, meta, data_start = _parse_header(buf, path.name, size)
    _check_header(header, meta, path.name, size, data_start, formats)
    return header, meta, data_start


def read_tensors(path: Path, formats: tuple[str, ...] = (FORMAT,), check: Callable[[dict], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map a file and verify it: ({name: read-only view}, metadata).

    `check(meta)` runs before any tensor byte is read (e.g. the model
    fingerprint), so a file for another model costs only its header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise CacheFileError(f"{path.name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    header, meta, data_start = _parse_header(memoryview(mm), path.name, size)
    _check_header(header, meta, path.name, size, data_start, formats)
    if check is not None:
        check(meta)
    crcs = _crcs(path, header, meta)
    out = {}
    for tname, e in header.items():
        a, b = e["data_offsets"]
        raw = np.frombuffer(mm, dtype=np.uint8, count=b - a, offset=data_start + a)
        if _crc(raw) != crcs[tname]:
            raise CacheFileError(f"{path.name}: checksum mismatch in {tname}")
        out[tname] = raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
    return out, meta


_MX_DTYPES = {"U32": mx.uint32, "F16": mx.float16, "I32": mx.int32, "F32": mx.float32, "U8": mx.uint8}
_empty = getattr(mx, "empty", mx.zeros)


def read_arrays(path: Path, formats: tuple[str, ...] = (FORMAT,), check: Callable[[dict], None] | None = None) -> tuple[dict[str, mx.array], dict]:
    """Read a file straight into MLX memory and verify it: ({name: array}, metadata).

    Every tensor is read with `readinto` into a freshly allocated MLX buffer
    and checksummed there: its bytes are copied once, from the kernel into
    the array, and nothing is used before every check passed. The file is
    opened once, so a concurrent atomic replace cannot mix two versions.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            buf = head + f.read(min(n, MAX_HEADER_BYTES, max(size - 8, 0)))
            header, meta, data_start = _parse_header(buf, path.name, size)
            _check_header(header, meta, path.name, size, data_start, formats)
            if check is not None:
                check(meta)
            crcs = _crcs(path, header, meta)
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            arrays = {name: _empty(tuple(e["shape"]), _MX_DTYPES[e["dtype"]]) for name, e in entries}
            mx.eval(list(arrays.values()))
            with ThreadPoolExecutor(1) as checker:  # checksums overlap the next reads (both release the GIL)
                sums = []
                for name, e in entries:
                    a, b = e["data_offsets"]
                    if b == a:
                        continue
                    view = np.array(arrays[name], copy=False).reshape(-1).view(np.uint8)
                    f.seek(data_start + a)
                    got = 0
                    while got < b - a:
                        k = f.readinto(view[got:])
                        if not k:
                            raise CacheFileError(f"{path.name}: truncated while reading {name}")
                        got += k
                    sums.append((name, checker.submit(_crc, view)))
                for name, crc in sums:
                    if crc.result() != crcs[name]:
                        raise CacheFileError(f"{path.name}: checksum mismatch in {name}")
    except OSError as e:
        raise CacheFileError(f"{path.name}: cannot read ({e.strerror or e})") from None
    return arrays, meta


def _crcs(path: Path, header: dict, meta: dict) -> dict:
    try:
        crcs = json.loads(meta["crc32"])
        if not isinstance(crcs, dict) or set(crcs) != set(header):
            raise ValueError
    except (KeyError, ValueError):
        raise CacheFileError(f"{path.name}: checksum list does not match the tensors") from None
    return crcs


# -- agent caches ------------------------------------------------------------


def stored_views(layer: LayerCache, first: int) -> tuple[tuple, tuple | None]:
    """Stored tokens [first, offset) of a layer; no copy when one segment holds them."""
    parts, pos = [], layer.start
    for s in layer.segments:
        k, v = s.view()
        if pos + s.length > first:
            cut = max(first - pos, 0)
            parts.append((tuple(x[..., cut:, :] for x in k), None if v is None else tuple(x[..., cut:, :] for x in v)))
        pos += s.length
    if len(parts) == 1:
        return parts[0]
    k = tuple(mx.concatenate(xs, axis=-2) for xs in zip(*(p[0] for p in parts)))
    v = None if parts[0][1] is None else tuple(mx.concatenate(xs, axis=-2) for xs in zip(*(p[1] for p in parts)))
    return k, v


def layer_tensors(layers: list[LayerCache], first: Callable[[LayerCache], int]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Per-layer tensors from position `first(layer)` on, as numpy views of MLX memory."""
    out, spans, arrays = {}, [], []
    for i, layer in enumerate(layers):
        a = first(layer)
        k, v = stored_views(layer, a) if layer.offset > a else ((), None)
        has_v = v is not None or any(s.values is not None for s in layer.segments)
        spans.append({"start": a, "offset": layer.offset, "window": layer.window, "values": has_v})
        for part, xs in (("k", k), ("v", v or ())):
            for j, x in enumerate(xs):
                arrays.append(x)
                out[f"layers.{i}.{part}.{j}"] = x
    mx.eval(arrays)
    return {n: np.array(x, copy=False) for n, x in out.items()}, spans


def snapshot(cache: AgentCache, fingerprint: str, prefix: tuple[str, int] | None = None, extra: dict | None = None, model: str | None = None) -> tuple[dict, dict]:
    """Everything a save needs, taken now: (tensors, metadata).

    The tensors are views of the cache's current MLX buffers; MLX arrays are
    never changed in place below a segment's length, so a writer thread can
    checksum and write them while the agent goes on decoding.
    """
    n_prefix = prefix[1] if prefix else 0

    def first(layer: LayerCache) -> int:
        return n_prefix if prefix else layer.persisted_span()[0]

    tensors, spans = layer_tensors(cache.layers, first)
    tensors = {"tokens": np.asarray(cache.tokens, dtype=np.int32), **tensors}
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "model": model or "",
        "kv_bits": str(cache.layers[0].bits),
        "group_size": str(GROUP_SIZE),
        "block_tokens": str(BLOCK_TOKENS),
        "n_tokens": str(len(cache.tokens)),
        "layers": json.dumps(spans),
        "prefix": json.dumps({"hash": prefix[0], "tokens": n_prefix} if prefix else None),
        "extra": json.dumps(extra or {}),
    }
    if cache.layers[0].rotate_keys:  # q4k: keys are stored Hadamard-rotated (kvcache.rotate)
        meta["kv_keys"] = "hadamard"
    return tensors, meta


def save(path: Path, cache: AgentCache, fingerprint: str, extra: dict | None = None, prefix: tuple[str, int] | None = None, model: str | None = None) -> int:
    """Write `cache` to `path` atomically; returns bytes written.

    `prefix` = (hash, tokens): the first `tokens` positions live in that
    shared prefix block file and are not written here.
    """
    return write_tensors(path, *snapshot(cache, fingerprint, prefix, extra, model))


PrefixSource = Callable[[str, int, list[int]], list[Segment]]


def load(path: Path, fingerprint: str, expect_layers: list[LayerCache] | None = None, prefix_source: PrefixSource | None = None) -> tuple[AgentCache, dict]:
    """Read, verify and rebuild an AgentCache. Raises CacheFileError on any doubt.

    `prefix_source(hash, n, tokens)` returns one shared segment per layer for
    a file that refers to a prefix block (see prefixes.py).
    """
    path = Path(path)

    def same_model(meta: dict) -> None:
        if meta.get("fingerprint") != fingerprint:
            raise CacheFileError(f"{path.name}: cache was made by another model (fingerprint {meta.get('fingerprint')}, this model {fingerprint})")

    arrays, meta = read_arrays(path, (FORMAT,), same_model)
    try:
        spans = json.loads(meta["layers"])
        bits = int(meta["kv_bits"])
        extra = json.loads(meta.get("extra", "{}"))
        prefix = json.loads(meta.get("prefix", "null"))
        tokens = arrays.pop("tokens")
        if tokens.ndim != 1 or tokens.dtype != mx.int32:
            raise ValueError("token ids must be one int32 vector")
        tokens = tokens.tolist()
        rotated = {"plain": False, "hadamard": True}[meta.get("kv_keys", "plain")]
        if bits not in (4, 8, 16) or int(meta["group_size"]) != GROUP_SIZE or not isinstance(spans, list):
            raise ValueError("unsupported quantization")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CacheFileError(f"{path.name}: malformed metadata ({e})") from None
    if expect_layers is not None and len(spans) != len(expect_layers):
        raise CacheFileError(f"{path.name}: {len(spans)} layers, model has {len(expect_layers)}")
    shared = None
    if prefix is not None:
        try:
            h, n = str(prefix["hash"]), int(prefix["tokens"])
        except (KeyError, TypeError, ValueError):
            raise CacheFileError(f"{path.name}: malformed prefix reference") from None
        if not 0 < n <= len(tokens) or n % BLOCK_TOKENS:
            raise CacheFileError(f"{path.name}: prefix of {n} tokens does not fit the token list")
        if prefix_source is None:  # the block file next to the agent file
            block = path.parent / "blocks" / f"{h}{SUFFIX}"
            if not block.exists():
                raise CacheFileError(f"{path.name}: shared prefix {h} is missing (no blocks/{block.name})")
            shared = [Segment(tuple(x[..., :n, :] for x in k), None if v is None else tuple(x[..., :n, :] for x in v), n, shared=True) for k, v in read_block(block, fingerprint, bits, tokens[:n])]
        else:
            shared = prefix_source(h, n, tokens[:n])
    layers = []
    parts = 3 if bits != 16 else 1
    try:
        for i, s in enumerate(spans):
            window = expect_layers[i].window if expect_layers is not None else s["window"]
            if window != s["window"] or s["offset"] != len(tokens):
                raise CacheFileError(f"{path.name}: layer {i} does not match the model or the token list")
            k = tuple(arrays.pop(f"layers.{i}.k.{j}") for j in range(parts) if f"layers.{i}.k.{j}" in arrays)
            v = tuple(arrays.pop(f"layers.{i}.v.{j}") for j in range(parts) if f"layers.{i}.v.{j}" in arrays)
            v = v if s["values"] else None
            if k:
                _check_layer(path, i, k, v, bits)
            layers.append(_restore_layer(path, i, bits, window, s, k, v, None if shared is None else shared[i], rotated))
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CacheFileError(f"{path.name}: layer data inconsistent ({e})") from None
    if arrays:
        raise CacheFileError(f"{path.name}: unexpected tensors {sorted(arrays)[:3]}")
    if expect_layers is not None and any((layer.bits, layer.rotate_keys) != (want.bits, want.rotate_keys) for layer, want in zip(layers, expect_layers)):
        raise CacheFileError(f"{path.name}: stored with {layers[0].mode} KV, runtime uses {expect_layers[0].mode}")
    return AgentCache(layers, tokens), extra


def read_block(path: Path, fingerprint: str, bits: int, tokens: list[int]) -> list[tuple[tuple, tuple | None]]:
    """A prefix block file, verified and checked to start with `tokens`: per-layer (k, v)."""
    path = Path(path)

    def same(meta: dict) -> None:
        if meta.get("fingerprint") != fingerprint or meta.get("kv_bits") != str(bits):
            raise CacheFileError(f"{path.name}: prefix block of another model or KV precision")
        try:
            ok = json.loads(meta["tokens"])[: len(tokens)] == list(tokens)
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise CacheFileError(f"{path.name}: prefix block does not hold these tokens")

    arrays, meta = read_arrays(path, (BLOCK_FORMAT,), same)
    n = len(json.loads(meta["tokens"]))
    parts = 1 if bits == 16 else 3
    out = []
    try:
        for i, s in enumerate(json.loads(meta["layers"])):
            k = tuple(arrays.pop(f"layers.{i}.k.{j}") for j in range(parts))
            v = tuple(arrays.pop(f"layers.{i}.v.{j}") for j in range(parts)) if s["values"] else None
            _check_layer(path, i, k, v, bits)
            if k[0].shape[-2] != n:
                raise ValueError(f"layer {i} holds {k[0].shape[-2]} tokens, expected {n}")
            out.append((k, v))
    except (KeyError, ValueError, TypeError) as e:
        raise CacheFileError(f"{path.name}: prefix block layers inconsistent ({e})") from None
    return out


def _restore_layer(path, i, bits, window, span, k, v, shared: Segment | None, rotated: bool = False) -> LayerCache:
    if shared is None:
        return LayerCache.restore(bits, window, span["start"], span["offset"], k, v, rotated)
    n = k[0].shape[-2] if k else 0
    if window is not None or span["start"] != shared.length or span["start"] + n != span["offset"]:
        raise CacheFileError(f"{path.name}: layer {i} does not continue its shared prefix")
    layer = LayerCache(bits, window, rotated)
    layer.offset = span["offset"]
    layer.segments = [shared] + ([Segment(k, v, n)] if n else [])
    return layer


def _check_layer(path: Path, i: int, k: tuple, v: tuple | None, bits: int) -> None:
    """Shapes must agree with each other: (heads, tokens, dim) for every part."""
    parts = list(k) + list(v or ())
    n = {x.shape[-2] for x in parts if x.ndim == 3}
    heads = {x.shape[0] for x in parts if x.ndim == 3}
    if len(n) != 1 or len(heads) != 1 or any(x.ndim != 3 for x in parts):
        raise CacheFileError(f"{path.name}: layer {i} tensors disagree on shape")
    for t in (k, v or None):
        if t is None:
            continue
        dt = [str(x.dtype).rsplit(".", 1)[-1] for x in t]  # numpy or MLX arrays
        if bits == 16:
            ok = dt == ["float16"]
        else:
            ok = (
                dt == ["uint32", "float16", "float16"]
                and t[1].shape == t[2].shape
                and t[1].shape[-1] * GROUP_SIZE == t[0].shape[-1] * 32 // bits
            )
        if not ok:
            raise CacheFileError(f"{path.name}: layer {i} quantization layout mismatch")


def quarantine(path: Path, inode: int | None = None) -> Path | None:
    """Move a refused file aside (never delete user data): <name>.bad-<time>.

    With `inode`, only moves the file if it is still the one that was read
    (another process may have replaced it with a good one meanwhile).
    """
    path = Path(path)
    try:
        if inode is not None and path.stat().st_ino != inode:
            return None
        dst = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(path, dst)
    except FileNotFoundError:
        return None
    return dst
