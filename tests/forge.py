"""Crafted container files: a safetensors header taken apart and put back with every
checksum recomputed, so that only the checks of meaning stand in the way."""

import json
import struct
from pathlib import Path

from mlx_agentcache.store import container


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(tensor table, metadata, tensor bytes) of a container file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return header, header.pop("__metadata__"), data[8 + n :]


def join(header: dict, meta: dict, body: bytes) -> bytes:
    """A container file's bytes, the table and metadata checksums recomputed (padded as
    the writer pads; `Infinity` written as Python's JSON allows)."""
    meta = {**meta, "table_crc32": str(container._table_crc(header))}
    meta["meta_crc32"] = str(container._meta_crc(meta))
    raw = json.dumps({**header, "__metadata__": meta}).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def reforge(path: Path, edit) -> None:
    """Edit a file's tensor table and metadata in place with `edit(header, meta)`; the
    tensor bytes stay."""
    header, meta, body = split(Path(path).read_bytes())
    edit(header, meta)
    Path(path).write_bytes(join(header, meta, body))
