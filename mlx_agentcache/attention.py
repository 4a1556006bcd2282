"""Attention over an agent's stored KV blocks: every path in one place.

`attend(layer, queries, scale)` computes softmax attention of a layer's new
queries over the tokens a `LayerCache` stores (kvcache.py), reading the
quantized codes directly:

* a decode step on an Apple GPU runs the fused Q4 kernel of kernels/ over
  the block buffer in place (`q4.decode_attention`);
* otherwise `mx.quantized_matmul` over each segment (q4c keys on the CPU:
  their codes as float nibbles for BLAS, `q4_format.key_scores_unpacked`);
* prefill on the CPU backend reads one layer's blocks as float copies for BLAS
  (q4c's through `key_scores_dequantized` and `mix_values_unpacked`) and takes
  the softmax in NumPy (all much faster there: MLX's CPU `dequantize` and
  `quantized_matmul` are slow, its `exp` a scalar loop).

mlx-lm's attention modules call `scaled_dot_product_attention(..., cache=cache)`;
the runner routes that call here for our caches, so mlx-lm's model
definitions are used unchanged. `rotate` is the Hadamard rotation of mode
`q4k` (keys are stored rotated and queries rotated the same way) and of
q4c's values (stored rotated; the output is rotated back).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import q4
from .encodings import decode
from .q4 import GROUP_SIZE, KEY_GROUP


def rotate(x: mx.array) -> mx.array:
    """Orthonormal Walsh-Hadamard transform of the last axis, in blocks of its largest power-of-two factor.

    Applied to both queries and keys it leaves every score unchanged.
    """
    d = x.shape[-1]
    p = d & -d
    y = mx.hadamard_transform(x.reshape(*x.shape[:-1], d // p, p), scale=p**-0.5)
    return y.reshape(x.shape)


def _on_cpu() -> bool:
    """MLX's CPU quantized_matmul is ~5x slower than dequantize + BLAS matmul."""
    return mx.default_device() == mx.cpu


EXPAND_MIN_ROWS = 9  # query rows of one product: query heads per kv head x positions


def _expand(positions: int, rows: int) -> bool:
    """On the CPU, read the blocks as float copies for BLAS when more than one position
    queries them with EXPAND_MIN_ROWS rows or more (`q4_format` measures the forms). A
    decode step keeps the packed codes: a float copy of the whole cache per step costs
    more than it saves (8B geometry at 4K: 233 against 166 ms a step)."""
    return positions > 1 and rows >= EXPAND_MIN_ROWS and _on_cpu()


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


def _scores(q: mx.array, k: tuple, encoding: str, expand: bool) -> mx.array:
    if encoding == "q4c":
        if expand:
            return q4.key_scores_dequantized(q, k)
        return q4.key_scores_unpacked(q, k) if _on_cpu() else q4.key_scores(q, k)
    if encoding == "fp16" or expand:
        return q @ decode(k, encoding, "k", q.dtype).swapaxes(-1, -2)  # a transient float copy of the blocks
    return mx.quantized_matmul(q, *k, transpose=True, group_size=GROUP_SIZE, bits=4 if encoding == "q4" else 8)


def _mix(p: mx.array, v: tuple, encoding: str, expand: bool) -> mx.array:
    if encoding == "q4c":
        return q4.mix_values_unpacked(p, v) if expand else q4.mix_values(p, v)
    if encoding == "fp16" or expand:
        return p @ decode(v, encoding, "v", p.dtype)
    return mx.quantized_matmul(p, *v, transpose=False, group_size=GROUP_SIZE, bits=4 if encoding == "q4" else 8)


def attend(layer, queries: mx.array, scale: float, values_from_keys=None) -> mx.array:
    """Softmax attention of (1, Hq, L, D) queries over all stored tokens.

    `values_from_keys`, when given, maps stored keys to values (for caches
    that store one latent per token, like DeepSeek's MLA).
    """
    B, Hq, L, D = queries.shape
    if layer.rotate_keys:
        if values_from_keys is not None:
            raise ValueError("rotated keys cannot serve as values (latent caches use q4, not q4k)")
        queries = rotate(queries)
    fused = _fused_decode(layer, queries, scale, values_from_keys)
    if fused is not None:
        return rotate(fused) if layer.rotate_values else fused
    segments = layer.segments
    views = [s.view() for s in segments]
    Hkv = views[0][0][0].shape[0]
    rep = Hq // Hkv
    # The query heads sharing a kv head become rows of one matrix product per kv head.
    q = (queries * scale).reshape(B, Hkv, rep * L, D)
    expand = _expand(L, rep * L)
    scores = [_scores(q, tuple(x[None] for x in k), seg.encoding, expand) for seg, (k, _) in zip(segments, views)]
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1)
    s = _own_group_at_8_bits(layer, q, s, L)
    n_sink = layer.sink_count
    if n_sink:  # the exact sinks stand in for the first stored rows
        sink_kt, sink_v = layer.sink_arrays(q.dtype)
        s[..., :n_sink] = q @ sink_kt
    T = s.shape[-1]
    allowed = mask(layer, L, T)
    if allowed is not None and rep > 1:  # rows are (query head, position) pairs
        allowed = mx.broadcast_to(allowed[None], (rep, L, T)).reshape(rep * L, T)
    p = _softmax(s, allowed, expand)
    out, a = None, 0
    if n_sink:
        out = p[..., :n_sink] @ sink_v
        p[..., :n_sink] = 0.0  # the stored rows they stand in for add nothing
    for seg, (k, v) in zip(segments, views):
        t = _tokens(k)
        pv = p[..., a : a + t]
        v = v if values_from_keys is None else values_from_keys(k)
        o = _mix(pv, tuple(x[None] for x in v), seg.encoding, expand)
        out = o if out is None else out + o
        a += t
    out = out.reshape(B, Hq, L, -1)
    return rotate(out) if layer.rotate_values else out


def _own_group_at_8_bits(layer, q: mx.array, s: mx.array, L: int) -> mx.array:
    """q4c: a query reads the keys of its own 128-token group at 8 bits, the way a decode step
    finds them in the tail; a prefill chunk has already quantized whole groups to 4 bits, so
    those scores are taken from the chunk's 8-bit keys (`LayerCache.fresh`) instead."""
    fresh = layer.fresh
    if fresh is None or layer.encoding != "q4c":
        return s
    layer.fresh = None  # read once: the copy is not kept with the cache
    f0, k8 = fresh
    a, n = f0 - layer.start, k8.shape[-2]
    if a < 0 or a + n != s.shape[-1] or n > KEY_GROUP + L:  # not this append's keys
        return s
    qpos = mx.arange(layer.offset - L, layer.offset)[:, None]
    kpos = mx.arange(f0, f0 + n)[None]
    same = (kpos // KEY_GROUP == qpos // KEY_GROUP) & (kpos <= qpos)
    rep = s.shape[-2] // L
    if rep > 1:
        same = mx.broadcast_to(same[None], (rep, L, n)).reshape(rep * L, n)
    s8 = q @ k8[None].astype(q.dtype).swapaxes(-1, -2)
    return mx.concatenate([s[..., :a], mx.where(same, s8, s[..., a:])], axis=-1)


def _fused_decode(layer, queries: mx.array, scale: float, values_from_keys) -> mx.array | None:
    """A decode step on an Apple GPU reads the quantized blocks in place with a fused kernel.

    It takes one contiguous quantized segment (the whole buffer, spare
    capacity included, limited by a length: no copy) and no mask: for q4,
    the segment alone; for q4c, the body (its sink rows skipped) with its
    8-bit tail and exact sinks, which the kernel path merges as one more split. Shared-prefix segments, latent
    caches and window layers past their window take the general path.
    None where it does not apply.
    """
    if queries.shape[2] != 1 or values_from_keys is not None or not q4.fused_decode_available():
        return None
    if mask(layer, 1, layer.stored) is not None:
        return None
    segs = layer.segments
    body = [s for s in segs if s.encoding in ("q4", "q4c")]
    if len(body) != 1:
        return None
    s = body[0]
    length = mx.array([s.length], dtype=mx.int32)
    kq, vq = (tuple(x[None] for x in t) for t in (s.keys, s.values))
    if s.encoding == "q4":
        return q4.decode_attention(queries, q4.Q4(*kq), q4.Q4(*vq), scale, length) if len(segs) == 1 else None
    # q4c: body [q8 tail] plus the sinks, which replace the body's first rows; the tail and the
    # sinks go to the kernel path decoded (float32). The step that fills a group reads it at
    # 8 bits (_own_group_at_8_bits): the general path.
    if segs[0] is not s or len(segs) > 2 or layer.fresh is not None:
        return None
    exact = [(decode(k, x.encoding, "k", mx.float32), decode(v, x.encoding, "v", mx.float32))
             for x in segs[1:] for k, v in [x.view()]]
    if layer.sink_count:
        exact.append(tuple(x.astype(mx.float32) for x in layer.sinks))
    ek = mx.concatenate([k for k, _ in exact], axis=-2)[None] if exact else None
    ev = mx.concatenate([v for _, v in exact], axis=-2)[None] if exact else None
    return q4.decode_attention_q4c(queries, kq, vq, scale, length, ek, ev, first=layer.sink_count)


def mask(layer, L: int, T: int) -> mx.array | None:
    """Causal (and window) mask for the L newest queries over T stored keys."""
    q0 = layer.offset - L
    if L == 1 and (layer.window is None or T <= layer.window):
        return None
    qpos = mx.arange(q0, layer.offset)[:, None]
    kpos = mx.arange(layer.start, layer.start + T)[None]
    m = kpos <= qpos
    if layer.window is not None:
        m = m & (kpos > qpos - layer.window)
    return m


def _tokens(t: tuple) -> int:
    return t[0].shape[-2]
