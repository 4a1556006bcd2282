"""Custom Metal kernels for the Q4 cache format (Apple GPUs only).

The kernel bodies live in kernels/*.metal, next to the CPU harness that runs
the very same files in the tests; this module only builds the
`mx.fast.metal_kernel` objects (lazily, once) and launches them. `q4` calls
these when `available()`; nothing here is imported on other machines.

The first use runs a small self-check against the portable path and
disables the kernels (with a warning) if it fails, because these wrappers
could not be executed on Apple hardware where they were written. Set
MLX_AGENTCACHE_METAL_KERNELS=0 to never use them.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import mlx.core as mx

from .q4 import GROUP_SIZE, Q4

# Installed wheels carry kernels/ inside the package; a source checkout has it at the top.
_HERE = Path(__file__).resolve().parent
KERNEL_DIR = next((d for d in (_HERE / "kernels", _HERE.parent / "kernels") if d.is_dir()), _HERE.parent / "kernels")

_SPECS = {
    # name: (source file, input names, output names)
    "quantize": ("quantize.metal", ["x"], ["packed", "scales", "biases"]),
    "quantize_kv": (
        "quantize_kv.metal",
        ["k", "v", "n_k_groups"],
        ["k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases"],
    ),
    "dequantize": ("dequantize.metal", ["packed", "scales", "biases"], ["out"]),
    "decode_attention": (
        "decode_attention.metal",
        ["queries", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases",
         "lengths", "scale", "n_tokens"],
        ["out"],
    ),
}


@functools.cache
def _kernel(name: str):
    source, inputs, outputs = _SPECS[name]
    return mx.fast.metal_kernel(
        name=f"q4_{name}",
        input_names=inputs,
        output_names=outputs,
        source=(KERNEL_DIR / source).read_text(),
        header=(KERNEL_DIR / "q4_common.h").read_text(),
    )


def _groups_shapes(x: mx.array):
    lead, d = x.shape[:-1], x.shape[-1]
    if d % GROUP_SIZE:
        raise ValueError(f"last axis {d} is not a multiple of {GROUP_SIZE}")
    return [(*lead, d // 8), (*lead, d // GROUP_SIZE), (*lead, d // GROUP_SIZE)]


def quantize(x: mx.array) -> Q4:
    """One tensor (..., D) to Q4; the bytes equal CPU mx.quantize of x in fp16."""
    x = x.astype(mx.float16)
    n = x.size // GROUP_SIZE
    out = _kernel("quantize")(
        inputs=[x],
        grid=(n, 1, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=_groups_shapes(x),
        output_dtypes=[mx.uint32, mx.float16, mx.float16],
    )
    return Q4(*out)


def quantize_kv_block(k: mx.array, v: mx.array) -> tuple[Q4, Q4]:
    """Keys and values of a block to Q4 in a single launch."""
    k, v = k.astype(mx.float16), v.astype(mx.float16)
    nk, nv = k.size // GROUP_SIZE, v.size // GROUP_SIZE
    out = _kernel("quantize_kv")(
        inputs=[k, v, mx.array([nk], dtype=mx.uint32)],
        grid=(nk + nv, 1, 1),
        threadgroup=(min(256, nk + nv), 1, 1),
        output_shapes=_groups_shapes(k) + _groups_shapes(v),
        output_dtypes=[mx.uint32, mx.float16, mx.float16] * 2,
    )
    return Q4(*out[:3]), Q4(*out[3:])


def dequantize(q: Q4) -> mx.array:
    """Q4 to fp16, bit-identical to mx.dequantize."""
    n = q.packed.size
    return _kernel("dequantize")(
        inputs=list(q),
        grid=(n, 1, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=[(*q.packed.shape[:-1], q.packed.shape[-1] * 8)],
        output_dtypes=[mx.float16],
    )[0]


def _threads(r: int, d: int) -> int:
    """Threads per group: 256, halved while threadgroup memory would pass 32 KiB."""
    tg = 256
    while tg > 32 and 4 * r * (d + d // GROUP_SIZE + tg + 3) > 32768:
        tg //= 2
    return tg


def decode_attention(queries: mx.array, kq: Q4, vq: Q4, scale: float,
                     lengths: mx.array | None = None) -> mx.array:
    """Fused attention of queries (B, H, 1, D) over Q4 caches (B, H_kv, N, .).

    Same contract as `q4.decode_attention_q4`; output (B, H, 1, Dv) in the
    queries' dtype.
    """
    b, h, one, d = queries.shape
    _, n_kv, n, _ = kq.packed.shape
    dv = vq.packed.shape[-1] * 8
    if one != 1 or h % n_kv or d % GROUP_SIZE or dv % GROUP_SIZE:
        raise ValueError("need queries (B, n_kv*R, 1, D) and D, Dv multiples of 64")
    r = h // n_kv
    tg = _threads(r, d)
    if lengths is None:
        lengths = mx.full((b,), n, dtype=mx.int32)
    return _kernel("decode_attention")(
        inputs=[queries, *kq, *vq, lengths.astype(mx.int32),
                mx.array([scale], dtype=mx.float32), mx.array([n], dtype=mx.int32)],
        template=[("T", queries.dtype), ("D", d), ("DV", dv), ("R", r), ("TG", tg)],
        grid=(n_kv * tg, b, 1),
        threadgroup=(tg, 1, 1),
        output_shapes=[(b, h, 1, dv)],
        output_dtypes=[queries.dtype],
    )[0]


def _same_bits(a: mx.array, b: mx.array) -> bool:
    if a.dtype == mx.float16:
        a, b = a.view(mx.uint16), b.view(mx.uint16)
    return a.shape == b.shape and mx.array_equal(a, b).item()


def _self_check() -> None:
    """Compare every kernel with the portable path on a small case; raise on mismatch."""
    from . import q4

    key = mx.random.key(0)
    kk, kv, kq = mx.random.split(key, 3)
    k = (mx.random.normal((2, 2, 40, 128), key=kk) * 3).astype(mx.float16)
    v = mx.random.normal((2, 2, 40, 64), key=kv).astype(mx.float16)
    kq4, vq4 = quantize_kv_block(k, v)
    for got, x in ((kq4, k), (vq4, v), (quantize(k), k)):
        want = mx.quantize(x, group_size=GROUP_SIZE, bits=4, stream=mx.cpu)
        if not all(_same_bits(a, b) for a, b in zip(got, want)):
            raise RuntimeError("quantize kernel differs from mx.quantize")
    want = mx.dequantize(*kq4, group_size=GROUP_SIZE, bits=4, stream=mx.cpu)
    if not _same_bits(dequantize(kq4), want):
        raise RuntimeError("dequantize kernel differs from mx.dequantize")
    queries = mx.random.normal((2, 4, 1, 128), key=kq)
    lengths = mx.array([40, 17], dtype=mx.int32)
    got = decode_attention(queries, kq4, vq4, 0.088, lengths)
    want = q4.decode_attention_q4(queries, kq4, vq4, 0.088, lengths)
    if not mx.allclose(got, want, rtol=1e-4, atol=1e-4).item():
        raise RuntimeError("decode attention kernel differs from the reference")


@functools.cache
def available() -> bool:
    """True on an Apple GPU once the self-check has passed."""
    if os.environ.get("MLX_AGENTCACHE_METAL_KERNELS", "1") == "0" or not mx.metal.is_available():
        return False
    try:
        _self_check()
    except Exception as e:  # any failure: fall back to the portable path for this process
        warnings.warn(f"Q4 Metal kernels disabled, using the portable path: {e}")
        return False
    return True
