"""Per-agent KV caches in quantized 256-token blocks.

An `AgentCache` is one agent's context: the token ids it has seen and, for
every layer, a `LayerCache`. A layer cache stores keys and values as a list
of segments. Only the last segment is writable; earlier ones may be shared
with other agents (a common system prompt) and are never modified: trimming
into a shared segment copies what is kept (copy-on-write).

This module is storage: append, trim, windows, copy-on-write. Attention
over the segments (`LayerCache.attend`) is computed in attention.py, which
reads the quantized codes directly.

Sliding-window layers (Gemma 3) keep at most `window` past tokens plus one
block of slack; whole blocks are dropped from the front as the window moves.
`start` is the absolute position of the first stored token, so RoPE offsets
stay right after a restore.

Keys have outlier channels (a few dimensions much larger than the rest), and
one outlier stretches the range of its whole 64-value group. Mode `q4k`
stores keys rotated by an orthonormal Hadamard matrix, which spreads every
channel over the group, and rotates queries the same way: q.k is unchanged,
the quantization error is not. See docs/quality.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from . import attention, q4
from .attention import rotate
from .q4 import BLOCK_TOKENS, GROUP_SIZE

KV_BITS = (4, 8, 16)
KV_MODES = {"fp16": (16, False), "q8": (8, False), "q4": (4, False), "q4k": (4, True)}  # name -> (bits, rotate_keys)


def kv_mode(mode: int | str) -> tuple[int, bool]:
    """A mode name ("q4k") or a bit width (4) -> (bits, rotate_keys)."""
    if isinstance(mode, str) and not mode.isdigit():
        if mode not in KV_MODES:
            raise ValueError(f"kv mode must be one of {', '.join(KV_MODES)}, got {mode!r}")
        return KV_MODES[mode]
    if int(mode) not in KV_BITS:
        raise ValueError(f"kv bits must be one of {KV_BITS} (or a mode: {', '.join(KV_MODES)}), got {mode}")
    return int(mode), False


def mode_name(bits: int, rotate_keys: bool) -> str:
    return next(n for n, m in KV_MODES.items() if m == (bits, rotate_keys))


def encode(x: mx.array, bits: int) -> tuple:
    """Keys or values (..., T, D) -> stored form: Q4/Q8 triple or a 1-tuple of fp16."""
    if bits == 16:
        return (x.astype(mx.float16),)
    if bits == 4:
        return tuple(q4.quantize(x))
    return tuple(mx.quantize(x.astype(mx.float16), group_size=GROUP_SIZE, bits=bits))


def _tokens(t: tuple) -> int:
    return t[0].shape[-2]


def _slice(t: tuple, a: int, b: int) -> tuple:
    return tuple(x[..., a:b, :] for x in t)


def _concat(a: tuple, b: tuple) -> tuple:
    return tuple(mx.concatenate([x, y], axis=-2) for x, y in zip(a, b))


def _nbytes(t: tuple) -> int:
    return sum(x.nbytes for x in t)


@dataclass
class Segment:
    """Contiguous stored tokens; `keys`/`values` may have spare capacity past `length`."""

    keys: tuple
    values: tuple | None
    length: int
    shared: bool = False

    def view(self) -> tuple[tuple, tuple | None]:
        k = _slice(self.keys, 0, self.length)
        v = None if self.values is None else _slice(self.values, 0, self.length)
        return k, v

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens (not of spare capacity)."""
        k, v = self.view()
        return _nbytes(k) + (0 if v is None else _nbytes(v))


def _dtype(x) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]  # numpy or MLX arrays


@dataclass(frozen=True)
class StoredShape:
    """What a model stores per token in one layer: kv heads and, per stored
    part (codes, scales, biases; or one fp16 tensor), its last dimension and dtype.
    A restored file must match it (store/codec.py)."""

    heads: int
    keys: tuple[tuple[int, str], ...]
    values: tuple[tuple[int, str], ...] | None

    @classmethod
    def of(cls, k: tuple, v: tuple | None) -> "StoredShape":
        """The shape of stored parts (heads, tokens, dim) of keys and values."""
        return cls(int(k[0].shape[0]), tuple((int(x.shape[-1]), _dtype(x)) for x in k),
                   None if v is None else tuple((int(x.shape[-1]), _dtype(x)) for x in v))


class LayerCache:
    """One layer of one agent. Implements the cache protocol mlx-lm models use.

    `expect`, when the model runner sets it, is the `StoredShape` this layer
    of the model writes: restored files are checked against it."""

    group_size = GROUP_SIZE

    def __init__(self, bits: int | str = 4, window: int | None = None, rotate_keys: bool = False):
        """`bits` is 4, 8, 16 or a mode name of KV_MODES ("q4k" = 4 bits with rotated keys)."""
        if isinstance(bits, str):
            bits, rotate_keys = kv_mode(bits)
        if bits not in KV_BITS:
            raise ValueError(f"kv bits must be one of {KV_BITS}, got {bits}")
        if rotate_keys and bits != 4:
            raise ValueError("rotated keys are a 4-bit mode (q4k)")
        self.bits = bits
        self.rotate_keys = bool(rotate_keys)
        self.window = window
        self.offset = 0  # absolute position of the next token
        self.start = 0  # absolute position of the first stored token
        self.segments: list[Segment] = []
        self.expect: StoredShape | None = None

    # -- mlx-lm cache protocol -------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array | None):
        """Append (1, H, L, D) keys/values; returns None, None (attention is ours)."""
        if keys.shape[0] != 1:
            raise ValueError("LayerCache holds one sequence; batch through BatchView")
        self._drop_outside_window(self.offset)
        if self.rotate_keys:
            keys = rotate(keys)
        self.append(encode(keys[0], self.bits), None if values is None else encode(values[0], self.bits))
        return None, None

    def make_mask(self, *args, **kwargs):
        return None  # `attend` builds the exact mask from stored positions

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @property
    def mode(self) -> str:
        return mode_name(self.bits, self.rotate_keys)

    # -- storage ----------------------------------------------------------
    @property
    def stored(self) -> int:
        return sum(s.length for s in self.segments)

    def append(self, k: tuple, v: tuple | None) -> None:
        n = _tokens(k)
        last = self.segments[-1] if self.segments else None
        if last is None or last.shared:
            last = Segment(*self._alloc(k, v, -(-n // BLOCK_TOKENS) * BLOCK_TOKENS), length=0)
            self.segments.append(last)
        elif last.length + n > _tokens(last.keys):
            # to the next block boundary, not a whole block more: a restored segment holds exactly its tokens
            grow = -(-(last.length + n) // BLOCK_TOKENS) * BLOCK_TOKENS - last.length
            kk, vv = last.view()
            ek, ev = self._alloc(k, v, grow)
            last.keys = _concat(kk, ek)
            last.values = None if vv is None else _concat(vv, ev)
        a, b = last.length, last.length + n
        for dst, src in zip(last.keys, k):
            dst[..., a:b, :] = src
        if v is not None:
            for dst, src in zip(last.values, v):
                dst[..., a:b, :] = src
        last.length = b
        self.offset += n

    @staticmethod
    def _alloc(k: tuple, v: tuple | None, cap: int):
        def z(t):
            return tuple(mx.zeros((*x.shape[:-2], cap, x.shape[-1]), x.dtype) for x in t)

        return z(k), (None if v is None else z(v))

    def _drop_outside_window(self, next_pos: int) -> None:
        """Drop whole leading blocks no query at or after `next_pos` can see."""
        if self.window is None or not self.segments:
            return
        keep_from = next_pos - self.window + 1
        drop = (keep_from - self.start) // BLOCK_TOKENS * BLOCK_TOKENS
        if drop > 0:
            self._drop_front(drop)

    def _drop_front(self, n: int) -> None:
        k, v = self.contiguous()
        self.segments = [Segment(_slice(k, n, _tokens(k)), None if v is None else _slice(v, n, _tokens(v)), _tokens(k) - n)]
        self.start += n

    def contiguous(self) -> tuple[tuple, tuple | None]:
        """All stored tokens as one (k, v) pair (concatenates segments)."""
        views = [s.view() for s in self.segments]
        k = views[0][0]
        v = views[0][1]
        for kk, vv in views[1:]:
            k = _concat(k, kk)
            v = None if v is None else _concat(v, vv)
        return k, v

    def can_trim_to(self, n: int) -> bool:
        """True if the cache can be cut back to the first `n` absolute tokens."""
        if n > self.offset:
            return False
        if n == 0:
            return True  # starting over is always possible, whatever was dropped
        if self.window is None:
            return self.start == 0
        return self.start <= max(0, n - self.window + 1)  # the next query needs window-1 keys back

    def trim_to(self, n: int) -> None:
        if not self.can_trim_to(n):
            raise ValueError(f"cannot trim layer cache to {n} tokens (stored from {self.start})")
        if n == 0:
            self.segments, self.start, self.offset = [], 0, 0
            return
        keep = n - self.start
        out, seen = [], 0
        for s in self.segments:
            if seen + s.length <= keep:
                out.append(s)
            elif seen < keep:
                k, v = s.view()
                cut = keep - seen
                k, v = _slice(k, 0, cut), (None if v is None else _slice(v, 0, cut))
                # copy-on-write: a shared segment is never written to
                out.append(Segment(tuple(mx.array(x) for x in k), None if v is None else tuple(mx.array(x) for x in v), cut))
            seen += s.length
        self.segments = out
        self.offset = n

    # -- attention ---------------------------------------------------------
    def attend(self, queries: mx.array, scale: float, values_from_keys=None) -> mx.array:
        """Softmax attention of (1, Hq, L, D) queries over all stored tokens (attention.py)."""
        return attention.attend(self, queries, scale, values_from_keys)

    # -- persistence helpers -----------------------------------------------
    def persisted_span(self) -> tuple[int, int]:
        """(first, last) absolute positions worth saving: a window layer keeps `window` tokens."""
        first = self.start if self.window is None else max(self.start, self.offset - self.window)
        return first, self.offset

    @classmethod
    def restore(cls, bits: int, window: int | None, start: int, offset: int, k: tuple, v: tuple | None, rotate_keys: bool = False) -> "LayerCache":
        c = cls(bits, window, rotate_keys)
        n = _tokens(k) if k else 0
        if start + n != offset:
            raise ValueError("layer cache span does not end at its offset")
        c.start = start
        c.offset = offset
        if n:
            c.segments = [Segment(k, v, n)]
        return c


@dataclass
class AgentCache:
    """One agent's context: token ids plus one LayerCache per layer."""

    layers: list[LayerCache]
    tokens: list[int] = field(default_factory=list)

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def common_prefix(self, tokens: list[int]) -> int:
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        return n

    def can_trim_to(self, n: int) -> bool:
        return all(layer.can_trim_to(n) for layer in self.layers)

    def reusable_prefix(self, tokens: list[int]) -> int:
        """Longest common prefix with `tokens` that every layer can be trimmed back to."""
        n = min(self.common_prefix(tokens), len(tokens) - 1)  # always prefill at least one token to get logits
        if not self.can_trim_to(n):
            return 0  # a window layer no longer holds what position n would need
        return max(n, 0)

    def trim_to(self, n: int) -> None:
        for layer in self.layers:
            layer.trim_to(n)
        del self.tokens[n:]


class BatchView:
    """Several agents' layer caches seen as one batched cache by an mlx-lm layer.

    Each row keeps its own storage and length; nothing is padded. RoPE gets
    per-row offsets, and attention runs row by row over each row's own keys.
    """

    def __init__(self, layers: list[LayerCache]):
        self.rows = layers
        self.bits = layers[0].bits
        self.group_size = GROUP_SIZE

    @property
    def offset(self):
        return mx.array([c.offset for c in self.rows])

    def update_and_fetch(self, keys, values):
        for i, c in enumerate(self.rows):
            c.update_and_fetch(keys[i : i + 1], None if values is None else values[i : i + 1])
        return None, None

    def make_mask(self, *args, **kwargs):
        return None

    def attend(self, queries: mx.array, scale: float, values_from_keys=None) -> mx.array:
        return mx.concatenate(
            [c.attend(queries[i : i + 1], scale, values_from_keys) for i, c in enumerate(self.rows)], axis=0
        )
