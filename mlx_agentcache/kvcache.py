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

Modes (KV_MODES). `q4c`, the default, is the 4-bit layout that keeps
quality (docs/quality.md): keys per channel over 128-token groups (aligned
to absolute positions, so 512-token prefill chunks fill whole groups),
values per token in symmetric groups of 32 (q4_format), both stored in
segments of encoding `q4c`; the tokens of the group that has not filled
yet wait at 8 bits (a `q8` segment, the tail). Values are stored rotated by the
Hadamard transform (the attention output is rotated back), which spreads a
value's outliers over its group. The first SINK_TOKENS tokens of a context
(attention sinks, which draw much of the attention and have outsized keys)
are also kept exactly in `sinks` (fp16): attention reads them from there,
and their rows in the segments are ignored (in their key group they take
the next token's value, so they do not stretch its range). `q4` is the
older per-token layout (MLX's affine groups of 64 along the head dim); `q4k`
stores q4 keys rotated by an orthonormal Hadamard matrix and rotates queries
the same way; `q8` and `fp16` are plain. A latent cache (DeepSeek MLA, one
vector per token, no values) in mode q4c stores q4: its one vector serves as
key and value.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import mlx.core as mx

from . import attention
from .attention import rotate
from .config import DEFAULT_KV
from .encodings import decode, encode
from .q4 import BLOCK_TOKENS, GROUP_SIZE
from .q4_format import KEY_GROUP

KV_BITS = (4, 8, 16)
# name -> (bits, rotate_keys, body encoding)
KV_MODES = {"q4c": (4, False, "q4c"), "fp16": (16, False, "fp16"), "q8": (8, False, "q8"),
            "q4": (4, False, "q4"), "q4k": (4, True, "q4")}
SINK_TOKENS = 4  # q4c: the first tokens of a context, kept at fp16 (attention sinks)


def kv_mode(mode: int | str) -> str:
    """A mode name ("q4c") or a bit width (4 -> "q4", 8, 16) -> the mode name."""
    if isinstance(mode, str) and not mode.isdigit():
        if mode not in KV_MODES:
            raise ValueError(f"kv mode must be one of {', '.join(KV_MODES)}, got {mode!r}")
        return mode
    if int(mode) not in KV_BITS:
        raise ValueError(f"kv bits must be one of {KV_BITS} (or a mode: {', '.join(KV_MODES)}), got {mode}")
    return {4: "q4", 8: "q8", 16: "fp16"}[int(mode)]


def _tokens(t: tuple) -> int:
    return t[0].shape[-2]


def slice_tokens(t: tuple, a: int, b: int) -> tuple:
    """Tokens [a, b) of a stored tuple. A part with fewer rows than tokens (q4c
    key scales: one row per KEY_GROUP tokens) is cut at the matching rows;
    a and b must then fall on group edges (or b at the end)."""
    n = _tokens(t)
    out = []
    for x in t:
        rows = x.shape[-2]
        if rows == n:
            out.append(x[..., a:b, :])
            continue
        per = n // rows
        if a % per:
            raise ValueError(f"cut at token {a} inside a {per}-token group")
        out.append(x[..., a // per : -(-b // per), :])
    return tuple(out)


def _concat(a: tuple, b: tuple) -> tuple:
    return tuple(mx.concatenate([x, y], axis=-2) for x, y in zip(a, b))


def _nbytes(t: tuple) -> int:
    return sum(x.nbytes for x in t)


@dataclass
class Segment:
    """Contiguous stored tokens in one encoding; `keys`/`values` may have spare capacity past `length`."""

    keys: tuple
    values: tuple | None
    length: int
    shared: bool = False
    encoding: str = "q4"

    def view(self) -> tuple[tuple, tuple | None]:
        k = slice_tokens(self.keys, 0, self.length)
        v = None if self.values is None else slice_tokens(self.values, 0, self.length)
        return k, v

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens (not of spare capacity)."""
        k, v = self.view()
        return _nbytes(k) + (0 if v is None else _nbytes(v))

    def dense(self, a: int, b: int, dtype=mx.float16) -> tuple[mx.array, mx.array | None]:
        """Tokens [a, b) of this segment as float arrays (whole q4c groups are decoded, then cut)."""
        k, v = self.view()
        if self.encoding == "q4c":
            g0, g1 = a // KEY_GROUP * KEY_GROUP, -(-b // KEY_GROUP) * KEY_GROUP
            kd = decode(slice_tokens(k, g0, g1), "q4c", "k", dtype)[..., a - g0 : b - g0, :]
        else:
            kd = decode(slice_tokens(k, a, b), self.encoding, "k", dtype)
        vd = None if v is None else decode(slice_tokens(v, a, b), self.encoding, "v", dtype)
        return kd, vd


def _dtype(x) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]  # numpy or MLX arrays


@dataclass(frozen=True)
class StoredShape:
    """What a model stores per token in one layer: kv heads and, per stored
    part (codes, scales, biases; or one fp16 tensor), its last dimension and dtype.
    A restored file must match it (store/codec.py)."""

    heads: int
    keys: tuple[tuple[int, str, int], ...]  # (last dim, dtype, tokens per row)
    values: tuple[tuple[int, str, int], ...] | None

    @classmethod
    def of(cls, k: tuple, v: tuple | None) -> "StoredShape":
        """The shape of stored parts (heads, rows, dim) of keys and values."""
        def parts(t):
            return tuple((int(x.shape[-1]), _dtype(x), int(t[0].shape[-2] // max(x.shape[-2], 1))) for x in t)

        return cls(int(k[0].shape[0]), parts(k), None if v is None else parts(v))

    def token_bytes(self) -> float:
        """Bytes per token of these parts."""
        size = {"uint32": 4, "float32": 4, "float16": 2, "bfloat16": 2}
        return self.heads * sum(d * size.get(dt, 4) / per for d, dt, per in self.keys + (self.values or ()))


class LayerCache:
    """One layer of one agent. Implements the cache protocol mlx-lm models use.

    `expect`, when the model runner sets it, is the `StoredShape` the body
    segments of this layer of the model hold: restored files are checked against it."""

    group_size = GROUP_SIZE

    def __init__(self, mode: int | str = DEFAULT_KV, window: int | None = None, rotate_keys: bool = False):
        """`mode` is a name of KV_MODES or a bit width (4 -> q4, 8, 16); `rotate_keys`
        (older spelling of q4k) turns q4 into q4k."""
        mode = kv_mode(mode)
        if rotate_keys:
            if mode != "q4":
                raise ValueError("rotated keys are a 4-bit mode (q4k)")
            mode = "q4k"
        self.mode = mode
        self.bits, self.rotate_keys, self.encoding = KV_MODES[mode]
        self.window = window
        self.offset = 0  # absolute position of the next token
        self.start = 0  # absolute position of the first stored token
        self.segments: list[Segment] = []
        self.sinks: tuple[mx.array, mx.array] | None = None  # q4c: exact keys, values of positions [0, n)
        self.fresh: tuple[int, mx.array] | None = None  # q4c: (first position, 8-bit keys) of the last append, until attention reads it
        self.expect: StoredShape | None = None
        self.clean = 0  # positions [start, clean) hold the bytes they held at the last `take_changed`
        self._sink_arrays = None  # (sinks, dtype, keys transposed, values) for attention, rebuilt when either changes

    # -- mlx-lm cache protocol -------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array | None):
        """Append (1, H, L, D) keys/values; returns None, None (attention is ours)."""
        if keys.shape[0] != 1:
            raise ValueError("LayerCache holds one sequence; batch through BatchView")
        self.append_dense(keys[0], None if values is None else values[0])
        return None, None

    def make_mask(self, *args, **kwargs):
        return None  # `attend` builds the exact mask from stored positions

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments) + (0 if self.sinks is None else sum(x.nbytes for x in self.sinks))

    def bytes_for(self, n: int) -> int:
        """Upper bound of this layer's bytes holding n tokens, capacity included, from the shapes
        the model stores (`expect`; 0 when unknown): whole 256-token blocks; for q4c the body's
        blocks, a tail of up to KEY_GROUP tokens at 8 bits, and the sinks."""
        e = self.expect
        if e is None:
            return 0
        if self.encoding != "q4c" or e.values is None:  # a latent layer turns q4 at its first append
            return math.ceil(-(-n // BLOCK_TOKENS) * BLOCK_TOKENS * e.token_bytes())
        d, dv = e.keys[0][0] * 8, e.values[0][0] * 8

        def q8(x):
            return ((x // 4, "uint32", 1), (x // GROUP_SIZE, "float16", 1), (x // GROUP_SIZE, "float16", 1))

        tail = StoredShape(e.heads, q8(d), q8(dv))
        body = -(-(n // KEY_GROUP * KEY_GROUP) // BLOCK_TOKENS) * BLOCK_TOKENS
        sinks = e.heads * SINK_TOKENS * (d + dv) * 2
        return math.ceil(body * e.token_bytes() + (KEY_GROUP if n else 0) * tail.token_bytes()) + sinks

    @property
    def sink_count(self) -> int:
        """How many leading positions `sinks` overrides (0 once a window moved past them)."""
        return 0 if self.sinks is None or self.start else self.sinks[0].shape[-2]

    def sink_arrays(self, dtype) -> tuple[mx.array, mx.array]:
        """The sinks as attention multiplies them: keys (1, H, D, n) transposed and values (1, H, n, Dv)
        of `dtype`; converted once per set of sinks, not in every decode step."""
        cached = self._sink_arrays
        if cached is None or cached[0] is not self.sinks or cached[1] != dtype:
            k, v = self.sinks
            cached = (self.sinks, dtype, k[None].astype(dtype).swapaxes(-1, -2), v[None].astype(dtype))
            self._sink_arrays = cached
        return cached[2], cached[3]

    @property
    def rotate_values(self) -> bool:
        """q4c stores values Hadamard-rotated (every run, so attention sums them alike) and
        rotates the attention output back; a latent layer (q4 encoding) does not."""
        return self.encoding == "q4c"

    # -- storage ----------------------------------------------------------
    @property
    def stored(self) -> int:
        return sum(s.length for s in self.segments)

    def append_dense(self, keys: mx.array, values: mx.array | None) -> None:
        """Append (H, n, D) keys and values (values None for a latent cache), encoded in this layer's mode."""
        self._drop_outside_window(self.offset)
        if self.rotate_keys:
            keys = rotate(keys)
        if self.encoding == "q4c" and values is None:
            self.encoding = "q4"  # a latent cache: one vector is key and value (module doc)
        if self.encoding != "q4c":
            self.append(encode(keys, self.encoding, "k"), None if values is None else encode(values, self.encoding, "v"))
            return
        values = rotate(values)
        n_sink = max(0, min(SINK_TOKENS - self.offset, keys.shape[-2])) if self.start == 0 else 0
        if n_sink:
            new = (keys[..., :n_sink, :].astype(mx.float16), values[..., :n_sink, :].astype(mx.float16))
            self.sinks = new if self.sinks is None else tuple(mx.concatenate([a, b], axis=-2) for a, b in zip(self.sinks, new))
        self._append_grouped(keys, values)

    def _append_grouped(self, keys: mx.array, values: mx.array) -> None:
        """q4c: new tokens join the tail (8 bits until their group fills: one cheap quantize per
        decode step); when groups fill, the tail is decoded and every whole KEY_GROUP goes to the
        body (keys per channel, values symmetric)."""
        end = self.offset + keys.shape[-2]
        last = self.segments[-1] if self.segments else None
        tail = last if last is not None and last.encoding == "q8" and not last.shared else None
        first = self.offset - (tail.length if tail else 0)  # a group edge
        full = end // KEY_GROUP * KEY_GROUP - first
        self.fresh = None
        if full <= 0:  # no group fills: one more 8-bit row (a decode step)
            self.append(encode(keys, "q8", "k"), encode(values, "q8", "v"), "q8")
            return
        if tail is not None:
            k0, v0 = tail.view()
            keys = mx.concatenate([decode(k0, "q8", "k", keys.dtype), keys], axis=-2)
            values = mx.concatenate([decode(v0, "q8", "v", values.dtype), values], axis=-2)
            self.segments.pop()
            self.offset = first
            self.clean = min(self.clean, first)
        # What a query of this append sees of its own key group: 8 bits, as in a decode step
        # (attention.py); kept until the next append, never stored.
        self.fresh = (first, decode(encode(keys, "q8"), "q8", "k", mx.float32))
        k = keys[..., :full, :]
        n_sink = self.sink_count - first
        if n_sink > 0:  # sink rows take the next token's key: the exact sinks are read instead
            k = mx.concatenate([mx.repeat(k[..., n_sink : n_sink + 1, :], n_sink, axis=-2), k[..., n_sink:, :]], axis=-2)
        self.append(encode(k, "q4c", "k"), encode(values[..., :full, :], "q4c", "v"), "q4c")
        if keys.shape[-2] > full:
            self.append(encode(keys[..., full:, :], "q8", "k"), encode(values[..., full:, :], "q8", "v"), "q8")

    def append(self, k: tuple, v: tuple | None, encoding: str | None = None) -> None:
        """Append already-encoded tokens to the last segment (a new one where it is shared or of another encoding)."""
        encoding = encoding or self.encoding
        n = _tokens(k)
        last = self.segments[-1] if self.segments else None
        block = KEY_GROUP if self.encoding == "q4c" and encoding == "q8" else BLOCK_TOKENS  # a tail never holds a whole group
        if last is None or last.shared or last.encoding != encoding:
            last = Segment(*self._alloc(k, v, -(-n // block) * block), length=0, encoding=encoding)
            self.segments.append(last)
        elif last.length + n > _tokens(last.keys):
            # to the next block boundary, not a whole block more: a restored segment holds exactly its tokens
            grow = -(-(last.length + n) // block) * block - last.length
            kk, vv = last.view()
            ek, ev = self._alloc(k, v, grow)
            last.keys = _concat(kk, ek)
            last.values = None if vv is None else _concat(vv, ev)
        a, b = last.length, last.length + n
        for dst, src in zip(last.keys, k):
            _write(dst, src, a, b, _tokens(last.keys))
        if v is not None:
            for dst, src in zip(last.values, v):
                _write(dst, src, a, b, _tokens(last.values))
        last.length = b
        self.offset += n

    @staticmethod
    def _alloc(k: tuple, v: tuple | None, cap: int):
        def z(t):
            n = _tokens(t)
            return tuple(mx.zeros((*x.shape[:-2], cap * x.shape[-2] // n, x.shape[-1]), x.dtype) for x in t)

        return z(k), (None if v is None else z(v))

    def skip_to(self, pos: int) -> None:
        """Forget the stored tokens and go on at absolute position `pos`: a window layer handed
        more tokens than its window (cards.inject) stores only those it will ever read."""
        if pos < self.offset:
            raise ValueError(f"position {pos} is before this layer's next position {self.offset}")
        self.segments, self.start, self.offset = [], pos, pos
        self.sinks = self.fresh = None
        self.clean = 0

    def _drop_outside_window(self, next_pos: int) -> None:
        """Drop whole leading blocks no query at or after `next_pos` can see."""
        if self.window is None or not self.segments:
            return
        keep_from = next_pos - self.window + 1
        drop = (keep_from - self.start) // BLOCK_TOKENS * BLOCK_TOKENS
        if drop > 0:
            self._drop_front(drop)

    def _drop_front(self, n: int) -> None:
        """Drop the first n stored tokens: whole segments, and a cut of the first kept one (at a q4c group edge)."""
        out, pos = [], 0
        for s in self.segments:
            cut = max(0, n - pos)
            pos += s.length
            if cut >= s.length:
                continue
            if s.encoding == "q4c":
                cut = cut // KEY_GROUP * KEY_GROUP
            if cut:
                k, v = s.view()
                s = Segment(slice_tokens(k, cut, s.length), None if v is None else slice_tokens(v, cut, s.length), s.length - cut, encoding=s.encoding)
            out.append(s)
        self.start += self.stored - sum(s.length for s in out)
        self.segments = out
        self.clean = 0  # a window moved: its layer is saved whole (store/segments.py)
        if self.start:
            self.sinks = None

    def contiguous(self) -> tuple[tuple, tuple | None]:
        """All stored tokens as one (k, v) pair (one encoding: not for q4c, whose segments differ)."""
        if len({s.encoding for s in self.segments}) > 1:
            raise ValueError("segments of several encodings have no single contiguous form")
        views = [s.view() for s in self.segments]
        k = views[0][0]
        v = views[0][1]
        for kk, vv in views[1:]:
            k = _concat(k, kk)
            v = None if v is None else _concat(v, vv)
        return k, v

    def dense(self, first: int, last: int, dtype=mx.float16) -> tuple[mx.array, mx.array | None]:
        """Keys and values of absolute positions [first, last) as (H, n, D) floats, as attention
        sees them: decoded and, for q4k, rotated back. Values None for a latent cache."""
        if not self.start <= first <= last <= self.offset:
            raise ValueError(f"positions [{first}, {last}) are not stored (layer holds [{self.start}, {self.offset}))")
        ks, vs, pos = [], [], self.start
        for s in self.segments:
            a, b = max(first, pos) - pos, min(last, pos + s.length) - pos
            if a < b:
                k, v = s.dense(a, b, mx.float32)
                ks.append(k)
                vs.append(v)
            pos += s.length
        if not ks:
            return None, None
        k = mx.concatenate(ks, axis=-2)
        v = None if vs[0] is None else mx.concatenate(vs, axis=-2)
        n = min(self.sink_count, last) - first
        if n > 0:
            k = mx.concatenate([self.sinks[0][..., first : first + n, :].astype(k.dtype), k[..., n:, :]], axis=-2)
            v = mx.concatenate([self.sinks[1][..., first : first + n, :].astype(v.dtype), v[..., n:, :]], axis=-2)
        if self.rotate_keys:
            k = rotate(k)  # the orthonormal Walsh-Hadamard matrix is its own inverse
        if v is not None and self.rotate_values:
            v = rotate(v)
        return k.astype(dtype), None if v is None else v.astype(dtype)

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
        """Keep the first n absolute tokens. A q4c group cut in the middle keeps its
        whole groups quantized and turns the rest of the kept tokens into the fp16 tail."""
        if not self.can_trim_to(n):
            raise ValueError(f"cannot trim layer cache to {n} tokens (stored from {self.start})")
        self.fresh = None
        self.clean = min(self.clean, n)
        if n == 0:
            self.segments, self.start, self.offset, self.sinks = [], 0, 0, None
            return
        if self.sinks is not None and n < self.sinks[0].shape[-2]:
            self.sinks = tuple(x[..., :n, :] for x in self.sinks)
        keep = n - self.start
        out, seen, tail = [], 0, None
        for s in self.segments:
            if seen + s.length <= keep:
                out.append(s)
            elif seen < keep:
                cut = keep - seen
                if s.encoding == "q4c" and cut % KEY_GROUP:
                    whole = cut // KEY_GROUP * KEY_GROUP
                    tail = s.dense(whole, cut, mx.float32)
                    cut = whole
                if cut:
                    k, v = s.view()
                    k, v = slice_tokens(k, 0, cut), (None if v is None else slice_tokens(v, 0, cut))
                    # copy-on-write: a shared segment is never written to
                    out.append(Segment(tuple(mx.array(x) for x in k), None if v is None else tuple(mx.array(x) for x in v), cut, encoding=s.encoding))
            seen += s.length
        self.segments = out
        self.offset = n
        if tail is not None:
            self.offset -= tail[0].shape[-2]
            self.clean = min(self.clean, self.offset)
            self.append(encode(tail[0], "q8", "k"), encode(tail[1], "q8", "v"), "q8")

    def fork(self) -> "LayerCache":
        """An independent copy that shares the stored arrays: a write goes to the
        writer's own array object (MLX arrays are values), so neither copy sees
        the other's later tokens, and nothing is copied until one writes."""
        other = copy.copy(self)
        other.segments = [replace(s, keys=tuple(mx.array(x) for x in s.keys),
                                  values=None if s.values is None else tuple(mx.array(x) for x in s.values)) for s in self.segments]
        return other

    # -- attention ---------------------------------------------------------
    def attend(self, queries: mx.array, scale: float, values_from_keys=None) -> mx.array:
        """Softmax attention of (1, Hq, L, D) queries over all stored tokens (attention.py)."""
        return attention.attend(self, queries, scale, values_from_keys)

    # -- persistence helpers -----------------------------------------------
    def persisted_span(self) -> tuple[int, int]:
        """(first, last) absolute positions worth saving: a window layer keeps `window` tokens
        (from a segment or q4c group edge, so what is saved decodes on its own)."""
        if self.window is None:
            return self.start, self.offset
        want, pos = max(self.start, self.offset - self.window), self.start
        for s in self.segments:
            if pos + s.length > want:
                if s.encoding == "q4c":
                    return pos + (want - pos) // KEY_GROUP * KEY_GROUP, self.offset
                return want, self.offset
            pos += s.length
        return want, self.offset

    def take_changed(self) -> int:
        """The first position whose stored bytes changed since the last call (appends
        included), and start counting again: a save writes only from there."""
        first, self.clean = min(self.clean, self.offset), self.offset
        return first

    def stored_segments(self, first: int) -> list[tuple[str, tuple, tuple | None]]:
        """(encoding, keys, values) of the stored tokens from `first` on, one entry per run of one encoding."""
        runs, pos = [], self.start
        for s in self.segments:
            if pos + s.length > first:
                cut = max(first - pos, 0)
                k, v = s.view()
                k, v = slice_tokens(k, cut, s.length), (None if v is None else slice_tokens(v, cut, s.length))
                if runs and runs[-1][0] == s.encoding:
                    e, k0, v0 = runs[-1]
                    runs[-1] = (e, _concat(k0, k), None if v is None else _concat(v0, v))
                else:
                    runs.append((s.encoding, k, v))
            pos += s.length
        return runs

    @classmethod
    def restore(cls, mode: int | str, window: int | None, start: int, offset: int, k: tuple, v: tuple | None,
                rotate_keys: bool = False, runs: list[tuple[str, tuple, tuple | None]] | None = None,
                sinks: tuple[mx.array, mx.array] | None = None) -> "LayerCache":
        """A layer holding [start, offset): one body run (k, v), or `runs` of (encoding, k, v) in
        order, and the q4c `sinks`."""
        c = cls(mode, window, rotate_keys)
        c.sinks = sinks
        if runs is None:
            runs = [(c.encoding, k, v)] if k else []
        if start + sum(_tokens(k) for _, k, _ in runs) != offset:
            raise ValueError("layer cache span does not end at its offset")
        c.start = start
        c.offset = offset
        c.segments = [Segment(k, v, _tokens(k), encoding=e) for e, k, v in runs]
        c.clean = 0
        if any(e == "q4" for e, _, _ in runs) and c.encoding == "q4c":
            c.encoding = "q4"  # a latent layer
        return c


def _write(dst: mx.array, src: mx.array, a: int, b: int, n: int) -> None:
    """dst[tokens a:b] = src, for parts whose rows are groups of tokens too."""
    per = n // dst.shape[-2]
    dst[..., a // per : -(-b // per), :] = src


@dataclass
class AgentCache:
    """One agent's context: token ids plus one LayerCache per layer."""

    layers: list[LayerCache]
    tokens: list[int] = field(default_factory=list)
    # Tokens from this position on were not prefilled by this agent (an injected cache
    # card, an imported archive): they are never made into a shared prefix block.
    foreign_from: int | None = None

    def own_tokens(self, n: int) -> int:
        """How many of the first `n` tokens the agent prefilled itself."""
        return n if self.foreign_from is None else min(n, self.foreign_from)

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

    def take_changed(self) -> list[int]:
        """Per layer, the first position changed since the last call (LayerCache.take_changed)."""
        return [layer.take_changed() for layer in self.layers]

    def trim_to(self, n: int) -> None:
        for layer in self.layers:
            layer.trim_to(n)
        del self.tokens[n:]

    def fork(self) -> "AgentCache":
        """A second row that goes on from this context (`n > 1` choices of one
        prompt, scheduler.py); it belongs to no agent and is never saved."""
        return AgentCache([layer.fork() for layer in self.layers], list(self.tokens), self.foreign_from)


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
