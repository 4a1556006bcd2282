"""The checked container: safetensors files whose every byte is covered by a check.

Layout: the standard safetensors container (8-byte little-endian header
length, JSON header, raw tensor bytes), so any safetensors reader opens it.
`__metadata__` carries a `format` string chosen by the caller, the container
`VERSION`, a CRC32 per tensor, a CRC32 of the tensor table and a CRC32 of the
metadata itself. A file is used only after every check passed; anything else
raises `CacheFileError` with a one-line reason that names the file.

Writes go to a temporary file in the same directory, are fsynced, renamed
over the old file, and the directory is fsynced: a crash at any point leaves
either the old or the new file. Reads open the file once, so a concurrent
rename never mixes two versions. Nothing here knows what the tensors mean
(see codec.py for the KV cache).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from concurrent.futures import Future

    import numpy as np

try:  # zlib's CRC32 computed with carry-less multiply: ten times zlib's speed, the same sums
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover (a platform without its wheel)
    from zlib import crc32 as _crc32

from . import numbers
from .layout import bad_name, tmp_name

VERSION = 2
MAX_HEADER_BYTES = 64 << 20
MAX_DIM = (1 << 31) - 1  # MLX array dimensions are 32-bit

# safetensors dtype -> numpy's (and MLX's) name, item size. numpy is imported where tensors are
# read or written, not here: listings (index.py) read headers only, and start faster without it.
_DTYPES = {"U32": ("uint32", 4), "F16": ("float16", 2), "I32": ("int32", 4), "F32": ("float32", 4), "U8": ("uint8", 1)}
_NAMES = {name: k for k, (name, _) in _DTYPES.items()}


class CacheFileError(Exception):
    """A file that must not be used; the message says why."""


class CacheWriteError(OSError):
    """A save that did not happen; the previous file is untouched."""


READ_BATCH = 8 << 20  # bytes per preadv: few syscalls, and checksums start while the next batch is read
IOV_MAX = 1024  # buffers per preadv (Linux and macOS)


def crc(buf, prev: int = 0) -> int:
    """CRC32 of a buffer, continuing `prev` (so a tensor read in pieces sums as one)."""
    view = memoryview(buf)
    return _crc32(view.cast("B") if view.nbytes else b"", prev) & 0xFFFFFFFF


def _preadv(fd: int, bufs: list, at: int) -> int:
    """os.preadv where the platform has it; else a seek and readv (only the reading thread reads `fd`)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, bufs, at)
    os.lseek(fd, at, os.SEEK_SET)
    return os.readv(fd, bufs)


_EXPONENT = {"F16": ("uint16", 0x7C00), "F32": ("uint32", 0x7F800000)}  # all exponent bits set: an infinity or a NaN


def finite(buf, dtype: str) -> bool:
    """No infinity or NaN in a tensor's bytes (`dtype` as safetensors names it; other
    than float, always true). It reads the exponent bits of the memory itself: MLX's
    isfinite on fp16 runs at about 100 MB/s on a CPU and waits for its own evaluation."""
    if dtype not in _EXPONENT:
        return True
    import numpy as np

    u, mask = _EXPONENT[dtype]
    a = np.frombuffer(buf, dtype=u)
    return not np.any((a & mask) == mask)


def _sums(bufs: list, dtype: str) -> tuple[int, bool]:
    """A tensor's CRC32 chained over its buffers, and whether every value is finite."""
    c, ok = 0, True
    for b in bufs:
        c = crc(b, c)
        ok = ok and finite(b, dtype)
    return c, ok


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses even to look (EROFS), and nothing was created
            pass
        if isinstance(e, OSError):
            raise CacheWriteError(e.errno, f"could not save {path.name}: {e.strerror or e}") from e
        raise
    return written


def quarantine(path: Path, inode: int | None = None) -> Path | None:
    """Move a refused file aside (never delete user data).

    With `inode`, only moves the file if it is still the one that was read
    (another process may have replaced it with a good one meanwhile).
    """
    path = Path(path)
    try:
        if inode is not None and path.stat().st_ino != inode:
            return None
        dst = bad_name(path)
        os.replace(path, dst)
    except FileNotFoundError:
        return None
    return dst


# -- header ---------------------------------------------------------------------


def _meta_crc(meta: dict) -> int:
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_crc32"}, sort_keys=True).encode()
    return zlib.crc32(body) & 0xFFFFFFFF


def _table_crc(entries: dict) -> int:
    return zlib.crc32(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def write_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """Checksum `tensors`, build the header and write atomically; returns bytes written."""
    import numpy as np

    entries, offset = {}, 0
    for name, arr in tensors.items():
        entries[name] = {"dtype": _NAMES[arr.dtype.name], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    arrays = [np.ascontiguousarray(a) for a in tensors.values()]
    meta = {
        **meta,
        "version": str(VERSION),
        "crc32": json.dumps({n: crc(a) for n, a in zip(tensors, arrays)}),
        "table_crc32": str(_table_crc(entries)),
        "saved_at": str(int(time.time())),
    }
    meta["meta_crc32"] = str(_meta_crc(meta))
    raw = json.dumps({**entries, "__metadata__": meta}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunks = [struct.pack("<Q", len(raw)), raw] + [memoryview(a).cast("B") for a in arrays if a.nbytes]
    return atomic_write(path, chunks)


def _parse(f: BinaryIO, name: str) -> tuple[dict, dict, int, int]:
    """The one reader of the preamble: (tensor entries, metadata, data start, file size), unchecked."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if size < 8 or len(head) < 8:
        raise CacheFileError(f"{name}: truncated ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise CacheFileError(f"{name}: header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if n > size - 8:
        raise CacheFileError(f"{name}: truncated (header needs {n} bytes, file has {size - 8} after the length)")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors
        raise CacheFileError(f"{name}: header is not valid JSON ({e.__class__.__name__})") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CacheFileError(f"{name}: not an agent cache (no string metadata)")
    return header, meta, 8 + n, size


def _check(header: dict, meta: dict, name: str, size: int, data_start: int, formats: tuple[str, ...]) -> None:
    if meta.get("format") not in formats:
        raise CacheFileError(f"{name}: not an agent cache file (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CacheFileError(f"{name}: format version {meta.get('version')} is not supported (expected {VERSION}); remove it with `agentcache agents gc`")
    if meta.get("meta_crc32") != str(_meta_crc(meta)):
        raise CacheFileError(f"{name}: metadata checksum mismatch")
    if meta.get("table_crc32") != str(_table_crc(header)):
        raise CacheFileError(f"{name}: tensor table checksum mismatch")
    end, table = 0, []
    try:
        for tname, e in header.items():
            itemsize = _DTYPES[e["dtype"]][1]
            shape = numbers.shape(e["shape"], f"tensor {tname!r} shape", MAX_DIM)
            offsets = e["data_offsets"]
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise numbers.HeaderNumberError(f"tensor {tname!r} data_offsets is not a pair")
            a, b = (numbers.count(x, f"tensor {tname!r} data_offsets", 0, size) for x in offsets)
            table.append((a, b, tname, itemsize * math.prod(shape)))
    except numbers.HeaderNumberError as e:
        raise CacheFileError(f"{name}: malformed tensor table ({e})") from None
    except (KeyError, TypeError, ValueError, IndexError):
        raise CacheFileError(f"{name}: malformed tensor table") from None
    for a, b, tname, nbytes in sorted(table):
        if a != end or b - a != nbytes:
            raise CacheFileError(f"{name}: tensor {tname!r} has inconsistent offsets")
        end = b
    if data_start + end != size:
        raise CacheFileError(f"{name}: truncated or padded ({size} bytes, header describes {data_start + end})")


def _crcs(name: str, header: dict, meta: dict) -> dict:
    try:
        crcs = json.loads(meta["crc32"])
        if not isinstance(crcs, dict) or set(crcs) != set(header):
            raise ValueError
    except (KeyError, ValueError):
        raise CacheFileError(f"{name}: checksum list does not match the tensors") from None
    return crcs


def _cannot_read(path: Path, e: BaseException) -> CacheFileError:
    return CacheFileError(f"{path.name}: cannot read ({getattr(e, 'strerror', None) or e})")


def read_header(path: Path, formats: tuple[str, ...]) -> tuple[dict, dict, int]:
    """Parse and check the container: (tensor entries, metadata, data start). Reads the header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, meta, data_start, size = _parse(f, path.name)
    except OSError as e:
        raise _cannot_read(path, e) from None
    _check(header, meta, path.name, size, data_start, formats)
    return header, meta, data_start


def peek_meta(path: Path) -> dict | None:
    """Metadata without any check (None if the preamble is unreadable): for listings and gc."""
    try:
        with open(path, "rb") as f:
            return _parse(f, Path(path).name)[1]
    except (OSError, CacheFileError):
        return None


def read_tensors(path: Path, formats: tuple[str, ...], check: Callable[[dict], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map a file and verify it: ({name: read-only view}, metadata).

    `check(meta)` runs before any tensor byte is read (e.g. the model
    fingerprint), so a file for another model costs only its header.
    """
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, meta, data_start, size = _parse(f, path.name)
            _check(header, meta, path.name, size, data_start, formats)
            if check is not None:
                check(meta)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise _cannot_read(path, e) from None
    crcs = _crcs(path.name, header, meta)
    out = {}
    for tname, e in header.items():
        a, b = e["data_offsets"]
        raw = np.frombuffer(mm, dtype=np.uint8, count=b - a, offset=data_start + a)
        if crc(raw) != crcs[tname]:
            raise CacheFileError(f"{path.name}: checksum mismatch in {tname}")
        if not finite(raw, e["dtype"]):
            raise CacheFileError(f"{path.name}: {tname} holds values that are not finite")
        out[tname] = raw.view(_DTYPES[e["dtype"]][0]).reshape(e["shape"])
    return out, meta


class Opened:
    """A container file open for reading, its header checked: `scatter` reads its tensors.

    The file stays open from header to last byte, so a concurrent atomic replace
    cannot mix two versions.
    """

    def __init__(self, f: BinaryIO, path: Path, header: dict, meta: dict, data_start: int, crcs: dict):
        self.f, self.path, self.header, self.meta, self.data_start, self.crcs = f, path, header, meta, data_start, crcs

    def entries(self) -> list[tuple[str, dict]]:
        """(tensor name, table entry) in file order."""
        return sorted(self.header.items(), key=lambda kv: kv[1]["data_offsets"][0])

    def scatter(self, place: Callable[[str, dict], list], threads: "ReadThreads") -> list[Future]:
        """Read every tensor, in file order, into the buffers `place(name, entry)` returns
        (writable, together exactly the tensor's bytes, in order), with preadv calls of
        about READ_BATCH bytes on `threads.io` while the caller goes on placing (and
        allocating) the next; each tensor's CRC32 is chained over its buffers, and a
        float tensor's values checked finite, on `threads.crc`. `verify` waits for the
        returned jobs and compares the sums."""
        fd, name, jobs = self.f.fileno(), self.path.name, []
        pos, iov, done, size = None, [], [], 0

        def read(at: int, bufs: list, done: list) -> Future:
            i = 0  # the first buffer not yet full
            while i < len(bufs):
                k = _preadv(fd, bufs[i : i + IOV_MAX], at)
                if not k:
                    raise CacheFileError(f"{name}: truncated while reading {done[0][0]}")
                at += k
                while i < len(bufs) and k >= bufs[i].nbytes:
                    k -= bufs[i].nbytes
                    i += 1
                if k:
                    bufs[i] = bufs[i][k:]
            # one job per batch: a submit per tensor kept this thread from its next read
            return threads.crc.submit(lambda: [(t, _sums(b, self.header[t]["dtype"])) for t, b in done])

        for tname, e in self.entries():
            a, b = e["data_offsets"]
            if a == b:
                continue
            if pos is None:
                pos = self.data_start + a
            bufs = [memoryview(x).cast("B") for x in place(tname, e)]
            if sum(x.nbytes for x in bufs) != b - a:
                raise ValueError(f"{name}: buffers for {tname} do not hold its {b - a} bytes")
            iov += bufs
            done.append((tname, bufs))
            size += b - a
            if size >= READ_BATCH:
                jobs.append(threads.io.submit(read, pos, iov, done))
                pos, iov, done, size = pos + size, [], [], 0
        if iov:
            jobs.append(threads.io.submit(read, pos, iov, done))
        return jobs

    def verify(self, jobs: list[Future]) -> None:
        """Wait for `scatter`'s reads, compare their checksums with the header's and refuse
        a value that is not finite; raises on the first fault."""
        for job in jobs:
            for tname, (c, ok) in job.result().result():
                if c != self.crcs[tname]:
                    raise CacheFileError(f"{self.path.name}: checksum mismatch in {tname}")
                if not ok:
                    raise CacheFileError(f"{self.path.name}: {tname} holds values that are not finite")


class ReadThreads:
    """The two helpers of a read: `io` runs the preadv calls while the caller allocates the
    next buffers, `crc` the checksums and finite checks while the next bytes are read.
    Neither touches MLX."""

    def __enter__(self) -> "ReadThreads":
        from concurrent.futures import ThreadPoolExecutor  # here: listings read no tensors

        self.io = ThreadPoolExecutor(1, "agentcache-read")
        self.crc = ThreadPoolExecutor(1, "agentcache-crc")
        return self

    def __exit__(self, *exc) -> None:
        self.io.shutdown()
        self.crc.shutdown()


@contextmanager
def open_checked(path: Path, formats: tuple[str, ...], check: Callable[[dict], None] | None = None) -> Iterator[Opened]:
    """Open a file and check its header (format, version, checksums of metadata and
    table, offsets, size); `check(meta)` runs before any tensor byte is read (e.g. the
    model fingerprint), so a file for another model costs only its header."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            header, meta, data_start, size = _parse(f, path.name)
            _check(header, meta, path.name, size, data_start, formats)
            if check is not None:
                check(meta)
            yield Opened(f, path, header, meta, data_start, _crcs(path.name, header, meta))
    except OSError as e:
        raise _cannot_read(path, e) from None


class Arrays:
    """Fresh MLX arrays {name: (shape, numpy dtype name)}, allocated on first use about
    READ_BATCH bytes at a time in `order` (the order they are read in), so that
    allocating (page faults and zeroing) overlaps the reads already submitted."""

    def __init__(self, shapes: dict[str, tuple[list, str]], order: Iterable[str]):
        self.shapes, self.arrays, self.views = shapes, {}, {}
        self.order = list(dict.fromkeys([*order, *shapes]))
        self.next = 0

    def bytes(self, name: str) -> "np.ndarray":
        """A writable uint8 view of the array's memory (filled before any use)."""
        while name not in self.views and self.next < len(self.order):
            self._allocate()
        return self.views[name]

    def all(self) -> dict:
        while self.next < len(self.order):
            self._allocate()
        return {n: self.arrays[n] for n in self.shapes}

    def _allocate(self) -> None:
        import mlx.core as mx  # here, not at the top: listings (index.py) read headers without MLX
        import numpy as np

        batch, size = {}, 0
        while self.next < len(self.order) and size < READ_BATCH:
            n = self.order[self.next]
            shape, dt = self.shapes[n]
            batch[n] = mx.empty(tuple(shape), getattr(mx, dt))
            size += batch[n].nbytes
            self.next += 1
        mx.eval(list(batch.values()))
        self.arrays.update(batch)
        self.views.update({n: np.array(x, copy=False).reshape(-1).view(np.uint8) for n, x in batch.items()})



def dtype_name(entry: dict) -> str:
    return _DTYPES[entry["dtype"]][0]


def read_arrays(path: Path, formats: tuple[str, ...], check: Callable[[dict], None] | None = None) -> tuple[dict, dict]:
    """Read a file straight into MLX memory and verify it: ({name: array}, metadata).

    Every tensor is read into a freshly allocated MLX buffer and checksummed
    (floats also checked finite) there: its bytes are copied once, from the
    kernel into the array, and nothing is used before every check passed.
    """
    with open_checked(path, formats, check) as r, ReadThreads() as threads:
        arrays = Arrays({n: (e["shape"], dtype_name(e)) for n, e in r.header.items()}, [n for n, _ in r.entries()])
        r.verify(r.scatter(lambda n, e: [arrays.bytes(n)], threads))
    return arrays.all(), r.meta
