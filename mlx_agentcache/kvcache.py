"""Per-agent KV caches in quantized 256-token blocks.

An `AgentCache` is one agent's context: the token ids it has seen and, for
every layer, a `LayerCache`. A layer cache stores keys and values as a list
of segments. Only the last segment is writable; earlier ones may be shared
with other agents (a common system prompt) and are never modified: trimming
into a shared segment copies what is kept (copy-on-write).

Attention over the segments is computed here (`LayerCache.attend`), reading
the quantized codes directly with `mx.quantized_matmul`; on an Apple GPU a
decode step runs the fused Q4 attention kernel of kernels/ over the block
buffer in place. (On the CPU backend, prefill dequantizes one layer's
blocks for BLAS and takes the softmax in NumPy: both much faster there.) mlx-lm's attention
modules call `scaled_dot_product_attention(..., cache=cache)`; the runner
routes that call to `attend` for our caches, so mlx-lm's model definitions
are used unchanged.

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
import numpy as np

from . import q4
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


def rotate(x: mx.array) -> mx.array:
    """Orthonormal Walsh-Hadamard transform of the last axis, in blocks of its largest power-of-two factor.

    Applied to both queries and keys it leaves every score unchanged.
    """
    d = x.shape[-1]
    p = d & -d
    y = mx.hadamard_transform(x.reshape(*x.shape[:-1], d // p, p), scale=p**-0.5)
    return y.reshape(x.shape)


def encode(x: mx.array, bits: int) -> tuple:
    """Keys or values (..., T, D) -> stored form: Q4/Q8 triple or a 1-tuple of fp16."""
    if bits == 16:
        return (x.astype(mx.float16),)
    if bits == 4:
        return tuple(q4.quantize(x))
    return tuple(mx.quantize(x.astype(mx.float16), group_size=GROUP_SIZE, bits=bits))


def decode(t: tuple, bits: int, dtype=mx.float32) -> mx.array:
    if bits == 16:
        return t[0].astype(dtype)
    return mx.dequantize(*t, group_size=GROUP_SIZE, bits=bits).astype(dtype)


def _on_cpu() -> bool:
    """MLX's CPU quantized_matmul is ~5x slower than dequantize + BLAS matmul."""
    return mx.default_device() == mx.cpu


EXPAND_MIN_QUERIES = 8  # decode steps (fewer query positions) keep quantized_matmul on CPU too


def _expand(n_queries: int) -> bool:
    """Dequantize for BLAS on CPU only for prefill: a decode step would expand the whole
    cache to read it once, which made Q4 decode ~1.2x slower than fp16 (bench_decode)."""
    return n_queries >= EXPAND_MIN_QUERIES and _on_cpu()


def _expanded(t: tuple, bits: int, dtype) -> mx.array:
    """One layer's blocks as a transient float array (the same codes, exact scale*q+bias)."""
    if bits == 16:
        return t[0].astype(dtype)
    packed, scales, biases = t
    return mx.dequantize(packed, scales.astype(dtype), biases.astype(dtype), group_size=GROUP_SIZE, bits=bits)


def _softmax(s: mx.array, mask: mx.array | None, expand: bool) -> mx.array:
    """Softmax over the last axis of scores (B, H, rows, T), `mask` (rows, T) True where allowed.

    For prefill on the CPU backend this runs in NumPy: MLX's CPU `exp` and `where` are
    scalar loops (~24 ns a value for exp, NumPy's vectorized one ~1.6 ns), and a 2K-token
    prefill spent over half its time in them."""
    if not (expand and s.dtype == mx.float32):
        if mask is not None:
            s = mx.where(mask, s, mx.finfo(s.dtype).min)
        return mx.softmax(s, axis=-1, precise=True)
    x = np.asarray(s)  # evaluates s; no copy
    e = x.copy() if mask is None else np.where(np.asarray(mask), x, np.float32(-np.inf))
    e -= e.max(axis=-1, keepdims=True)  # every row has an allowed key: its own position
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return mx.array(e)


def _scores(q: mx.array, k: tuple, bits: int, expand: bool) -> mx.array:
    if bits == 16 or expand:
        return q @ _expanded(k, bits, q.dtype).swapaxes(-1, -2)
    return mx.quantized_matmul(q, *k, transpose=True, group_size=GROUP_SIZE, bits=bits)


def _mix(p: mx.array, v: tuple, bits: int, expand: bool) -> mx.array:
    if bits == 16 or expand:
        return p @ _expanded(v, bits, p.dtype)
    return mx.quantized_matmul(p, *v, transpose=False, group_size=GROUP_SIZE, bits=bits)


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


class LayerCache:
    """One layer of one agent. Implements the cache protocol mlx-lm models use."""

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

    def empty(self) -> bool:
        return self.stored == 0

    # -- storage ----------------------------------------------------------
    @property
    def stored(self) -> int:
        return sum(s.length for s in self.segments)

    def append(self, k: tuple, v: tuple | None) -> None:
        n = _tokens(k)
        last = self.segments[-1] if self.segments else None
        if last is None or last.shared:
            last = Segment(*self._alloc(k, v, n), length=0)
            self.segments.append(last)
        elif last.length + n > _tokens(last.keys):
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
    def _alloc(k: tuple, v: tuple | None, n: int):
        cap = -(-n // BLOCK_TOKENS) * BLOCK_TOKENS

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
        """Softmax attention of (1, Hq, L, D) queries over all stored tokens.

        `values_from_keys`, when given, maps stored keys to values (for caches
        that store one latent per token, like DeepSeek's MLA).
        """
        B, Hq, L, D = queries.shape
        if self.rotate_keys:
            if values_from_keys is not None:
                raise ValueError("rotated keys cannot serve as values (latent caches use q4, not q4k)")
            queries = rotate(queries)
        if self._fused_decode_applies(L, values_from_keys):
            s = self.segments[0]
            kq, vq = (q4.Q4(*(x[None] for x in t)) for t in (s.keys, s.values))
            return q4.decode_attention(queries, kq, vq, scale, mx.array([s.length], dtype=mx.int32))
        views = [s.view() for s in self.segments]
        Hkv = views[0][0][0].shape[0]
        rep = Hq // Hkv
        # The query heads sharing a kv head become rows of one matrix product per kv head.
        q = (queries * scale).reshape(B, Hkv, rep * L, D)
        expand = _expand(L)
        scores = [_scores(q, tuple(x[None] for x in k), self.bits, expand) for k, _ in views]
        s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1)
        T = s.shape[-1]
        mask = self._mask(L, T)
        if mask is not None and rep > 1:  # rows are (query head, position) pairs
            mask = mx.broadcast_to(mask[None], (rep, L, T)).reshape(rep * L, T)
        p = _softmax(s, mask, expand)
        out, a = None, 0
        for k, v in views:
            t = _tokens(k)
            pv = p[..., a : a + t]
            v = v if values_from_keys is None else values_from_keys(k)
            o = _mix(pv, tuple(x[None] for x in v), self.bits, expand)
            out = o if out is None else out + o
            a += t
        return out.reshape(B, Hq, L, -1)

    def _fused_decode_applies(self, L: int, values_from_keys) -> bool:
        """A decode step on an Apple GPU reads the Q4 blocks in place with the fused kernel.

        It takes one contiguous segment (the whole buffer, spare capacity
        included, limited by a length: no copy) and no mask; shared-prefix
        segments, latent caches and window layers past their window take the
        general path.
        """
        return (L == 1 and self.bits == 4 and values_from_keys is None and len(self.segments) == 1
                and self._mask(1, self.stored) is None and q4.fused_decode_available())

    def _mask(self, L: int, T: int) -> mx.array | None:
        """Causal (and window) mask for the L newest queries over T stored keys."""
        q0 = self.offset - L
        if L == 1 and (self.window is None or T <= self.window):
            return None
        qpos = mx.arange(q0, self.offset)[:, None]
        kpos = mx.arange(self.start, self.start + T)[None]
        m = kpos <= qpos
        if self.window is not None:
            m = m & (kpos > qpos - self.window)
        return m

    # -- persistence helpers -----------------------------------------------
    def persisted_span(self) -> tuple[int, int]:
        """(first, last) absolute positions worth saving: a window layer keeps `window` tokens."""
        first = self.start if self.window is None else max(self.start, self.offset - self.window)
        return first, self.offset

    def export(self) -> tuple[int, tuple, tuple | None]:
        """Stored tokens to persist, trimmed to the window: (start, keys, values)."""
        first, _ = self.persisted_span()
        k, v = self.contiguous()
        cut = first - self.start
        return first, _slice(k, cut, _tokens(k)), (None if v is None else _slice(v, cut, _tokens(v)))

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

    @property
    def nblocks(self) -> int:
        return sum(-(-layer.stored // BLOCK_TOKENS) for layer in self.layers)

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
