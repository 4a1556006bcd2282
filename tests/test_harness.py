"""The CPU harness catches what a GPU would get wrong: each test breaks the recorded decode launch's
source in one way and asserts that the harness (or its ThreadSanitizer / AddressSanitizer build)
reports it, quickly. The unbroken kernels must run clean under both sanitizers.
"""

import mlx_agentcache  # noqa: F401  (first: preloads the BLAS before mlx.core)

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from harness_runner import Harness, harness, np_  # noqa: F401  (harness: the session's fixture)
from metal_launch import Launch

from mlx_agentcache import metal_kernels, q4_format

BARRIER = "  threadgroup_barrier(mem_flags::mem_threadgroup);\n"
# (dtype, D, Dv, R, B, n_kv, N, lengths, splits): two threadgroups and two splits per sequence.
CASE = (mx.float32, 128, 64, 3, 2, 1, 96, [96, 37], 2)


@pytest.fixture(scope="module")
def case(harness):
    """The pass-1 launch metal_kernels.decode_attention makes for CASE, and the expected output."""
    dtype, d, dv, r, b, n_kv, n, lengths, splits = CASE
    rng = np.random.default_rng(7)
    queries = mx.array(rng.standard_normal((b, n_kv * r, 1, d)).astype(np.float32)).astype(dtype)
    kq = q4_format.quantize(mx.array(rng.standard_normal((b, n_kv, n, d)).astype(np.float32) * 2))
    vq = q4_format.quantize(mx.array(rng.standard_normal((b, n_kv, n, dv)).astype(np.float32)))
    lengths = mx.array(lengths, dtype=mx.int32)
    want = np_(q4_format.decode_attention_q4(queries, kq, vq, d**-0.5, lengths))
    with harness.installed(run=False) as recorder:
        metal_kernels.decode_attention(queries, kq, vq, d**-0.5, lengths, splits=splits)
    assert [launch.name for launch in recorder.launches] == ["q4_decode_attention", "q4_decode_combine"]
    return recorder.launches[0], want


def broken(launch: Launch, edit) -> Launch:
    new = edit(launch.source)
    assert new != launch.source, "the edit did not apply"
    return dataclasses.replace(launch, source=new)


def start(h: Harness, launch: Launch, **kw):
    t = time.monotonic()
    proc, out = h.start(launch, **kw)
    return proc, out, time.monotonic() - t


def result(h: Harness, launch: Launch, out, want) -> np.ndarray:
    """Pass 2 in NumPy over the pass-1 outputs: the normalised attention."""
    partial, maxes, sums = (np_(a) for a in h.outputs(launch, out))
    w = np.exp(maxes - maxes.max(axis=-1, keepdims=True))
    return ((w[..., None] * partial).sum(2) / (w * sums).sum(2)[..., None]).reshape(want.shape)


def close(got, want, rtol=1e-5) -> bool:
    return np.max(np.abs(got - want)) / np.max(np.abs(want)) < rtol


def nth(text: str, needle: str, k: int) -> int:
    i = -1
    for _ in range(k + 1):
        i = text.index(needle, i + 1)
    return i


def replace_nth(text: str, needle: str, new: str, k: int) -> str:
    i = nth(text, needle, k)
    return text[:i] + new + text[i + len(needle):]


@pytest.mark.parametrize("sanitize", ["thread", "address"])
def test_unbroken_kernel_is_clean_under_sanitizers(harness, case, sanitize):
    launch, want = case
    for seed in (1, 2):
        proc, out, _ = start(harness, launch, sanitize=sanitize, seed=seed)
        assert proc.returncode == 0 and "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, \
            proc.stderr[-3000:]
        assert close(result(harness, launch, out, want), want)


def test_quantize_kernels_are_clean_under_address_sanitizer(harness):
    x = mx.array(np.random.default_rng(3).standard_normal((3, 128, 64)).astype(np.float32))
    with harness.installed() as recorder:
        harness.options = {"sanitize": "address"}
        try:
            got = [metal_kernels.quantize(x), metal_kernels.quantize_keys(x), metal_kernels.quantize_values(x)]
        finally:
            harness.options = {}
    assert len(recorder.launches) == 3
    want = [q4_format.quantize(x), q4_format.quantize_keys(x), q4_format.quantize_values(x)]
    for g, w in zip(got, want):
        assert all(np.array_equal(np_(a), np_(b)) for a, b in zip(g, w))


def test_write_past_an_output_is_caught_by_address_sanitizer(harness, case):
    launch, _ = case
    bad = broken(launch, lambda s: s.replace("partial[part * DV + d] = o;", "partial[part * DV + d + DV] = o;"))
    proc, _, _ = start(harness, bad, sanitize="address", seed=1)
    assert proc.returncode == 67 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("which", [0, 1])
def test_deleted_barrier_is_caught(harness, case, which):
    """ThreadSanitizer reports the race every time; the plain build gives wrong values or NaN."""
    launch, want = case
    bad = broken(launch, lambda s: replace_nth(s, BARRIER, "", which))
    proc, _, _ = start(harness, bad, sanitize="thread", seed=3)
    assert proc.returncode == 66 and "data race" in proc.stderr, proc.stderr[-3000:]
    wrong = 0
    for seed in (4, 5, 6):
        proc, out, _ = start(harness, bad, seed=seed)
        assert proc.returncode == 0, proc.stderr
        wrong += not np.allclose(result(harness, bad, out, want), want, rtol=1e-4, atol=1e-5)
    assert wrong >= 1, "three runs without the barrier gave the right answer"


def test_barrier_round_from_two_call_sites_fails(harness, case):
    divergent = ("  if (tid % 2) {\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  } else {\n"
                 "    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n")
    proc, _, _ = start(harness, broken(case[0], lambda s: replace_nth(s, BARRIER, divergent, 0)))
    assert proc.returncode == 3 and "mixes call sites" in proc.stderr, proc.stderr


def test_thread_leaving_before_a_barrier_fails_at_once(harness, case):
    bad = broken(case[0], lambda s: replace_nth(s, BARRIER, "  if (tid == 77) return;\n" + BARRIER, 1))
    proc, _, elapsed = start(harness, bad, timeout_s=120)
    assert proc.returncode == 3 and "left the kernel" in proc.stderr, proc.stderr
    assert elapsed < 60


def test_missing_arrival_times_out_instead_of_hanging(harness, case):
    spin = "  if (tid == 5) {\n    volatile int forever = 1;\n    while (forever) {\n    }\n  }\n"
    proc, _, elapsed = start(harness, broken(case[0], lambda s: replace_nth(s, BARRIER, spin + BARRIER, 0)), timeout_s=3)
    assert proc.returncode == 3 and "arrived within 3 s" in proc.stderr, proc.stderr
    assert elapsed < 60


def test_divergent_simd_function_fails(harness, case):
    bad = broken(case[0], lambda s: s.replace("      s[r][0] += simd_shuffle_xor(", "      if (lane < 16) s[r][0] += simd_shuffle_xor("))
    proc, _, _ = start(harness, bad)
    assert proc.returncode == 3 and "SIMD-group function" in proc.stderr, proc.stderr


def test_uninitialised_threadgroup_memory_reads_nan(harness, case):
    """Without the SIMD groups' maxima written, the merge reads the NaN poison: NaN sums, wrong output."""
    launch, want = case
    bad = broken(launch, lambda s: s.replace("    m_s[sg * RT + r] = m[r];\n", ""))
    proc, out, _ = start(harness, bad, seed=8)
    assert proc.returncode == 0, proc.stderr
    assert np.isnan(np_(harness.outputs(bad, out)[2])).all()
    assert not np.allclose(result(harness, bad, out, want), want, atol=1e-3)


def small_launch(source: str, inputs: dict, outputs: dict, n: int) -> Launch:
    """A one-off kernel over n threads (groups of up to 32); inputs and outputs float32 unless given."""
    names = list(inputs)
    return Launch("probe", names, list(outputs), source, "", [inputs[k] for k in names],
                  [str(inputs[k].dtype) for k in names], [(n,)] * len(outputs), list(outputs.values()),
                  (n, 1, 1), (min(n, 32), 1, 1))


def test_simd_exchange_is_generic_and_max_min_follow_metal_nan_rules(harness):
    """Metal's max/min (fmax/fmin) return the other argument when one is NaN, also in simd_max /
    simd_min; shuffles carry ints and halves unchanged."""
    x = np.arange(32, dtype=np.float32) - 7.0
    x[[3, 20]] = np.nan
    source = """
const uint i = thread_position_in_grid.x;
const float v = x[i];
hi[i] = metal::max(v, 1.5f);
lo[i] = metal::min(1.5f, v);
smax[i] = simd_max(v);
smin[i] = simd_min(v);
ishuf[i] = simd_shuffle_xor(int(i) * 3 - 40, ushort(1));
hshuf[i] = simd_shuffle(static_cast<float16_t>(v * 0.5f), ushort(31 - i));
"""
    outs = {"hi": "float32", "lo": "float32", "smax": "float32", "smin": "float32", "ishuf": "int32",
            "hshuf": "float16"}
    got = dict(zip(outs, (np_(a) for a in harness.run(small_launch(source, {"x": x}, outs, 32)))))
    assert np.array_equal(got["hi"], np.fmax(x, 1.5)) and np.array_equal(got["lo"], np.fmin(x, 1.5))
    assert (got["smax"] == np.nanmax(x)).all() and (got["smin"] == np.nanmin(x)).all()
    assert np.array_equal(got["ishuf"], (np.arange(32) ^ 1) * 3 - 40)
    assert np.array_equal(got["hshuf"], (x[::-1] * 0.5).astype(np.float16), equal_nan=True)


def test_fp16_and_bfloat16_conversions_match_mlx(harness):
    """The shim's float -> fp16 / bfloat16 rounding (nearest even, subnormals, overflow, NaN) equals MLX's."""
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    edge = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 6e-8, 2.98e-8, 1 + 2**-11, 1 + 3 * 2**-11,
                     1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([bits.view(np.float32), edge])
    x = x[~np.isnan(x)]  # NaN payloads differ by platform; NaN-ness is checked below
    source = """
const uint i = thread_position_in_grid.x;
f16[i] = static_cast<float16_t>(x[i]);
bf16[i] = static_cast<bfloat16_t>(x[i]);
"""
    outs = {"f16": "float16", "bf16": "bfloat16"}
    f16, bf16 = harness.run(small_launch(source, {"x": x}, outs, x.size))
    assert np.array_equal(np_(f16.view(mx.uint16)), np_(mx.array(x).astype(mx.float16).view(mx.uint16)))
    assert np.array_equal(np_(bf16.view(mx.uint16)), np_(mx.array(x).astype(mx.bfloat16).view(mx.uint16)))
    f16, bf16 = harness.run(small_launch(source, {"x": np.full(8, np.nan, np.float32)}, outs, 8))
    assert np.isnan(np_(f16)).all() and (np_(bf16.view(mx.uint16)) & 0x7fff > 0x7f80).all()


def test_operation_counts_are_the_committed_ones(harness):
    """The SmolLM2 and Gemma 3 (D = 256) shapes' operation counts of the current kernel (both
    layouts) are those in bench_results/kernel_ops.json, and kernels/README.md shows that file's table."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "count_kernel_ops.py"
    spec = importlib.util.spec_from_file_location("count_kernel_ops", path)
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    data = json.loads(ops.OUT.read_text())
    for name in ("smollm2-135m", "gemma3-270m"):
        r, d = ops.SHAPES[name]
        for layout in ("q4", "q4c"):
            assert ops.count(harness, ops.pass1(harness, layout, r, d), r) == data["after"][f"{name} {layout}"]
    assert ops.table(data) in ops.README.read_text()
