"""The Q4 kernels of kernels/, run on the CPU through kernels/harness, against the portable MLX path.

Quantize must give the bytes of mx.quantize (fp16 input), NaN scales compared
as NaN since their bit pattern is platform dependent; decode attention (both
passes) must match q4_format.decode_attention_q4 within a tolerance per
dtype, for every query head. The launch planning, the first-use check of
every configuration and its fallback are tested with kernels given as plain
functions: the harness-backed ones, and ones that raise or return wrong values.
"""

import mlx_agentcache  # noqa: F401  (first: preloads the BLAS before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from harness_runner import harness, np_  # noqa: F401  (harness: the session's fixture)

from mlx_agentcache import metal_kernels, q4, q4_format
from mlx_agentcache.q4_format import Q4

pytestmark = pytest.mark.numerics

# Max |kernel - reference| relative to max |reference| of each query head: float32 sums in
# another order; for fp16 / bfloat16 outputs one rounding (2^-10, 2^-7 of the largest value).
DECODE_TOL = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}
# decode_attention_q4 against float64 attention over the dequantized cache.
REFERENCE_TOL = 1e-5

f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16


@pytest.fixture(scope="module")
def launches(harness):
    """metal_kernels' launches, recorded and run through the harness: what runs on a Mac, on the CPU."""
    with harness.installed() as recorder:
        yield recorder


def special_groups() -> np.ndarray:
    """64-value groups that exercise every branch of the quantizer."""
    rng = np.random.default_rng(1)
    ties = np.concatenate([[0.0, 15.0], np.arange(15) + 0.5, rng.integers(0, 16, 47)])
    n = lambda s: rng.standard_normal(64) * s  # noqa: E731
    groups = [
        np.zeros(64), -np.zeros(64), np.where(rng.random(64) < 0.5, 0.0, -0.0),
        np.full(64, 3.0), np.full(64, -2.5), np.full(64, 65504.0), np.full(64, -65504.0),
        np.full(64, 6e-8), np.full(64, -1e-5),
        -np.abs(n(1)), np.abs(n(1)) + 1, -np.abs(n(100)) - 50,
        ties, -ties, ties * 0.25, ties - 7.5, rng.integers(0, 4, 64).astype(float),
        n(0.01) + np.eye(64)[5] * 60000, n(0.01) - np.eye(64)[9] * 65504,
        n(1000) + np.eye(64)[0] * 1e-7, n(3e-5), n(1e-7),
        np.concatenate([[65504.0, -65504.0], n(1)[2:]]),
        np.where(np.eye(64)[7] > 0, np.nan, n(1)), np.where(rng.random(64) < 0.3, np.nan, n(5)),
        np.full(64, np.nan), np.concatenate([[np.nan], np.full(63, 2.0)]),
        np.where(np.eye(64)[3] > 0, np.inf, n(1)), np.where(np.eye(64)[60] > 0, -np.inf, n(1)),
        np.concatenate([[np.inf, -np.inf], n(1)[2:]]), np.concatenate([[np.inf, np.nan], n(1)[2:]]),
        np.full(64, np.inf), np.full(64, -np.inf),
    ]
    return np.concatenate([np.stack(groups), q4.check_groups().astype(np.float64)]).astype(np.float16)


def block(rng, heads: int, d: int, specials: np.ndarray) -> np.ndarray:
    """(heads, 256, d) fp16: normal rows of assorted magnitudes, special groups scattered in."""
    x = rng.standard_normal((heads, 256, d)) * 10.0 ** rng.uniform(-4, 4, (heads, 256, 1))
    x = x.astype(np.float16)
    g = x.reshape(-1, 64)
    g[rng.choice(len(g), len(specials), replace=False)] = specials
    return x


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit equality of fp16 arrays, any NaN equal to any NaN."""
    g, w = got.ravel().view(np.uint16), want.ravel().view(np.uint16)
    both_nan = np.isnan(got.ravel()) & np.isnan(want.ravel())
    return g.shape == w.shape and bool(np.all((g == w) | both_nan))


def assert_q4_equal(got: Q4, want: Q4):
    assert np.array_equal(np_(got.packed), np_(want.packed)), "packed codes differ"
    assert same_bits(np_(got.scales), np_(want.scales)), "scales differ"
    assert same_bits(np_(got.biases), np_(want.biases)), "biases differ"


# --- quantize ------------------------------------------------------------------


@pytest.mark.parametrize("d", [128, 64])
def test_quantize_block_with_special_groups_matches_mx_quantize_bytes(launches, d):
    x = mx.array(block(np.random.default_rng(d), 4, d, special_groups()))
    assert_q4_equal(metal_kernels.quantize(x), q4_format.quantize(x))


def test_quantize_many_random_groups(launches):
    rng = np.random.default_rng(2)
    n = 20000
    kinds = [
        rng.standard_normal((n, 64)) * 10.0 ** rng.uniform(-6, 4.5, (n, 1)),
        rng.integers(-8, 8, (n, 64)) * 2.0 ** rng.integers(-20, 10, (n, 1)),  # many exact ties
        rng.uniform(0, 1, (n, 64)) ** 3 * rng.choice([-1, 1], (n, 1)),  # one-signed groups
    ]
    x = mx.array(np.clip(np.concatenate(kinds), -65504, 65504).astype(np.float16))
    assert_q4_equal(metal_kernels.quantize(x), q4_format.quantize(x))


# --- decode attention ----------------------------------------------------------

DECODE_CASES = [
    # dtype, D, Dv, R, B, n_kv, N, lengths, splits
    (f32, 128, 128, 4, 2, 2, 300, [300, 137], 1),
    (f32, 64, 128, 1, 3, 3, 100, [1, 64, 100], 2),
    (f32, 256, 64, 3, 1, 2, 70, [70], 1),        # 4 key rows per butterfly and SIMD step, 4 value rows per pass
    (f32, 64, 256, 2, 1, 1, 50, [50], 1),        # 8 key rows per lane, 32 per SIMD step, 1 value row per pass
    (f16, 256, 128, 1, 2, 1, 150, [150, 19], 2),  # 16 key rows per butterfly, some past the end
    (f32, 512, 512, 2, 1, 1, 40, [40], 1),       # two words per lane
    (f16, 128, 64, 2, 2, 1, 256, [256, 0], 3),   # an empty sequence: zeros
    (bf16, 256, 256, 8, 1, 1, 120, [120], 2),    # two tiles of heads
    # more query heads per kv head than SIMD lanes (rows 32.. were never written before)
    (f32, 128, 128, 48, 1, 1, 80, [80], 1),
    (f16, 256, 256, 48, 1, 1, 40, [40], 2),
    (bf16, 64, 64, 48, 1, 1, 60, [60], 1),
    (f32, 64, 64, 71, 1, 1, 60, [60], 1),
    (bf16, 128, 128, 71, 1, 1, 40, [40], 1),
    (f16, 256, 128, 71, 1, 1, 33, [33], 2),
]


def q4_cache(rng, b, n_kv, n, d, magnitude=1.0):
    x = rng.standard_normal((b, n_kv, n, d)) * magnitude
    return q4_format.quantize(mx.array(x.astype(np.float32)))


def decode_case(case):
    dtype, d, dv, r, b, n_kv, n, lengths, splits = case
    rng = np.random.default_rng(d + dv + r)
    queries = mx.array(rng.standard_normal((b, n_kv * r, 1, d)).astype(np.float32)).astype(dtype)
    kq, vq = q4_cache(rng, b, n_kv, n, d, 2.0), q4_cache(rng, b, n_kv, n, dv)
    return queries, kq, vq, d**-0.5, mx.array(lengths, dtype=mx.int32), splits


def head_errors(got: mx.array, want: mx.array) -> np.ndarray:
    """Per (sequence, head): max |got - want| / max |want| (0 where want is all zero)."""
    g, w = np_(got.astype(mx.float32)), np_(want.astype(mx.float32))
    top = np.abs(w).max(axis=(-2, -1))
    return np.abs(g - w).max(axis=(-2, -1)) / np.where(top > 0, top, 1.0)


@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=lambda c: f"{c[0]}-D{c[1]}-Dv{c[2]}-R{c[3]}-S{c[8]}".replace("mlx.core.", ""))
def test_decode_attention_matches_portable_path_for_every_head(launches, case):
    queries, kq, vq, scale, lengths, splits = decode_case(case)
    got = metal_kernels.decode_attention(queries, kq, vq, scale, lengths, splits=splits)
    want = q4_format.decode_attention_q4(queries, kq, vq, scale, lengths)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = head_errors(got, want)
    assert err.max() < DECODE_TOL[queries.dtype], (err.max(), np.argwhere(err >= DECODE_TOL[queries.dtype])[:5])
    out = np_(got.astype(mx.float32))
    for i, length in enumerate(np_(lengths)):
        if length == 0:
            assert not np.any(out[i])
        else:  # every head written: none left at zero (the bug past the thread count)
            assert np.all(np.abs(out[i]).max(axis=(-2, -1)) > 0)


def test_long_sequence_in_16_and_128_splits(launches):
    """4096 tokens in 16 and in 128 splits: the reference, and each other."""
    case = (f32, 64, 64, 3, 1, 1, 4096, [4091], None)
    queries, kq, vq, scale, lengths, _ = decode_case(case)
    want = q4_format.decode_attention_q4(queries, kq, vq, scale, lengths)
    got = {s: metal_kernels.decode_attention(queries, kq, vq, scale, lengths, splits=s) for s in (16, 128)}
    assert [launch.grid[2] for launch in launches.launches[-4::2]] == [16, 128]
    assert head_errors(got[16], want).max() < DECODE_TOL[f32] and head_errors(got[128], got[16]).max() < 1e-5


def test_one_kv_head_at_4k_gets_64_threadgroups(harness):
    """Gemma 3 270M's shape (4 query heads on one kv head, D = 256) at 4K tokens: 64 splits."""
    queries = mx.zeros((1, 4, 1, 256), f16)
    cache = q4_format.quantize(mx.zeros((1, 1, 4096, 256)))
    with harness.installed(run=False) as recorder:
        metal_kernels.decode_attention(queries, cache, cache, 1 / 16)
    pass1 = recorder.launches[0]
    assert pass1.grid == (256, 1, 64) and pass1.threadgroup == (256, 1, 1)


# --- launch planning -----------------------------------------------------------


def test_decode_plan_sizes_tiles_and_refuses_what_cannot_run():
    plan = metal_kernels.decode_plan(f32, 128, 128, 71)
    assert plan.rows == 4 and plan.tiles == 18 and plan.threads == 256
    assert plan.threadgroup_bytes <= metal_kernels.MAX_THREADGROUP_MEMORY
    for d in metal_kernels.HEAD_DIMS:
        for r in (1, 3, 48, 71):
            p = metal_kernels.decode_plan(bf16, d, d, r)
            assert p is not None and p.rows <= r
            words = max(1, d // 256)
            assert p.rows * 16 * words <= metal_kernels.REGISTER_FLOATS or p.rows == 1
    assert metal_kernels.decode_plan(f32, 192, 64, 3) is None  # D/8 words do not split over 32 lanes
    assert metal_kernels.decode_plan(f32, 1024, 128, 1) is None
    assert metal_kernels.decode_plan(mx.int32, 128, 128, 1) is None
    assert metal_kernels.decode_plan(f32, 128, 128, 4, max_threads=128) is None
    assert metal_kernels.decode_plan(f32, 512, 512, 4, max_threadgroup_memory=16384) is None
    assert metal_kernels.split_count(1, 32768) == metal_kernels.SPLIT_TARGET_GROUPS
    assert metal_kernels.split_count(1, 4096) == 64 and metal_kernels.split_count(3, 4096) == 43
    assert metal_kernels.split_count(8, 1000) == 15 and metal_kernels.split_count(200, 32768) == 1


def test_device_limits_from_device_info_without_deprecation(monkeypatch, recwarn, capfd):
    """The defaults where MLX reports no limits (here, and MLX 0.32 on a Mac); reported values where
    present; never the deprecated mx.metal.device_info."""
    defaults = {"max_threads": metal_kernels.MAX_THREADS, "max_threadgroup_memory": metal_kernels.MAX_THREADGROUP_MEMORY}
    assert metal_kernels.device_limits() == defaults

    def deprecated(*a, **k):
        raise AssertionError("mx.metal.device_info is deprecated")

    monkeypatch.setattr(mx.metal, "device_info", deprecated)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    mac = {"device_name": "Apple M4 Pro", "architecture": "applegpu_g16s", "memory_size": 2**36,
           "max_buffer_length": 2**34, "max_recommended_working_set_size": 2**35, "resource_limit": 499000}
    monkeypatch.setattr(mx, "device_info", lambda d=None: mac)
    assert metal_kernels.device_limits() == defaults
    monkeypatch.setattr(mx, "device_info", lambda d=None: {**mac, "max_threads_per_threadgroup": 512})
    assert metal_kernels.device_limits()["max_threads"] == 512
    assert not recwarn.list and "deprecat" not in capfd.readouterr().err


# --- first-use checks and fallback, with kernels given as functions -----------


def plan_config(dtype, d, dv, r):
    return metal_kernels.decode_plan(dtype, d, dv, r)


def decode_inputs(r=3, d=64, dv=64, dtype=f32):
    return decode_case((dtype, d, dv, r, 2, 2, 90, [90, 20], 1))[:5]


class Recorder:
    """A kernel function that counts its calls and delegates to another."""

    def __init__(self, fn):
        self.fn, self.calls, self.buffers = fn, [], []

    def __call__(self, queries, kq, vq, scale, lengths=None, splits=None):
        self.calls.append((tuple(queries.shape), splits))
        self.buffers.append((tuple(kq.packed.shape), None if lengths is None else np_(lengths).tolist()))
        return self.fn(queries, kq, vq, scale, lengths, splits=splits)


def compile_failure(*args, **kw):
    raise RuntimeError("[metal::Device] Unable to build metal library from source")


def rows_past_32_zeroed(queries, kq, vq, scale, lengths=None, splits=None):
    """The old decode bug's output: heads R >= 32 of each kv head left at zero."""
    out = q4_format.decode_attention_q4(queries, kq, vq, scale, lengths)
    r = queries.shape[1] // kq.packed.shape[1]
    keep = (mx.arange(queries.shape[1]) % r < 32)[None, :, None, None]
    return mx.where(keep, out, 0).astype(out.dtype)


def nan_blind_quantize(x):
    """A quantize kernel that treats NaN as 0: wrong on groups with NaN."""
    x = x.astype(mx.float16)
    return q4_format.quantize(mx.where(mx.isnan(x), 0, x))


WARNING = "disabled, using the portable path"


def test_checked_configuration_runs_the_kernel(launches, capsys):
    decode = Recorder(metal_kernels.decode_attention)
    kernels = q4.CheckedKernels(metal_kernels.quantize, decode, plan_config)
    queries, kq, vq, scale, lengths = decode_inputs()
    got = kernels.decode_attention(queries, kq, vq, scale, lengths)
    kernels.decode_attention(queries, kq, vq, scale, lengths)
    x = mx.array(q4.check_groups()).reshape(2, -1, 128)
    assert_q4_equal(kernels.quantize(x), q4_format.quantize(x))
    assert WARNING not in capsys.readouterr().err
    # the check ran once (nine sequences with the automatic split count and with 3, then three sequences:
    # `lengths` in device and in constant memory), then two real calls
    assert decode.calls == [((9, 6, 1, 64), None), ((9, 6, 1, 64), 3), ((3, 6, 1, 64), None),
                            ((2, 6, 1, 64), None), ((2, 6, 1, 64), None)]
    assert all(kernels.verdicts.values()) and len(kernels.verdicts) == 2
    want = q4_format.decode_attention_q4(queries, kq, vq, scale, lengths)
    assert head_errors(got, want).max() < DECODE_TOL[f32]


@pytest.mark.parametrize("bad", [compile_failure, rows_past_32_zeroed])
def test_failing_configuration_falls_back_with_one_warning(bad, capsys):
    decode = Recorder(bad)
    kernels = q4.CheckedKernels(q4_format.quantize, decode, plan_config)
    queries, kq, vq, scale, lengths = decode_inputs(r=48)
    want = np_(q4_format.decode_attention_q4(queries, kq, vq, scale, lengths))
    for _ in range(3):
        assert np.array_equal(np_(kernels.decode_attention(queries, kq, vq, scale, lengths)), want)
    warnings = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "r=48" in warnings[0]
    assert len(decode.calls) == 1  # the check's first launch; never called again for this configuration
    # another configuration gets its own check (this one passes: rows past 32 do not exist at R=3)
    queries, kq, vq, scale, lengths = decode_inputs(r=3)
    kernels.decode_attention(queries, kq, vq, scale, lengths)
    warnings = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(warnings) == (0 if bad is rows_past_32_zeroed else 1)
    assert sum(kernels.verdicts.values()) == (1 if bad is rows_past_32_zeroed else 0)


def test_launch_error_after_the_check_falls_back_with_one_warning(capsys):
    """A configuration that passed its check but raises on a later launch (other shapes) is turned off."""

    def fails_past_the_check_shapes(queries, kq, vq, scale, lengths=None, splits=None):
        if queries.shape[0] == 2:  # the check launches with nine and three sequences
            raise RuntimeError("[metal::Device] threadgroup memory exceeds the device limit")
        return q4_format.decode_attention_q4(queries, kq, vq, scale, lengths)

    kernels = q4.CheckedKernels(q4_format.quantize, fails_past_the_check_shapes, plan_config)
    queries, kq, vq, scale, lengths = decode_inputs()
    want = np_(q4_format.decode_attention_q4(queries, kq, vq, scale, lengths))
    for _ in range(2):
        assert np.array_equal(np_(kernels.decode_attention(queries, kq, vq, scale, lengths)), want)
    warnings = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "threadgroup memory" in warnings[0]
    assert list(kernels.verdicts.values()) == [False]


def test_failing_quantize_falls_back_with_one_warning(capsys):
    kernels = q4.CheckedKernels(nan_blind_quantize, compile_failure, plan_config)
    x = mx.array(np.random.default_rng(3).standard_normal((2, 40, 128)).astype(np.float32))
    for _ in range(2):
        assert_q4_equal(kernels.quantize(x), q4_format.quantize(x))
    warnings = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "quantize kernel differs" in warnings[0]


def test_refused_configuration_takes_portable_path_without_a_check(capsys):
    decode = Recorder(compile_failure)
    kernels = q4.CheckedKernels(q4_format.quantize, decode, plan_config)
    queries, kq, vq, scale, lengths = decode_inputs(d=192)
    got = kernels.decode_attention(queries, kq, vq, scale, lengths)
    assert WARNING not in capsys.readouterr().err
    assert decode.calls == [] and kernels.verdicts == {}
    assert np.array_equal(np_(got), np_(q4_format.decode_attention_q4(queries, kq, vq, scale, lengths)))


def test_no_kernels_without_metal():
    """Here (no Metal) the dispatch is the portable path itself."""
    assert not mx.metal.is_available()
    assert not q4.fused_decode_available()
    x = mx.array(np.random.default_rng(4).standard_normal((3, 5, 256, 128)).astype(np.float32) * 7)
    got = q4.quantize(x)
    want = mx.quantize(x.astype(mx.float16), group_size=64, bits=4)
    for a, w in zip(got, want):
        assert a.dtype == w.dtype and np.array_equal(np_(a).view(np.uint8), np_(w).view(np.uint8))


def test_fallback_quantizes_on_the_cpu_under_another_stream(monkeypatch):
    """Kernels off (none here; on a Mac MLX_AGENTCACHE_METAL_KERNELS=0) or failed: the portable quantizers
    get the CPU stream explicitly, also while another stream (the GPU's on a Mac) is current, so the
    bytes are those of the CPU path: all-negative groups, negative key offsets, ties included."""
    rng = np.random.default_rng(6)
    x = mx.array(np.concatenate([-np.abs(rng.standard_normal((1, 128, 128))) - 3,  # one-signed groups and channels
                                 np.round(rng.standard_normal((1, 128, 128)) * 8) / 2]).astype(np.float16))
    want = [q4_format.quantize(x, stream=mx.cpu), q4_format.quantize_keys(x, stream=mx.cpu),
            q4_format.quantize_values(x, stream=mx.cpu)]
    streams, depth = [], [0]
    for name in ("quantize", "quantize_keys", "quantize_values"):
        def spy(*args, _real=getattr(q4_format, name), **kw):
            if not depth[0]:  # quantize_values calls itself once on its stream: the outer call counts
                streams.append(kw.get("stream"))
            depth[0] += 1
            try:
                return _real(*args, **kw)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(q4_format, name, spy)
    failing = q4.CheckedKernels(compile_failure, compile_failure, plan_config, compile_failure, compile_failure)
    mx.default_stream(mx.cpu)  # the CPU's default exists first, so the new stream is another one
    other = mx.new_stream(mx.gpu if mx.metal.is_available() else mx.cpu)
    with mx.stream(other):
        got = [q4.quantize(x), q4.quantize_keys(x), q4.quantize_values(x),
               failing.quantize(x), failing.quantize_keys(x), failing.quantize_values(x)]
        mx.eval(got)
    assert len(streams) == 6 and all(s == mx.cpu for s in streams), streams
    for g, w in zip(got, want * 2):
        assert all(np.array_equal(np_(a).view(np.uint8), np_(b).view(np.uint8)) for a, b in zip(g, w))


# --- the portable reference ----------------------------------------------------


def float_reference(queries, kq, vq, scale, lengths):
    """float64 attention over the exactly dequantized cache (scale * code + bias)."""

    def deq(t):
        w = np_(t.packed)
        codes = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
        codes = codes.reshape(*w.shape[:-1], -1).astype(np.float64)
        rep = lambda a: np.repeat(np_(a).astype(np.float64), 64, axis=-1)  # noqa: E731
        return rep(t.scales) * codes + rep(t.biases)

    k, v = deq(kq), deq(vq)
    q = np_(queries).astype(np.float64)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    valid = np.arange(k.shape[2])[None, None, None, :] < np.array(lengths)[:, None, None, None]
    s = np.where(valid, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("h,n_kv,l,lengths", [(8, 2, 1, [300, 7]), (4, 4, 1, [1, 300]),
                                              (6, 1, 1, [300, 300]), (4, 2, 3, [250, 300])])
def test_decode_attention_q4_matches_float_reference(h, n_kv, l, lengths):
    rng = np.random.default_rng(h * 10 + n_kv)
    b, n, d, dv = len(lengths), 300, 128, 64
    queries = mx.array(rng.standard_normal((b, h, l, d)).astype(np.float32))
    kq, vq = q4_cache(rng, b, n_kv, n, d, 2.0), q4_cache(rng, b, n_kv, n, dv)
    got = np_(q4_format.decode_attention_q4(queries, kq, vq, d**-0.5, mx.array(lengths)))
    want = float_reference(queries, kq, vq, d**-0.5, lengths)
    assert got.shape == (b, h, l, dv)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < REFERENCE_TOL


def test_decode_attention_q4_empty_sequence_is_zero():
    rng = np.random.default_rng(5)
    kq, vq = q4_cache(rng, 2, 1, 64, 64), q4_cache(rng, 2, 1, 64, 64)
    out = q4_format.decode_attention_q4(mx.ones((2, 2, 1, 64)), kq, vq, 0.125, mx.array([0, 64]))
    assert not np.any(np_(out[0])) and np.all(np.isfinite(np_(out)))


# --- the fused kernel inside LayerCache.attend ----------------------------


@pytest.mark.parametrize("mode", ["q4", "q4k"])
def test_attend_decode_step_uses_fused_kernel_in_place(launches, monkeypatch, mode):
    """On an Apple GPU a Q4 decode step reads the cache buffer in place (capacity rows past the
    length included) through the fused kernel; here the kernel sources run through the harness,
    behind the same first-use check, and must give what the general path gives."""
    from mlx_agentcache.kvcache import LayerCache

    rng = np.random.default_rng(11)
    n_kv, rep, d, n = 2, 3, 64, 300
    cache = LayerCache(mode)
    cache.update_and_fetch(mx.array(rng.standard_normal((1, n_kv, n, d)).astype(np.float32) * 2),
                           mx.array(rng.standard_normal((1, n_kv, n, d)).astype(np.float32)))
    query = mx.array(rng.standard_normal((1, n_kv * rep, 1, d)).astype(np.float32))
    want = np_(cache.attend(query, d**-0.5))

    decode = Recorder(metal_kernels.decode_attention)
    kernels = q4.CheckedKernels(metal_kernels.quantize, decode, plan_config)
    monkeypatch.setattr(q4, "_kernels", lambda: kernels)
    got = np_(cache.attend(query, d**-0.5))
    real = [c for c in decode.calls if c[0][0] == 1]  # the check's launches have B = 9 and 3
    assert real == [((1, n_kv * rep, 1, d), None)] and all(kernels.verdicts.values())
    assert decode.buffers[-1] == ((1, n_kv, 512, d // 8), [n])  # two blocks of capacity, no copy
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < DECODE_TOL[f32]

    # prefill rows, a second (shared) segment and a sliding window past its width take the general path
    cache.attend(mx.concatenate([query] * 2, axis=2), d**-0.5)
    shared = LayerCache(mode)
    shared.segments, shared.offset = [cache.segments[0]], n
    shared.segments[0].shared = True
    shared.update_and_fetch(*(mx.array(rng.standard_normal((1, n_kv, 1, d)).astype(np.float32)),) * 2)
    shared.attend(query, d**-0.5)
    window = LayerCache(mode, window=128)
    window.update_and_fetch(*(mx.array(rng.standard_normal((1, n_kv, 200, d)).astype(np.float32)),) * 2)
    window.attend(query, d**-0.5)
    assert len([c for c in decode.calls if c[0][0] == 1]) == 1


# --- q4c: channel-wise keys, symmetric values --------------------------------------


def channel_keys(rng, heads: int, t: int, d: int, specials: bool = True) -> np.ndarray:
    """(heads, t, d) fp16 keys with outlier channels and offsets; `specials`: the special groups
    (ties, NaN, Inf, ...) running down some channels."""
    x = rng.standard_normal((heads, t, d)) * 10.0 ** rng.uniform(-3 if specials else -1, 3 if specials else 1, (heads, 1, d))
    x = (x + rng.standard_normal((1, 1, d)) * 5).astype(np.float16)
    if not specials:
        return x
    groups = special_groups()
    seqs = groups[: len(groups) // 2 * 2].reshape(-1, 128)  # two 64-value special groups per 128-token channel group
    cols = x.swapaxes(1, 2).reshape(-1, 128)  # (heads * d * t/128, 128): one channel's group per row
    cols[rng.choice(len(cols), min(len(seqs), len(cols)), replace=False)] = seqs[: len(cols)]
    return np.ascontiguousarray(cols.reshape(heads, d, t).swapaxes(1, 2))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_q4c_key_quantize_matches_portable_bytes(launches, d):
    x = mx.array(channel_keys(np.random.default_rng(d), 3, 256, d))
    got, want = metal_kernels.quantize_keys(x), q4_format.quantize_keys(x)
    assert np.array_equal(np_(got[0]), np_(want[0])), "codes differ"
    assert all(same_bits(np_(g), np_(w)) for g, w in zip(got[1:], want[1:])), "scales or biases differ"
    # the layout: codes packed along the head dim per token, one scale per channel per 128 tokens
    assert got[0].shape == (3, 256, d // 8) and got[1].shape == (3, 2, d)
    # and it is mx.quantize of each channel's 128 tokens, repacked
    xt = x.swapaxes(-1, -2)
    packed_t, scales, biases = mx.quantize(xt, group_size=128, bits=4)
    assert same_bits(np_(scales.swapaxes(-1, -2)), np_(want[1])) and same_bits(np_(biases.swapaxes(-1, -2)), np_(want[2]))
    codes = np_(q4_format.unpack(want[0]))
    assert np.array_equal(np_(q4_format.unpack(packed_t)), codes.swapaxes(-1, -2))


def test_q4c_value_quantize_matches_portable_bytes(launches):
    rng = np.random.default_rng(3)
    n = 20000
    kinds = [rng.standard_normal((n, 32)) * 10.0 ** rng.uniform(-7, 4.5, (n, 1)),
             rng.integers(-8, 9, (n, 32)) * 2.0 ** rng.integers(-24, 10, (n, 1)),  # exact ties, equal magnitudes
             np.concatenate([special_groups().reshape(-1, 32).astype(np.float64), q4.value_check_groups()])[rng.integers(0, 100, n)]]
    x = mx.array(np.clip(np.concatenate(kinds), -65504, 65504).astype(np.float16).reshape(-1, 4, 128))
    got, want = metal_kernels.quantize_values(x), q4_format.quantize_values(x)
    assert np.array_equal(np_(got[0]), np_(want[0])) and same_bits(np_(got[1]), np_(want[1]))


@pytest.mark.parametrize("dtype,d,r,lengths,extra,first", [
    (f32, 64, 3, [384, 130, 0], 6, 4), (f16, 128, 4, [256, 256, 1], 0, 0), (bf16, 256, 1, [384, 5, 300], 132, 4),
    (f32, 128, 8, [128, 0, 383], 1, 0), (f32, 64, 1, [3, 4, 200], 4, 4)])
def test_q4c_decode_matches_reference_for_every_head(launches, dtype, d, r, lengths, extra, first):
    rng = np.random.default_rng(d + r)
    b, n_kv, n = 3, 2, 384
    kq = q4_format.quantize_keys(mx.array(channel_keys(rng, b * n_kv, n, d, False).astype(np.float32).reshape(b, n_kv, n, d)))
    vq = q4_format.quantize_values(mx.array(rng.standard_normal((b, n_kv, n, d)).astype(np.float32)))
    ek = ev = None
    if extra:
        ek, ev = (mx.array(rng.standard_normal((b, n_kv, extra, d)).astype(np.float16)) for _ in range(2))
    queries = mx.array(rng.standard_normal((b, n_kv * r, 1, d)).astype(np.float32)).astype(dtype)
    lengths = mx.array(lengths, dtype=mx.int32)
    want = q4_format.decode_attention_q4c_ref(queries, kq, vq, d**-0.5, lengths, ek, ev, first)
    for splits in (None, 3):
        got = metal_kernels.decode_attention_q4c(queries, kq, vq, d**-0.5, lengths, ek, ev, first, splits=splits)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert head_errors(got, want).max() < DECODE_TOL[dtype]
    if not extra:  # an empty sequence with no extra tokens gives zeros
        assert not np.any(np_(got.astype(mx.float32))[np_(lengths) <= first])


def test_q4c_reference_is_attention_over_the_decoded_cache():
    rng = np.random.default_rng(5)
    k, v = rng.standard_normal((2, 1, 256, 64)), rng.standard_normal((2, 1, 256, 64))
    kq, vq = q4_format.quantize_keys(mx.array(k.astype(np.float32))), q4_format.quantize_values(mx.array(v.astype(np.float32)))
    ek, ev = rng.standard_normal((2, 1, 3, 64)).astype(np.float16), rng.standard_normal((2, 1, 3, 64)).astype(np.float16)
    q = rng.standard_normal((2, 2, 1, 64))
    got = np_(q4_format.decode_attention_q4c_ref(mx.array(q.astype(np.float32)), kq, vq, 0.125, mx.array([256, 100]), mx.array(ek), mx.array(ev)))
    kd, vd = np_(q4_format.dequantize_keys(kq)).astype(np.float64), np_(q4_format.dequantize_values(vq)).astype(np.float64)
    for i, n in enumerate((256, 100)):
        keys = np.concatenate([kd[i, 0, :n], ek[i, 0]]); vals = np.concatenate([vd[i, 0, :n], ev[i, 0]])
        s = q[i, :, 0] @ keys.T * 0.125
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ vals
        assert np.abs(got[i, :, 0] - want).max() < REFERENCE_TOL * np.abs(want).max() * 10


def test_q4c_kernels_pass_their_first_use_checks_and_fall_back_when_wrong(launches, capsys):
    kernels = q4.CheckedKernels(metal_kernels.quantize, metal_kernels.decode_attention, plan_config, metal_kernels.quantize_keys,
                                metal_kernels.quantize_values, metal_kernels.decode_attention_q4c)
    x = mx.array(np.random.default_rng(0).standard_normal((2, 128, 64)).astype(np.float32))
    assert np.array_equal(np_(kernels.quantize_keys(x)[0]), np_(q4_format.quantize_keys(x)[0]))
    assert np.array_equal(np_(kernels.quantize_values(x)[0]), np_(q4_format.quantize_values(x)[0]))
    assert kernels.verdicts == {("quantize_keys",): True, ("quantize_values",): True}
    assert capsys.readouterr().err == ""

    def off_by_one(x):
        packed, scales = q4_format.quantize_values(x)
        return packed ^ 1, scales

    wrong = q4.CheckedKernels(metal_kernels.quantize, metal_kernels.decode_attention, plan_config, None, off_by_one)
    for _ in range(2):
        assert np.array_equal(np_(wrong.quantize_values(x)[0]), np_(q4_format.quantize_values(x)[0]))
    assert wrong.verdicts == {("quantize_values",): False}
    assert capsys.readouterr().err.count("disabled") == 1


def test_attend_q4c_decode_step_uses_fused_kernel_with_sinks_and_tail(launches, monkeypatch):
    """A q4c layer's decode step: the body through the fused kernel in place (its sink rows
    skipped), the exact sinks and the 8-bit tail as one more split; the same result as the
    general path."""
    from mlx_agentcache.kvcache import LayerCache

    rng = np.random.default_rng(12)
    n_kv, rep, d, n = 2, 3, 64, 300  # 4 sinks, 256 in the body, 40 in the tail
    cache = LayerCache("q4c")
    cache.update_and_fetch(mx.array(channel_keys(rng, n_kv, n, d, False).astype(np.float32)[None]),
                           mx.array(rng.standard_normal((1, n_kv, n, d)).astype(np.float32)))
    assert [(s.encoding, s.length) for s in cache.segments] == [("q4c", 256), ("q8", 44)]
    assert cache.sink_count == 4
    query = mx.array(rng.standard_normal((1, n_kv * rep, 1, d)).astype(np.float32))
    want = np_(cache.attend(query, d**-0.5))
    calls = []

    def decode_q4c(queries, kq, vq, scale, lengths, ek, ev, first=0, splits=None):
        calls.append((tuple(kq[0].shape), np_(lengths).tolist(), None if ek is None else tuple(ek.shape), first))
        return metal_kernels.decode_attention_q4c(queries, kq, vq, scale, lengths, ek, ev, first, splits=splits)

    kernels = q4.CheckedKernels(metal_kernels.quantize, metal_kernels.decode_attention, plan_config, metal_kernels.quantize_keys,
                                metal_kernels.quantize_values, decode_q4c)
    monkeypatch.setattr(q4, "_kernels", lambda: kernels)
    got = np_(cache.attend(query, d**-0.5))
    real = [c for c in calls if c[0][0] == 1]  # the check's launches have B = 9 and 3
    assert real == [((1, n_kv, 256, d // 8), [256], (1, n_kv, 48, d), 4)]  # the tail's 44 rows and the 4 sinks
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < DECODE_TOL[f32]
