"""Custom Metal kernels for the Q4 cache format: building, launch geometry, launching.

The kernel bodies live in kernels/*.metal, next to the CPU harness that runs
the very same files in the tests; this module builds the
`mx.fast.metal_kernel` objects (lazily, once) and launches them. It never
decides whether they are used: `q4` does that, and checks every
configuration against the portable path the first time it appears, because
these launches were written and tested without Apple hardware.

Decode attention launches are planned by `decode_plan`, which is plain
Python so the limits (threadgroup memory, threads per threadgroup, supported
head dims) are tested everywhere; it returns None where the kernel must not
run, and the portable path is used instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from .q4_format import GROUP_SIZE, KEY_GROUP, VALUE_GROUP, Q4

# Installed wheels carry kernels/ inside the package; a source checkout has it at the top.
_HERE = Path(__file__).resolve().parent
KERNEL_DIR = next((d for d in (_HERE / "kernels", _HERE.parent / "kernels") if d.is_dir()), _HERE.parent / "kernels")

_SPECS = {
    # name: (source file, input names, output names)
    "quantize": ("quantize.metal", ["x"], ["packed", "scales", "biases"]),
    "quantize_keys": ("quantize_keys.metal", ["x"], ["packed", "scales", "biases"]),
    "quantize_values": ("quantize_values.metal", ["x"], ["packed", "scales"]),
    "decode_attention": (
        "decode_attention.metal",
        ["queries", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases",
         "lengths", "first", "scale", "n_tokens"],
        ["partial", "maxes", "sums"],
    ),
    "decode_combine": ("decode_combine.metal", ["partial", "maxes", "sums", "n_split"], ["out"]),
}

# Apple GPUs (Metal feature set tables, every family MLX runs on): 32 KiB of threadgroup
# memory and at most 1024 threads per threadgroup. MLX 0.32 reports neither (mx.device_info()
# has device_name, architecture, memory_size, max_buffer_length,
# max_recommended_working_set_size, resource_limit), so these are the defaults `device_limits`
# keeps unless it is told otherwise; a pipeline may allow fewer threads, which the first-use
# check in q4 catches.
MAX_THREADGROUP_MEMORY = 32768
MAX_THREADS = 1024
SIMD_WIDTH = 32
SIMD_GROUPS = 8          # per decode threadgroup: 256 threads
HEAD_DIMS = (64, 128, 256, 512)  # D/8 words per row must split evenly over 32 lanes
REGISTER_FLOATS = 64     # per-lane budget for the query slice and the accumulator of a tile
SPLIT_TARGET_GROUPS = 128  # split long sequences until about this many threadgroups run
MIN_SPLIT_TOKENS = 64    # but never into splits shorter than this: one kv head at 4K gets 64


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


def quantize_keys(x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """q4c keys (..., T, D); the bytes equal q4_format.quantize_keys (CPU mx.quantize per channel)."""
    x = x.astype(mx.float16)
    *lead, t, d = x.shape
    if t % KEY_GROUP or d % 8:
        raise ValueError(f"keys ({t}, {d}) are not whole {KEY_GROUP}-token groups of 8-channel words")
    n = x.size // KEY_GROUP // 8
    return tuple(_kernel("quantize_keys")(
        inputs=[x],
        template=[("KC", KEY_GROUP), ("D", d)],
        grid=(n, 1, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=[(*lead, t, d // 8), (*lead, t // KEY_GROUP, d), (*lead, t // KEY_GROUP, d)],
        output_dtypes=[mx.uint32, mx.float16, mx.float16],
    ))


def quantize_values(x: mx.array) -> tuple[mx.array, mx.array]:
    """q4c values (..., D); the bytes equal q4_format.quantize_values."""
    x = x.astype(mx.float16)
    *lead, d = x.shape
    if d % VALUE_GROUP:
        raise ValueError(f"last axis {d} is not a multiple of {VALUE_GROUP}")
    n = x.size // VALUE_GROUP
    return tuple(_kernel("quantize_values")(
        inputs=[x],
        grid=(n, 1, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=[(*lead, d // 8), (*lead, d // VALUE_GROUP)],
        output_dtypes=[mx.uint32, mx.float16],
    ))


class DecodePlan(NamedTuple):
    """Template arguments and limits of one decode-attention configuration."""

    dtype: str       # queries/output: float32, float16 or bfloat16
    d: int
    dv: int
    r: int           # query heads per kv head
    rows: int        # query heads per threadgroup (RT)
    threads: int
    threadgroup_bytes: int

    @property
    def tiles(self) -> int:
        return -(-self.r // self.rows)


def _words_per_lane(d: int) -> int:
    return max(1, d // 8 // SIMD_WIDTH)


def decode_plan(dtype: mx.Dtype, d: int, dv: int, r: int, max_threads: int = MAX_THREADS,
                max_threadgroup_memory: int = MAX_THREADGROUP_MEMORY) -> DecodePlan | None:
    """The launch configuration for these shapes, or None where the kernel must not run.

    Refused: head dims outside HEAD_DIMS, query dtypes other than float32/16
    and bfloat16, more threads or threadgroup memory than the device allows.
    Any R works: query heads are taken in tiles of `rows`, sized so the
    per-lane registers stay within REGISTER_FLOATS.
    """
    names = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
    if dtype not in names or d not in HEAD_DIMS or dv not in HEAD_DIMS or r < 1:
        return None
    per_row = 8 * (_words_per_lane(d) + _words_per_lane(dv))
    rows = max(1, min(r, REGISTER_FLOATS // per_row))
    threads = SIMD_WIDTH * SIMD_GROUPS
    tg_bytes = 4 * SIMD_GROUPS * (2 * rows + dv)
    if threads > max_threads or tg_bytes > max_threadgroup_memory:
        return None
    return DecodePlan(names[dtype], d, dv, r, rows, threads, tg_bytes)


def split_count(groups: int, n: int) -> int:
    """Splits along the sequence: enough threadgroups to fill the GPU, none shorter than MIN_SPLIT_TOKENS."""
    want = -(-SPLIT_TARGET_GROUPS // max(1, groups))
    return max(1, min(want, n // MIN_SPLIT_TOKENS))


def device_limits() -> dict:
    """max_threads / max_threadgroup_memory: what `mx.device_info()` reports for the GPU under those
    names, else the documented defaults (MLX 0.32 reports neither). Never the deprecated
    `mx.metal.device_info`, which warns."""
    info = mx.device_info(mx.gpu) if mx.metal.is_available() and hasattr(mx, "device_info") else {}
    return {
        "max_threads": int(info.get("max_threads_per_threadgroup", MAX_THREADS)),
        "max_threadgroup_memory": int(info.get("max_threadgroup_memory_length", MAX_THREADGROUP_MEMORY)),
    }


def decode_attention(queries: mx.array, kq: Q4, vq: Q4, scale: float,
                     lengths: mx.array | None = None, splits: int | None = None) -> mx.array:
    """Fused attention of queries (B, H, 1, D) over Q4 caches (B, H_kv, N, .), two launches.

    Same contract as `q4_format.decode_attention_q4`; output (B, H, 1, Dv) in
    the queries' dtype. Raises ValueError for shapes `decode_plan` refuses.
    """
    partial, maxes, sums, s = _decode_pass(queries, kq, vq, scale, lengths, splits, q4c=False, first=0)
    return _combine(partial, maxes, sums, queries.dtype)


def decode_attention_q4c(queries: mx.array, kq: tuple, vq: tuple, scale: float, lengths: mx.array,
                         exact_k: mx.array | None = None, exact_v: mx.array | None = None,
                         first: int = 0, splits: int | None = None) -> mx.array:
    """Fused attention over a q4c body (the kernel, KC/VS layout) plus fp16 extra tokens.

    Same contract as `q4_format.decode_attention_q4c_ref`. The extra tokens
    (sinks and tail, a few hundred at most) are one more split, computed
    with MLX ops in the form pass 1 writes, and merged by the same combine."""
    partial, maxes, sums, _ = _decode_pass(queries, kq, vq, scale, lengths, splits, q4c=True, first=first)
    return merge_exact(partial, maxes, sums, queries, scale, exact_k, exact_v)


def merge_exact(partial: mx.array, maxes: mx.array, sums: mx.array, queries: mx.array, scale: float,
                exact_k: mx.array | None, exact_v: mx.array | None, combine=None) -> mx.array:
    """Pass 2 of q4c decode: pass 1's splits plus the fp16 tokens as one more split, merged
    by `combine` (the combine kernel's launch; the CPU harness passes its own)."""
    if exact_k is not None:
        b, h, _, d = queries.shape
        n_kv = exact_k.shape[1]
        q = queries.astype(mx.float32).reshape(b, n_kv, h // n_kv, d) * scale
        s = q @ exact_k.astype(mx.float32).swapaxes(-1, -2)  # (B, n_kv, R, E)
        m = mx.max(s, axis=-1, keepdims=True)
        p = mx.exp(s - m)
        extra = (p @ exact_v.astype(mx.float32)).reshape(b, h, 1, -1)
        partial = mx.concatenate([partial, extra], axis=2)
        maxes = mx.concatenate([maxes, m.reshape(b, h, 1)], axis=2)
        sums = mx.concatenate([sums, p.sum(axis=-1).reshape(b, h, 1)], axis=2)
    return (combine or _combine)(partial, maxes, sums, queries.dtype)


def _decode_pass(queries, kq, vq, scale, lengths, splits, q4c: bool, first: int):
    """Pass 1: per split of each sequence, the unnormalised sum, its max and its denominator."""
    b, h, one, d = queries.shape
    _, n_kv, n, _ = kq[0].shape
    dv = vq[0].shape[-1] * 8
    if one != 1 or h % n_kv:
        raise ValueError("need queries (B, n_kv*R, 1, D)")
    plan = decode_plan(queries.dtype, d, dv, h // n_kv, **device_limits())
    if plan is None:
        raise ValueError(f"no decode kernel for {queries.dtype}, D={d}, Dv={dv}, R={h // n_kv}")
    s = splits or split_count(n_kv * plan.tiles * b, n)
    if lengths is None:
        lengths = mx.full((b,), n, dtype=mx.int32)
    if q4c and n % KEY_GROUP:
        raise ValueError(f"q4c body of {n} rows is not whole {KEY_GROUP}-token groups")
    vq = (*vq, vq[1]) if q4c else vq  # symmetric values: v_biases is not read
    partial, maxes, sums = _kernel("decode_attention")(
        inputs=[queries, *kq, *vq, lengths.astype(mx.int32), mx.array([first], dtype=mx.int32),
                mx.array([scale], dtype=mx.float32), mx.array([n], dtype=mx.int32)],
        template=[("T", queries.dtype), ("D", d), ("DV", dv), ("R", plan.r), ("RT", plan.rows),
                  ("NSG", SIMD_GROUPS), ("KC", KEY_GROUP if q4c else 0), ("VS", VALUE_GROUP if q4c else 0)],
        grid=(n_kv * plan.tiles * plan.threads, b, s),
        threadgroup=(plan.threads, 1, 1),
        output_shapes=[(b, h, s, dv), (b, h, s), (b, h, s)],
        output_dtypes=[mx.float32] * 3,
    )
    return partial, maxes, sums, s


def _combine(partial: mx.array, maxes: mx.array, sums: mx.array, dtype: mx.Dtype) -> mx.array:
    """Pass 2: merge the splits (B, H, S, .) into the normalised output (B, H, 1, Dv)."""
    b, h, s, dv = partial.shape
    return _kernel("decode_combine")(
        inputs=[partial, maxes, sums, mx.array([s], dtype=mx.int32)],
        template=[("T", dtype), ("DV", dv)],
        grid=(dv, b * h, 1),
        threadgroup=(min(dv, 256), 1, 1),
        output_shapes=[(b, h, 1, dv)],
        output_dtypes=[dtype],
    )[0]
