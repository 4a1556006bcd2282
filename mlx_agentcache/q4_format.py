"""The Q4 block format shared by memory, disk and kernels, and its portable MLX implementation.

A tensor of shape (..., D) is quantized group-wise along its last axis:
groups of GROUP_SIZE elements, 4 bits each, with one fp16 scale and one fp16
bias per group (x ~= scale * q + bias). Eight 4-bit codes are packed into one
little-endian uint32, element i of a group of eight in bits 4*i..4*i+3. This is
exactly MLX's affine `mx.quantize` layout, so the portable path is
`mx.quantize` itself, and `decode_attention_q4` (MLX ops) is the reference the
fused Metal kernel must match. Which backend runs is decided in `q4`; the
custom kernels of kernels/ (`metal_kernels`) produce the bytes of MLX's CPU
`mx.quantize`, so a block is encoded identically on every machine. See
kernels/README.md for the byte layout.

The default cache mode, `q4c`, stores keys and values differently (same 4
bits, better placed; docs/quality.md):

* keys per channel: each channel of a head is quantized over groups of
  KEY_GROUP tokens (affine, fp16 scale and bias per channel and group), as
  KIVI does, because keys have outlier channels that a per-token group
  cannot absorb. The codes stay one row per token, packed along the head dim
  exactly as above, so a token's row is read like a Q4 row; the scales and
  biases are (..., tokens / KEY_GROUP, D).
* values per token, symmetric in groups of VALUE_GROUP (llama.cpp's q4_0
  rule): one fp16 scale `d` per group, `x ~= d * (code - 8)`.

Both are 4.25 / 4.5 bits per value. `quantize_keys` / `quantize_values` are
the portable implementations the Metal kernels must reproduce bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import mlx.core as mx

BITS = 4
GROUP_SIZE = 64
BLOCK_TOKENS = 256
STORE_DTYPE = mx.float16
KEY_GROUP = 128   # q4c: tokens per channel group of keys
VALUE_GROUP = 32  # q4c: values per symmetric group


class Q4(NamedTuple):
    """Packed codes (uint32) with fp16 scales and biases, one per group."""

    packed: mx.array
    scales: mx.array
    biases: mx.array

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes


def quantize(x: mx.array, group_size: int = GROUP_SIZE, bits: int = BITS, stream=None) -> Q4:
    """Quantize along the last axis with mx.quantize; input is cast to fp16 first so scales are fp16."""
    return Q4(*mx.quantize(x.astype(STORE_DTYPE), group_size=group_size, bits=bits, stream=stream))


def decode_attention_q4(queries: mx.array, kq: Q4, vq: Q4, scale: float,
                        lengths: mx.array | None = None) -> mx.array:
    """Attention of queries over Q4 keys/values with MLX ops: the reference the kernel must match.

    queries (B, H, L, D); kq, vq hold (B, H_kv, N, D) keys and (B, H_kv, N, Dv)
    values, H a multiple of H_kv (query head h reads kv head h // (H / H_kv)).
    `lengths` (B,) limits sequence b to its first lengths[b] cache rows (no
    causal mask among the L queries); a sequence of length 0 gives zeros.
    Scores, softmax and the weighted sum are float32; the result has the
    queries' dtype, shape (B, H, L, Dv).
    """
    b, h, l, d = queries.shape
    n_kv, n = kq.packed.shape[1], kq.packed.shape[2]
    q = queries.astype(mx.float32).reshape(b, n_kv, (h // n_kv) * l, d) * scale

    def f32(t: Q4) -> Q4:
        return Q4(t.packed, t.scales.astype(mx.float32), t.biases.astype(mx.float32))

    s = mx.quantized_matmul(q, *f32(kq), transpose=True, group_size=GROUP_SIZE, bits=BITS)
    if lengths is not None:
        valid = (mx.arange(n)[None, :] < lengths.astype(mx.int32)[:, None])[:, None, None, :]
        s = mx.where(valid, s, -mx.inf)
    p = mx.softmax(s, axis=-1, precise=True)
    o = mx.quantized_matmul(p, *f32(vq), transpose=False, group_size=GROUP_SIZE, bits=BITS)
    if lengths is not None:
        o = mx.where((lengths > 0)[:, None, None, None], o, 0.0)
    return o.reshape(b, h, l, -1).astype(queries.dtype)


def bytes_per_token(n_kv_heads: int, k_dim: int, v_dim: int, bits: int = BITS, group_size: int = GROUP_SIZE) -> int:
    """Bytes one token of one layer occupies (keys + values), codes plus fp16 scale/bias."""

    def one(d: int) -> int:
        return d * bits // 8 + (d // group_size) * 2 * 2

    return n_kv_heads * (one(k_dim) + (one(v_dim) if v_dim else 0))


# -- q4c: channel-wise keys, symmetric values ---------------------------------

_SHIFTS = mx.array([4 * i for i in range(8)], dtype=mx.uint32)


def pack(codes: mx.array) -> mx.array:
    """uint32 codes 0..15 (..., D) -> (..., D/8) words, element 8w+i in bits 4i..4i+3."""
    c = codes.astype(mx.uint32).reshape(*codes.shape[:-1], -1, 8)
    return mx.sum(c << _SHIFTS, axis=-1).astype(mx.uint32)


def unpack(packed: mx.array) -> mx.array:
    """(..., D/8) words -> (..., D) uint32 codes."""
    return ((packed[..., None] >> _SHIFTS) & 15).reshape(*packed.shape[:-1], -1)


def quantize_keys(x: mx.array, stream=None) -> tuple[mx.array, mx.array, mx.array]:
    """Keys (..., T, D), T a multiple of KEY_GROUP -> (codes (..., T, D/8), scales, biases (..., T/KEY_GROUP, D)).

    Each channel's KEY_GROUP tokens form one affine group with exactly the
    rule of `mx.quantize` (so of the Q4 kernel); only the packing differs:
    codes are packed along the head dim, one row per token."""
    *lead, t, d = x.shape
    if t % KEY_GROUP:
        raise ValueError(f"{t} key tokens is not a whole number of {KEY_GROUP}-token groups")
    xt = x.astype(STORE_DTYPE).swapaxes(-1, -2)  # (..., D, T): groups run along tokens
    packed_t, scales, biases = mx.quantize(xt, group_size=KEY_GROUP, bits=BITS, stream=stream)
    codes = unpack(packed_t).swapaxes(-1, -2)  # (..., T, D)
    return pack(codes), scales.swapaxes(-1, -2), biases.swapaxes(-1, -2)


def dequantize_keys(k: tuple, dtype=mx.float32) -> mx.array:
    """(codes, scales, biases) of `quantize_keys` -> keys (..., T, D)."""
    packed, scales, biases = k
    *lead, t, _ = packed.shape
    g = scales.shape[-2]
    codes = unpack(packed).astype(dtype).reshape(*lead, g, t // g, -1)
    out = codes * scales.astype(dtype)[..., None, :] + biases.astype(dtype)[..., None, :]
    return out.reshape(*lead, t, -1)


def key_scores(q: mx.array, k: tuple) -> mx.array:
    """q (..., M, D) times channel-quantized keys (..., T, D), transposed: (..., M, T), without expanding the keys.

    score = sum_c (q_c s_gc) code_tc + sum_c q_c b_gc: the queries are scaled per
    group of tokens and multiply the bare codes (a quantized matmul with unit
    scales); the bias term is one product per group."""
    packed, scales, biases = k
    *lead, t, w = packed.shape
    g = scales.shape[-2]
    qs = q[..., None, :, :] * scales.astype(q.dtype)[..., :, None, :]  # (..., G, M, D)
    codes = packed.reshape(*lead, g, t // g, w)
    ones, zeros = _unit_parameters((*lead, g, t // g, w * 8 // GROUP_SIZE), q.dtype)
    s = mx.quantized_matmul(qs, codes, ones, zeros, transpose=True, group_size=GROUP_SIZE, bits=BITS)
    s = s + (q @ biases.astype(q.dtype).swapaxes(-1, -2)).swapaxes(-1, -2)[..., None]  # (..., G, M, t/g)
    return s.swapaxes(-3, -2).reshape(*lead, q.shape[-2], t)


def nibble_halves(packed: mx.array) -> tuple[mx.array, mx.array]:
    """(..., D/8) words -> the codes of the even channels and of the odd ones, (..., D/2) uint8 each.

    A packed byte holds two neighbouring channels (`pack`'s order), the even one in its
    low nibble: two cheap byte operations, where `unpack` interleaves the channels."""
    b = packed.view(mx.uint8)
    return b & 15, b >> 4


def by_parity(x: mx.array) -> mx.array:
    """The last axis reordered: even channels, then odd ones (the order `nibble_halves` gives)."""
    return mx.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def key_scores_unpacked(q: mx.array, k: tuple) -> mx.array:
    """`key_scores` as float matrix products, for backends where those beat `quantized_matmul`
    with few query rows (MLX's CPU: 0.18 against 0.60 ms a layer for SmolLM2 at 1K tokens).

    Each half of `nibble_halves` is one float matrix of bare codes per token group, which
    the even or odd half of the group-scaled queries multiplies."""
    packed, scales, biases = k
    *lead, t, w = packed.shape
    g = scales.shape[-2]
    qs = q[..., None, :, :] * scales.astype(q.dtype)[..., :, None, :]  # (..., G, M, D)
    even, odd = (c.reshape(*lead, g, t // g, w * 4).astype(q.dtype).swapaxes(-1, -2) for c in nibble_halves(packed))
    s = qs[..., 0::2] @ even + qs[..., 1::2] @ odd
    s = s + (q @ biases.astype(q.dtype).swapaxes(-1, -2)).swapaxes(-1, -2)[..., None]
    return s.swapaxes(-3, -2).reshape(*lead, q.shape[-2], t)


def key_scores_dequantized(q: mx.array, k: tuple) -> mx.array:
    """`key_scores` through a float copy of the keys and one matrix product: on MLX's CPU the
    fastest form for prefill (8B geometry, 4K tokens, 80 query rows: 13.6 ms a layer,
    against 17.7 through `dequantize_keys` and 19 for `key_scores_unpacked`).

    The copy is built in `by_parity` channel order, which needs no interleaving; the
    queries take the same order, and a dot product does not depend on it."""
    packed, scales, biases = k
    *lead, t, w = packed.shape
    g = scales.shape[-2]
    codes = mx.concatenate(nibble_halves(packed), axis=-1).reshape(*lead, g, t // g, w * 8).astype(q.dtype)
    keys = codes * by_parity(scales).astype(q.dtype)[..., None, :] + by_parity(biases).astype(q.dtype)[..., None, :]
    return by_parity(q) @ keys.reshape(*lead, t, -1).swapaxes(-1, -2)


@functools.lru_cache(maxsize=64)
def _unit_parameters(shape: tuple, dtype) -> tuple[mx.array, mx.array]:
    """Scales of 1 and biases of 0 (built once per shape: a decode step reuses them)."""
    ones = mx.ones(shape, dtype=dtype)
    zeros = mx.zeros(shape, dtype=dtype)
    mx.eval(ones, zeros)
    return ones, zeros


def quantize_values(x: mx.array, stream=None) -> tuple[mx.array, mx.array]:
    """Values (..., D) -> (codes (..., D/8), scales (..., D/VALUE_GROUP) fp16), symmetric.

    Per group: the element of largest magnitude (first one on a tie, NaN left
    out) gives d = fp16(m / -8), so it decodes exactly as code 0; every value
    gets code rint(x / d) + 8 clamped to [0, 15] (NaN: 0), computed as
    rint(x * (1 / d)) with the fp16 d (a zero d gives codes 8). `stream`: where the
    ops run (the kernels' check compares with the CPU's IEEE arithmetic)."""
    if stream is not None:
        with mx.stream(stream):
            return quantize_values(x)
    *lead, d = x.shape
    g = x.astype(STORE_DTYPE).astype(mx.float32).reshape(*lead, d // VALUE_GROUP, VALUE_GROUP)
    finite = mx.where(mx.isnan(g), 0.0, g)
    peak = mx.take_along_axis(finite, mx.argmax(mx.abs(finite), axis=-1, keepdims=True), axis=-1)
    scale = (peak / -8.0).astype(STORE_DTYPE)
    sf = scale.astype(mx.float32)
    inv = mx.where(sf != 0, 1.0 / mx.where(sf != 0, sf, 1.0), 0.0)
    c = mx.round(g * inv) + 8.0
    codes = mx.where(c > 15.0, 15.0, mx.where(c > 0.0, c, 0.0)).astype(mx.uint32)
    return pack(codes.reshape(*lead, d)), scale.reshape(*lead, d // VALUE_GROUP)


def value_biases(scales: mx.array, dtype=mx.float32) -> mx.array:
    """The affine bias of a symmetric group (-8 d), so MLX's affine kernels read the values."""
    return scales.astype(dtype) * -8.0


def dequantize_values(v: tuple, dtype=mx.float32) -> mx.array:
    packed, scales = v
    return mx.dequantize(packed, scales.astype(dtype), value_biases(scales, dtype), group_size=VALUE_GROUP, bits=BITS)


def mix_values(p: mx.array, v: tuple) -> mx.array:
    """p (..., M, T) times symmetric values (..., T, Dv)."""
    packed, scales = v
    return mx.quantized_matmul(p, packed, scales.astype(p.dtype), value_biases(scales, p.dtype),
                               transpose=False, group_size=VALUE_GROUP, bits=BITS)


def mix_values_unpacked(p: mx.array, v: tuple) -> mx.array:
    """`mix_values` as two float matrix products, one per half of `nibble_halves`, each
    dequantized alone; the two outputs are interleaved back (a copy of M x Dv). On MLX's
    CPU, for prefill, this beats `quantized_matmul` and `dequantize_values`, whose
    `mx.dequantize` costs twice as much (8B geometry, 4K tokens, 80 query rows: 12.9 ms
    a layer against 85 and 17)."""
    packed, scales = v
    *lead, t, _ = packed.shape
    d = scales.astype(p.dtype)[..., None]
    even, odd = (((c.reshape(*lead, t, scales.shape[-1], -1).astype(p.dtype) - 8) * d).reshape(*lead, t, -1) for c in nibble_halves(packed))
    return mx.stack([p @ even, p @ odd], axis=-1).reshape(*p.shape[:-1], -1)


def decode_attention_q4c_ref(queries: mx.array, kq: tuple, vq: tuple, scale: float, lengths: mx.array,
                             exact_k: mx.array | None = None, exact_v: mx.array | None = None, first: int = 0) -> mx.array:
    """Attention of queries over a q4c body and fp16 extra tokens, with MLX ops: the reference of the fused kernel.

    queries (B, H, L, D); kq = (codes (B, H_kv, N, D/8), scales, biases
    (B, H_kv, N/KEY_GROUP, D)), vq = (codes (B, H_kv, N, Dv/8), scales
    (B, H_kv, N, Dv/VALUE_GROUP)); body rows [first, lengths[b]) count;
    exact_k/exact_v (B, H_kv, E, D/Dv) float tokens (sinks and tail, decoded) all
    count. Token order does not matter to attention, so the extra tokens
    are simply more columns. Scores, softmax and the sum are float32.
    """
    b, h, l, d = queries.shape
    n_kv, n = kq[0].shape[1], kq[0].shape[2]
    q = queries.astype(mx.float32).reshape(b, n_kv, (h // n_kv) * l, d) * scale
    s = key_scores(q, kq)
    rows = mx.arange(n)[None, :]
    valid = ((rows < lengths.astype(mx.int32)[:, None]) & (rows >= first))[:, None, None, :]
    s = mx.where(valid, s, -mx.inf)
    if exact_k is not None:
        s = mx.concatenate([s, q @ exact_k.astype(mx.float32).swapaxes(-1, -2)], axis=-1)
    p = mx.softmax(s, axis=-1, precise=True)
    o = mix_values(p[..., :n], vq)
    if exact_k is not None:
        o = o + p[..., n:] @ exact_v.astype(mx.float32)
    else:
        o = mx.where((lengths > first)[:, None, None, None], o, 0.0)
    return o.reshape(b, h, l, -1).astype(queries.dtype)


def q4c_bits_per_value(d: int, dv: int) -> float:
    """Average stored bits per cached key/value element of a full q4c group (codes plus fp16 parameters)."""
    key = BITS + 32 / KEY_GROUP
    value = BITS + 16 / VALUE_GROUP
    return (key * d + value * dv) / (d + dv)
