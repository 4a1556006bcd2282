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
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

BITS = 4
GROUP_SIZE = 64
BLOCK_TOKENS = 256
STORE_DTYPE = mx.float16


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
