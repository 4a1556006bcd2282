"""Q4 quantize and decode attention on the best backend this machine has.

On an Apple GPU (`mx.metal.is_available()`, GPU default device) the custom
kernels of `metal_kernels` run, each configuration only after it has matched
the portable path of `q4_format` on a first-use check; everywhere else, and
for any configuration that is refused, fails to compile or launch, or
disagrees, the portable path runs (with one warning per failing
configuration). MLX_AGENTCACHE_METAL_KERNELS=0 turns the kernels off. The portable
quantizers always get the CPU stream: MLX's GPU quantize rounds ties away
from zero and starts its range at 0, so a cache written with the kernels off
would otherwise differ from one written on Linux.

The format names are re-exported so callers need one import.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable

import mlx.core as mx
import numpy as np

from . import q4_format
from .config import warn
from .q4_format import (BITS, BLOCK_TOKENS, GROUP_SIZE, KEY_GROUP, STORE_DTYPE, VALUE_GROUP, Q4, bytes_per_token,
                        decode_attention_q4, decode_attention_q4c_ref, dequantize_keys, dequantize_values, key_scores,
                        key_scores_dequantized, key_scores_unpacked, mix_values, mix_values_unpacked)

__all__ = ["BITS", "BLOCK_TOKENS", "GROUP_SIZE", "KEY_GROUP", "VALUE_GROUP", "STORE_DTYPE", "Q4", "bytes_per_token",
           "decode_attention_q4", "decode_attention_q4c_ref", "dequantize_keys", "dequantize_values", "key_scores", "key_scores_unpacked",
           "key_scores_dequantized", "mix_values", "mix_values_unpacked", "quantize", "quantize_keys", "quantize_values", "decode_attention", "decode_attention_q4c",
           "fused_decode_available", "CheckedKernels"]

# Max |kernel - reference| / max |reference| a decode configuration may show on its check.
CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}
# Decode checks: sequence lengths (full, partial, empty, ...) and the launches (sequences, splits; None:
# automatic). Nine sequences pass `lengths` in device memory, three in constant memory (MLX passes
# inputs under 8 values there): two compiled variants, both checked.
CHECK_LENGTHS = np.array([300, 37, 0, 1, 299, 128, 5, 256, 64])
CHECK_BATCHES = ((9, None), (9, 3), (3, None))


def check_groups() -> np.ndarray:
    """64-value fp16 groups for the quantize check: exact ties at every rounding, edges, NaN/Inf.

    Ties: codes x.5 at scale 1 (and scaled), the edge rounding (-7.5 .. 7.5
    gives q0 = rint(-7.5)), and the fp16 rounding of the scale itself: in
    units of 2^-24, edges 3 and 6 give a float32 scale of 1.5 units (rounds
    to 2), edges 20 / -17 give 2.5 units (rounds to 2, not 3).
    """
    ties = np.concatenate([[0.0, 15.0], np.arange(15) + 0.5, np.arange(47) % 16])
    ramp = np.linspace(-1.0, 1.0, 64)
    unit = 2.0**-24
    scale_ties = [np.arange(64) % 4 * unit, np.arange(64) % 7 * unit,
                  np.concatenate([[20, -17], np.arange(62) % 38 - 17]) * unit]
    groups = [
        ties, -ties, ties * 0.25, ties - 7.5, ties * 2.0**-10, ties * 64.0,
        *scale_ties, *(-g for g in scale_ties),
        np.zeros(64), -np.zeros(64), np.full(64, 3.0), np.full(64, -2.5), np.full(64, 65504.0),
        np.full(64, 6e-8), ramp, -np.abs(ramp) - 1, np.abs(ramp) * 1000 + 1,
        np.concatenate([[65504.0, -65504.0], ramp[2:]]), np.concatenate([[np.nan], ramp[1:]]),
        np.concatenate([[np.inf], ramp[1:]]), np.full(64, np.nan),
    ]
    rng = np.random.default_rng(0)
    random = rng.standard_normal((39, 64)) * 10.0 ** rng.uniform(-4, 4, (39, 1))
    return np.concatenate([np.stack(groups), random]).astype(np.float16)


def value_check_groups() -> np.ndarray:
    """32-value fp16 groups for the symmetric value rule: ties of magnitude (first wins), signed
    zeros, NaN first or everywhere, Inf, a subnormal scale, the clamp at +8 d."""
    half = np.arange(32) % 9 - 4.0
    groups = [
        np.concatenate([[3.0, -3.0], half[2:]]), np.concatenate([[-3.0, 3.0], half[2:]]),
        np.concatenate([[-0.0], np.zeros(31)]), np.zeros(32), np.concatenate([[np.nan], half[1:]]),
        np.full(32, np.nan), np.concatenate([[np.inf], half[1:]]), np.concatenate([[-np.inf], half[1:]]),
        half * 2.0**-22, np.concatenate([[-8.0, 8.0], half[2:]]), np.linspace(-7.5, 8.5, 32), half + 0.5,
    ]
    return np.stack(groups).astype(np.float16)


def _same_parts(got: tuple, want: tuple) -> bool:
    """Same shapes; codes equal; fp16 parts bit-equal (a NaN only needs to be NaN)."""
    if len(got) != len(want) or not mx.array_equal(got[0], want[0]).item():
        return False
    for g, w in zip(got[1:], want[1:]):
        g, w = np.array(g), np.array(w)
        if g.shape != w.shape:
            return False
        same = (g.view(np.uint16) == w.view(np.uint16)) | (np.isnan(g) & np.isnan(w))
        if not same.all():
            return False
    return True


class CheckedKernels:
    """Custom kernels behind a first-use check of every configuration, the portable path otherwise.

    `quantize_kernel(x) -> Q4` and `decode_kernel(queries, kq, vq, scale,
    lengths, splits=None) -> array` are the launches; `decode_config(dtype, d,
    dv, r)` returns a hashable configuration (None: refused, portable path).
    A configuration is checked the first time it appears: compile, launch
    and result errors all disable it with one warning (`config.warn`).
    """

    def __init__(self, quantize_kernel: Callable, decode_kernel: Callable,
                 decode_config: Callable[..., Hashable | None], quantize_keys_kernel: Callable | None = None,
                 quantize_values_kernel: Callable | None = None, decode_q4c_kernel: Callable | None = None):
        """The q4c launches are optional: without them q4c takes the portable path."""
        self.quantize_kernel = quantize_kernel
        self.decode_kernel = decode_kernel
        self.decode_config = decode_config
        self.quantize_keys_kernel = quantize_keys_kernel
        self.quantize_values_kernel = quantize_values_kernel
        self.decode_q4c_kernel = decode_q4c_kernel
        self.verdicts: dict = {}

    def _trusted(self, config: Hashable, check: Callable[[], None]) -> bool:
        if config not in self.verdicts:
            try:
                check()
                self.verdicts[config] = True
            except Exception as e:  # compile, launch or result: the portable path takes over
                self._disable(config, e)
        return self.verdicts[config]

    def _disable(self, config: Hashable, error: Exception) -> None:
        warn(f"Q4 Metal kernel {config} disabled, using the portable path: {error}")
        self.verdicts[config] = False

    def quantize(self, x: mx.array) -> Q4:
        return self._checked("quantize", self.quantize_kernel, self._check_quantize, q4_format.quantize, x)

    def _check_quantize(self) -> None:
        x = mx.array(check_groups()).reshape(4, -1, 64 * 2)
        got = self.quantize_kernel(x)
        mx.eval(*got)
        if not _same_parts(got, q4_format.quantize(x, stream=mx.cpu)):
            raise RuntimeError("quantize kernel differs from mx.quantize")

    def _checked(self, name: str, kernel: Callable | None, check: Callable[[], None], portable: Callable, *args):
        """`kernel(*args)` once its check has passed, else `portable(*args)` on the CPU."""
        if kernel is not None and self._trusted((name,), check):
            try:
                return kernel(*args)
            except Exception as e:
                self._disable((name,), e)
        return portable(*args, stream=mx.cpu)

    def quantize_keys(self, x: mx.array) -> tuple:
        return self._checked("quantize_keys", self.quantize_keys_kernel, self._check_quantize_keys, q4_format.quantize_keys, x)

    def quantize_values(self, x: mx.array) -> tuple:
        return self._checked("quantize_values", self.quantize_values_kernel, self._check_quantize_values,
                             q4_format.quantize_values, x)

    def _check_quantize_keys(self) -> None:
        """The special groups run down the channels: each channel's 128 tokens are two of them."""
        seqs = check_groups().reshape(-1, 128)
        seqs = np.concatenate([seqs, seqs[: (-len(seqs)) % 8]])
        x = mx.array(np.ascontiguousarray(seqs.T.reshape(1, 128, -1)))
        x = mx.concatenate([x, x[:, ::-1] * 3], axis=1)  # two groups
        if not _same_parts(self.quantize_keys_kernel(x), q4_format.quantize_keys(x, stream=mx.cpu)):
            raise RuntimeError("q4c key kernel differs from q4_format.quantize_keys")

    def _check_quantize_values(self) -> None:
        x = mx.array(np.concatenate([check_groups().reshape(-1, 32), value_check_groups()]).reshape(2, -1, 64))
        if not _same_parts(self.quantize_values_kernel(x), q4_format.quantize_values(x, stream=mx.cpu)):
            raise RuntimeError("q4c value kernel differs from q4_format.quantize_values")

    def decode_attention_q4c(self, queries: mx.array, kq: tuple, vq: tuple, scale: float, lengths: mx.array,
                             exact_k: mx.array | None = None, exact_v: mx.array | None = None, first: int = 0) -> mx.array:
        _, h, _, d = queries.shape
        n_kv, dv = kq[0].shape[1], vq[0].shape[-1] * 8
        base = self.decode_config(queries.dtype, d, dv, h // n_kv) if h % n_kv == 0 else None
        config = None if base is None or self.decode_q4c_kernel is None else ("q4c", base)
        if config is not None and self._trusted(config, lambda: self._check_decode_q4c(queries.dtype, d, dv, h // n_kv)):
            try:
                return self.decode_q4c_kernel(queries, kq, vq, scale, lengths, exact_k, exact_v, first)
            except Exception as e:
                self._disable(config, e)
        return q4_format.decode_attention_q4c_ref(queries, kq, vq, scale, lengths, exact_k, exact_v, first)

    def _check_decode_q4c(self, dtype: mx.Dtype, d: int, dv: int, r: int) -> None:
        """A 384-row body over two kv heads with fp16 extra tokens, in the batches of CHECK_BATCHES."""
        rng = np.random.default_rng(d * 11 + dv + r)
        b, n_kv, n, e = CHECK_LENGTHS.size, 2, 384, 6
        k = rng.standard_normal((b, n_kv, n, d)) * 2.0 + rng.standard_normal((1, n_kv, 1, d)) * 4.0  # outlier channels
        v = rng.standard_normal((b, n_kv, n, dv))
        kq = q4_format.quantize_keys(mx.array(k.astype(np.float32)), stream=mx.cpu)
        vq = q4_format.quantize_values(mx.array(v.astype(np.float32)), stream=mx.cpu)
        ek = mx.array(rng.standard_normal((b, n_kv, e, d)).astype(np.float16))
        ev = mx.array(rng.standard_normal((b, n_kv, e, dv)).astype(np.float16))
        queries = mx.array(rng.standard_normal((b, n_kv * r, 1, d)).astype(np.float32)).astype(dtype)
        lengths = mx.array(np.where(CHECK_LENGTHS == CHECK_LENGTHS.max(), n, CHECK_LENGTHS), dtype=mx.int32)
        for rows, splits in CHECK_BATCHES:
            cut = lambda t: tuple(a[:rows] for a in t)  # noqa: E731
            for extra, first in ((cut((ek, ev)), 4), ((None, None), 0)):
                args = (queries[:rows], cut(kq), cut(vq), d**-0.5, lengths[:rows], *extra, first)
                want = q4_format.decode_attention_q4c_ref(*args).astype(mx.float32)
                got = self.decode_q4c_kernel(*args, splits=splits)
                _compare("q4c decode", got, want, dtype, splits, empty=extra[0] is None)

    def decode_attention(self, queries: mx.array, kq: Q4, vq: Q4, scale: float,
                         lengths: mx.array | None = None) -> mx.array:
        _, h, _, d = queries.shape
        n_kv, dv = kq.packed.shape[1], vq.packed.shape[-1] * 8
        config = self.decode_config(queries.dtype, d, dv, h // n_kv) if h % n_kv == 0 else None
        if config is not None and self._trusted(config, lambda: self._check_decode(queries.dtype, d, dv, h // n_kv)):
            try:  # errors raised while building the launch; those at evaluation cannot be caught here
                return self.decode_kernel(queries, kq, vq, scale, lengths)
            except Exception as e:
                self._disable(config, e)
        return decode_attention_q4(queries, kq, vq, scale, lengths)

    def _check_decode(self, dtype: mx.Dtype, d: int, dv: int, r: int) -> None:
        """A 300-row cache over two kv heads, tie groups in it, in the batches of CHECK_BATCHES."""
        rng = np.random.default_rng(d * 7 + dv + r)
        b, n_kv, n = CHECK_LENGTHS.size, 2, 300
        k = rng.standard_normal((b, n_kv, n, d)) * 2.0
        v = rng.standard_normal((b, n_kv, n, dv))
        groups = check_groups()[:4]  # the tie groups, magnitudes up to 15
        k.reshape(-1, 64)[: len(groups)] = groups
        v.reshape(-1, 64)[-len(groups):] = groups
        kq, vq = (q4_format.quantize(mx.array(a.astype(np.float32)), stream=mx.cpu) for a in (k, v))
        queries = mx.array(rng.standard_normal((b, n_kv * r, 1, d)).astype(np.float32)).astype(dtype)
        lengths = mx.array(CHECK_LENGTHS, dtype=mx.int32)
        for rows, splits in CHECK_BATCHES:
            args = (queries[:rows], Q4(*(a[:rows] for a in kq)), Q4(*(a[:rows] for a in vq)), d**-0.5, lengths[:rows])
            want = decode_attention_q4(*args).astype(mx.float32)
            _compare("decode", self.decode_kernel(*args, splits=splits), want, dtype, splits, empty=True)


def _compare(what: str, got: mx.array, want: mx.array, dtype: mx.Dtype, splits, empty: bool) -> None:
    """Raise unless `got` has the reference's shape and dtype, is within CHECK_TOLERANCE, and (`empty`)
    the sequence of length 0 (index 2) is exactly zero."""
    if got.shape != want.shape or got.dtype != dtype:
        raise RuntimeError(f"{what} kernel returned {got.shape} {got.dtype}")
    got = got.astype(mx.float32)
    err = mx.max(mx.abs(got - want)).item() / mx.max(mx.abs(want)).item()
    if not err <= CHECK_TOLERANCE[dtype] or (empty and mx.any(got[2] != 0).item()):
        raise RuntimeError(f"{what} kernel differs from the reference (error {err:.2e}, splits {splits})")


@functools.cache
def _metal_kernels() -> CheckedKernels | None:
    if os.environ.get("MLX_AGENTCACHE_METAL_KERNELS", "1") == "0" or not mx.metal.is_available():
        return None
    from . import metal_kernels

    def config(dtype, d, dv, r):
        return metal_kernels.decode_plan(dtype, d, dv, r, **metal_kernels.device_limits())

    return CheckedKernels(metal_kernels.quantize, metal_kernels.decode_attention, config, metal_kernels.quantize_keys,
                          metal_kernels.quantize_values, metal_kernels.decode_attention_q4c)


def _kernels() -> CheckedKernels | None:
    """The custom kernels where they may run now: Metal present and the GPU the default device."""
    kernels = _metal_kernels()
    return kernels if kernels is not None and mx.default_device() == mx.gpu else None


def quantize(x: mx.array, group_size: int = GROUP_SIZE, bits: int = BITS) -> Q4:
    """Quantize along the last axis; input is cast to fp16 first so scales are fp16."""
    kernels = _kernels()
    if kernels is not None and (group_size, bits) == (GROUP_SIZE, BITS):
        return kernels.quantize(x)
    return q4_format.quantize(x, group_size, bits, stream=mx.cpu)


def fused_decode_available() -> bool:
    """Whether `decode_attention` may run the fused Metal kernel (else the MLX-ops reference)."""
    return _kernels() is not None


def decode_attention(queries: mx.array, kq: Q4, vq: Q4, scale: float,
                     lengths: mx.array | None = None) -> mx.array:
    """Decode-step attention (L = 1) over Q4 caches: the fused kernel on an Apple GPU where checked."""
    kernels = _kernels()
    if queries.shape[2] == 1 and kernels is not None:
        return kernels.decode_attention(queries, kq, vq, scale, lengths)
    return decode_attention_q4(queries, kq, vq, scale, lengths)


def quantize_keys(x: mx.array) -> tuple:
    """q4c keys (..., T, D), T whole KEY_GROUPs: codes per token, scales and biases per channel and group."""
    kernels = _kernels()
    return kernels.quantize_keys(x) if kernels is not None else q4_format.quantize_keys(x, stream=mx.cpu)


def quantize_values(x: mx.array) -> tuple:
    """q4c values (..., D): symmetric groups of VALUE_GROUP, codes and fp16 scales."""
    kernels = _kernels()
    return kernels.quantize_values(x) if kernels is not None else q4_format.quantize_values(x, stream=mx.cpu)


def decode_attention_q4c(queries: mx.array, kq: tuple, vq: tuple, scale: float, lengths: mx.array,
                         exact_k: mx.array | None = None, exact_v: mx.array | None = None, first: int = 0) -> mx.array:
    """Decode-step attention over a q4c body (rows from `first` on) plus exact tokens (sinks,
    tail): the fused kernel where checked."""
    kernels = _kernels()
    if queries.shape[2] == 1 and kernels is not None:
        return kernels.decode_attention_q4c(queries, kq, vq, scale, lengths, exact_k, exact_v, first)
    return decode_attention_q4c_ref(queries, kq, vq, scale, lengths, exact_k, exact_v, first)
