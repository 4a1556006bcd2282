"""The Q4 block format shared by memory, disk and kernels.

A tensor of shape (..., D) is quantized group-wise along its last axis:
groups of GROUP_SIZE elements, 4 bits each, with one fp16 scale and one fp16
bias per group (x ~= scale * q + bias). Eight 4-bit codes are packed into one
little-endian uint32, element i of a group of eight in bits 4*i..4*i+3. This is
exactly MLX's affine `mx.quantize` layout, so the portable path is
`mx.quantize` itself. See kernels/README.md for the byte layout.
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


def quantize(x: mx.array, group_size: int = GROUP_SIZE, bits: int = BITS) -> Q4:
    """Quantize along the last axis; input is cast to fp16 first so scales are fp16."""
    return Q4(*mx.quantize(x.astype(STORE_DTYPE), group_size=group_size, bits=bits))


def dequantize(q: Q4, group_size: int = GROUP_SIZE, bits: int = BITS, dtype=None) -> mx.array:
    out = mx.dequantize(*q, group_size=group_size, bits=bits)
    return out if dtype is None else out.astype(dtype)


def bytes_per_token(n_kv_heads: int, k_dim: int, v_dim: int, bits: int = BITS, group_size: int = GROUP_SIZE) -> int:
    """Bytes one token of one layer occupies (keys + values), codes plus fp16 scale/bias."""

    def one(d: int) -> int:
        return d * bits // 8 + (d // group_size) * 2 * 2

    return n_kv_heads * (one(k_dim) + (one(v_dim) if v_dim else 0))
