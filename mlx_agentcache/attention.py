"""Attention over an agent's stored KV blocks: every path in one place.

`attend(layer, queries, scale)` computes softmax attention of a layer's new
queries over the tokens a `LayerCache` stores (kvcache.py), reading the
quantized codes directly:

* a decode step on an Apple GPU runs the fused Q4 kernel of kernels/ over
  the block buffer in place (`q4.decode_attention`);
* otherwise `mx.quantized_matmul` over each segment;
* prefill on the CPU backend dequantizes one layer's blocks for BLAS and
  takes the softmax in NumPy (both much faster there: MLX's CPU `exp` is a
  scalar loop).

mlx-lm's attention modules call `scaled_dot_product_attention(..., cache=cache)`;
the runner routes that call here for our caches, so mlx-lm's model
definitions are used unchanged. `rotate` is the Hadamard rotation of mode
`q4k`: keys are stored rotated and queries rotated the same way.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import q4
from .q4 import GROUP_SIZE


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
    if _fused_decode_applies(layer, L, values_from_keys):
        s = layer.segments[0]
        kq, vq = (q4.Q4(*(x[None] for x in t)) for t in (s.keys, s.values))
        return q4.decode_attention(queries, kq, vq, scale, mx.array([s.length], dtype=mx.int32))
    views = [s.view() for s in layer.segments]
    Hkv = views[0][0][0].shape[0]
    rep = Hq // Hkv
    # The query heads sharing a kv head become rows of one matrix product per kv head.
    q = (queries * scale).reshape(B, Hkv, rep * L, D)
    expand = _expand(L)
    scores = [_scores(q, tuple(x[None] for x in k), layer.bits, expand) for k, _ in views]
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1)
    T = s.shape[-1]
    allowed = mask(layer, L, T)
    if allowed is not None and rep > 1:  # rows are (query head, position) pairs
        allowed = mx.broadcast_to(allowed[None], (rep, L, T)).reshape(rep * L, T)
    p = _softmax(s, allowed, expand)
    out, a = None, 0
    for k, v in views:
        t = _tokens(k)
        pv = p[..., a : a + t]
        v = v if values_from_keys is None else values_from_keys(k)
        o = _mix(pv, tuple(x[None] for x in v), layer.bits, expand)
        out = o if out is None else out + o
        a += t
    return out.reshape(B, Hq, L, -1)


def _fused_decode_applies(layer, L: int, values_from_keys) -> bool:
    """A decode step on an Apple GPU reads the Q4 blocks in place with the fused kernel.

    It takes one contiguous segment (the whole buffer, spare capacity
    included, limited by a length: no copy) and no mask; shared-prefix
    segments, latent caches and window layers past their window take the
    general path.
    """
    return (L == 1 and layer.bits == 4 and values_from_keys is None and len(layer.segments) == 1
            and mask(layer, 1, layer.stored) is None and q4.fused_decode_available())


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
