"""The agent cache file: safetensors with a checked header, written atomically.

Layout: the standard safetensors container (8-byte little-endian header
length, JSON header, raw tensor bytes). Tensors are `tokens` (int32) and,
per layer `i`, `layers.i.k.j` / `layers.i.v.j` (j = 0 packed codes,
1 fp16 scales, 2 fp16 biases; a single fp16 tensor for 16-bit caches).
`__metadata__` holds the format name and version, the model fingerprint,
the quantization parameters, each layer's span, a CRC32 per tensor and a
CRC32 of the metadata itself.

A file is only ever used after every check passed; anything else raises
`CacheFileError` with a one-line reason. Writes go to a temporary file in the
same directory, are fsynced, renamed over the old file, and the directory is
fsynced: a crash at any point leaves either the old or the new file.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import numpy as np

from .kvcache import AgentCache, LayerCache
from .q4 import BLOCK_TOKENS, GROUP_SIZE

FORMAT = "agentcache-kv"
VERSION = 1
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


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Write chunks to `path` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
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


def _to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a, copy=False)


def _tensors(cache: AgentCache) -> tuple[dict[str, np.ndarray], list[dict]]:
    mx.eval([(s.keys, s.values or ()) for layer in cache.layers for s in layer.segments])
    tensors = {"tokens": np.asarray(cache.tokens, dtype=np.int32)}
    spans = []
    for i, layer in enumerate(cache.layers):
        start, k, v = layer.export() if layer.stored else (layer.offset, (), None)
        spans.append({"start": start, "offset": layer.offset, "window": layer.window, "values": v is not None})
        for name, part in (("k", k), ("v", v or ())):
            for j, x in enumerate(part):
                tensors[f"layers.{i}.{name}.{j}"] = _to_numpy(x)
    return tensors, spans


def save(path: Path, cache: AgentCache, fingerprint: str, extra: dict | None = None) -> int:
    """Write `cache` to `path` atomically; returns bytes written."""
    bits = cache.layers[0].bits
    tensors, spans = _tensors(cache)
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "fingerprint": fingerprint,
        "kv_bits": str(bits),
        "group_size": str(GROUP_SIZE),
        "block_tokens": str(BLOCK_TOKENS),
        "n_tokens": str(len(cache.tokens)),
        "layers": json.dumps(spans),
        "crc32": json.dumps({n: _crc(a) for n, a in tensors.items()}),
        "extra": json.dumps(extra or {}),
        "saved_at": str(int(time.time())),
    }
    meta["meta_crc32"] = str(_meta_crc(meta))
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunks = [struct.pack("<Q", len(raw)), raw] + [memoryview(np.ascontiguousarray(a)).cast("B") for a in tensors.values()]
    return atomic_write(path, chunks)


def _meta_crc(meta: dict) -> int:
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_crc32"}, sort_keys=True).encode()
    return zlib.crc32(body) & 0xFFFFFFFF


def read_header(path: Path) -> tuple[dict, dict, int]:
    """Parse and check the container: (tensor entries, metadata, data start)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CacheFileError(f"{path.name}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CacheFileError(f"{path.name}: header length {n} is impossible for a {size}-byte file")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFileError(f"{path.name}: header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CacheFileError(f"{path.name}: not an agent cache (no metadata)")
    meta = header.pop("__metadata__")
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path.name}: not an agent cache file (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CacheFileError(f"{path.name}: format version {meta.get('version')} is not supported (expected {VERSION})")
    if meta.get("meta_crc32") != str(_meta_crc(meta)):
        raise CacheFileError(f"{path.name}: metadata checksum mismatch")
    data_start, end = 8 + n, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0] if isinstance(kv[1], dict) else 0):
        try:
            dt, shape, (a, b) = np.dtype(_DTYPES[e["dtype"]]), [int(s) for s in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CacheFileError(f"{path.name}: malformed entry for tensor {name!r}") from None
        if a != end or b - a != dt.itemsize * int(np.prod(shape)) or min(shape, default=0) < 0:
            raise CacheFileError(f"{path.name}: tensor {name!r} has inconsistent offsets")
        end = b
    if data_start + end != size:
        raise CacheFileError(f"{path.name}: truncated or padded ({size} bytes, header describes {data_start + end})")
    return header, meta, data_start


def load(path: Path, fingerprint: str, expect_layers: list[LayerCache] | None = None) -> tuple[AgentCache, dict]:
    """Read, verify and rebuild an AgentCache. Raises CacheFileError on any doubt."""
    path = Path(path)
    header, meta, data_start = read_header(path)
    if meta.get("fingerprint") != fingerprint:
        raise CacheFileError(f"{path.name}: cache was made by another model (fingerprint {meta.get('fingerprint')}, this model {fingerprint})")
    try:
        spans = json.loads(meta["layers"])
        crcs = json.loads(meta["crc32"])
        bits = int(meta["kv_bits"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError) as e:
        raise CacheFileError(f"{path.name}: malformed metadata ({e})") from None
    if set(crcs) != set(header):
        raise CacheFileError(f"{path.name}: checksum list does not match the tensors")
    if expect_layers is not None and len(spans) != len(expect_layers):
        raise CacheFileError(f"{path.name}: {len(spans)} layers, model has {len(expect_layers)}")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name, e in header.items():
        a, b = e["data_offsets"]
        raw = mm[data_start + a : data_start + b]
        if _crc(raw) != crcs[name]:
            raise CacheFileError(f"{path.name}: checksum mismatch in {name}")
        arrays[name] = mx.array(raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"]))
    del mm
    tokens = arrays.pop("tokens", None)
    if tokens is None:
        raise CacheFileError(f"{path.name}: no token ids")
    tokens = tokens.tolist()
    layers = []
    try:
        for i, s in enumerate(spans):
            window = expect_layers[i].window if expect_layers is not None else s["window"]
            if window != s["window"] or s["offset"] != len(tokens):
                raise CacheFileError(f"{path.name}: layer {i} does not match the model or the token list")
            k = tuple(arrays.pop(f"layers.{i}.k.{j}") for j in range(3 if bits != 16 else 1) if f"layers.{i}.k.{j}" in arrays)
            v = tuple(arrays.pop(f"layers.{i}.v.{j}") for j in range(3 if bits != 16 else 1) if f"layers.{i}.v.{j}" in arrays)
            if k:
                _check_layer(path, i, k, v if s["values"] else None, bits)
            layers.append(LayerCache.restore(bits, window, s["start"], s["offset"], k, v if s["values"] else None))
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CacheFileError(f"{path.name}: layer data inconsistent ({e})") from None
    if arrays:
        raise CacheFileError(f"{path.name}: unexpected tensors {sorted(arrays)[:3]}")
    if expect_layers is not None:
        for i, (got, want) in enumerate(zip(layers, expect_layers)):
            if got.bits != want.bits:
                raise CacheFileError(f"{path.name}: stored with {got.bits}-bit KV, runtime uses {want.bits}-bit")
    return AgentCache(layers, tokens), extra


def _check_layer(path: Path, i: int, k: tuple, v: tuple | None, bits: int) -> None:
    """Shapes must agree with each other: (heads, tokens, dim) for every part."""
    parts = list(k) + list(v or ())
    n = {x.shape[-2] for x in parts}
    heads = {x.shape[0] for x in parts}
    if len(n) != 1 or len(heads) != 1 or any(x.ndim != 3 for x in parts):
        raise CacheFileError(f"{path.name}: layer {i} tensors disagree on shape")
    if bits != 16 and (k[0].dtype != mx.uint32 or k[1].shape[-1] * GROUP_SIZE != k[0].shape[-1] * 32 // bits):
        raise CacheFileError(f"{path.name}: layer {i} quantization layout mismatch")


def quarantine(path: Path) -> Path:
    """Move a refused file aside (never delete user data): <name>.bad-<time>."""
    path = Path(path)
    dst = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, dst)
    return dst
