"""The `format` names of the store's files and the metadata fields listings read,
spelled once and importable without MLX (store/index.py lists agents with them)."""

from __future__ import annotations

import hashlib
import json
import struct

from . import numbers
from .container import MAX_DIM

FORMAT = "agentcache-kv-2"  # one self-contained agent file (archives; agents saved before segments)
FORMAT_V1 = "agentcache-kv"  # before q4c: no kv_mode
MANIFEST = "agentcache-kv-3"  # an agent's manifest naming its segments (segments.py)
SEGMENT = "agentcache-segment"
BLOCK = "agentcache-prefix"  # a shared prefix block (prefixes.py)
AGENT_FORMATS = (FORMAT, FORMAT_V1, MANIFEST)  # what `<agent>.safetensors` may hold
LEAD_TOKENS = 256  # the first shared-prefix block (q4.BLOCK_TOKENS)


def lead_of_bytes(raw: bytes) -> str:
    """The key of an agent's first block from its first LEAD_TOKENS token ids as stored
    (int32, little-endian): agents with the same key start with the same tokens."""
    return hashlib.sha256(raw).hexdigest()[:16]


def token_bytes(path, header: dict, start: int, limit: int | None = None) -> bytes:
    """Up to `limit` bytes (all without one) of an agent file's `tokens` tensor (int32,
    little-endian), from its parsed header alone; b"" when it holds no such tensor. A hint:
    only a full read checks them."""
    t = header.get("tokens")
    if not isinstance(t, dict) or t.get("dtype") != "I32":
        return b""
    a, b = t["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + a)
        return f.read(b - a if limit is None else min(limit, b - a))


def lead_of(tokens: list[int]) -> str | None:
    """`lead_of_bytes` of a token list; None when it is shorter than one block."""
    if len(tokens) < LEAD_TOKENS:
        return None
    return lead_of_bytes(struct.pack(f"<{LEAD_TOKENS}i", *tokens[:LEAD_TOKENS]))


def block_tokens(meta: dict) -> list[int]:
    """The token ids a prefix block file holds (from its checked metadata); ValueError if they are not."""
    try:
        tokens = json.loads(meta["tokens"])
    except RecursionError:
        raise ValueError("token list nested too deep") from None
    if not isinstance(tokens, list):
        raise ValueError("token list is not a list")
    return [numbers.count(t, "token id", 0, MAX_DIM) for t in tokens]


def prefix_ref(meta: dict) -> dict | None:
    """An agent file's shared-prefix reference {"hash": str, "tokens": int}, or None
    (none, or not a reference at all)."""
    try:
        ref = json.loads(meta.get("prefix", "null"))
        if isinstance(ref, dict) and isinstance(ref.get("hash"), str):
            return {"hash": ref["hash"], "tokens": numbers.count(ref.get("tokens"), "prefix tokens", 1, MAX_DIM)}
    except (ValueError, RecursionError):
        pass
    return None


def stored_bytes(meta: dict) -> int:
    """Bytes of the segments a manifest names (0 for a self-contained file)."""
    if meta.get("format") != MANIFEST:
        return 0
    try:
        return numbers.count(meta.get("stored_bytes", "0"), "stored_bytes", 0, 1 << 62)
    except ValueError:  # a listing's figure only: the segments themselves are checked when read
        return 0
