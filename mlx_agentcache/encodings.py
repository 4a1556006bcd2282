"""How a run of cached tokens is stored: the encodings a segment can have.

* `fp16`: keys and values as they are (a 1-tuple each).
* `q8`, `q4`: MLX's affine groups of 64 along the head dim (codes, fp16
  scales, fp16 biases), 8 or 4 bits.
* `q4c`: keys per channel over 128-token groups, values symmetric in
  groups of 32 (q4_format). Keys and values are stored differently, so
  `part` says which one a tuple holds. (A q4c layer keeps the tokens of
  the group that has not filled yet as `q8`.)

`encode` writes through `q4` (the Metal kernels where checked), `decode`
gives back exactly what attention reads.
"""

from __future__ import annotations

import mlx.core as mx

from . import q4
from .q4 import GROUP_SIZE


def encode(x: mx.array, encoding: str, part: str = "k") -> tuple:
    """Keys (`part` "k") or values ("v") (..., T, D) -> the stored tuple of `encoding`."""
    if encoding == "fp16":
        return (x.astype(mx.float16),)
    if encoding == "q4":
        return tuple(q4.quantize(x))
    if encoding == "q4c":
        return q4.quantize_keys(x) if part == "k" else q4.quantize_values(x)
    return tuple(mx.quantize(x.astype(mx.float16), group_size=GROUP_SIZE, bits=8))


def decode(t: tuple, encoding: str, part: str = "k", dtype=mx.float32) -> mx.array:
    """A stored tuple back to (..., T, D) floats."""
    if encoding == "fp16":
        return t[0].astype(dtype)
    if encoding == "q4c":
        return q4.dequantize_keys(t, dtype) if part == "k" else q4.dequantize_values(t, dtype)
    packed, scales, biases = t
    bits = 4 if encoding == "q4" else 8
    return mx.dequantize(packed, scales.astype(dtype), biases.astype(dtype), group_size=GROUP_SIZE, bits=bits)
