"""The CPU harness catches what a GPU would get wrong: each test breaks a copy of the decode kernel
in one way and asserts that the harness (or its ThreadSanitizer build) reports it, quickly.

The unbroken kernel must run clean under ThreadSanitizer too.
"""

import mlx_agentcache  # noqa: F401  (first: preloads the BLAS before mlx.core)

import shutil
import time

import mlx.core as mx
import numpy as np
import pytest
from harness_runner import KERNELS, Harness, np_

from mlx_agentcache import q4_format

BARRIER = "  threadgroup_barrier(mem_flags::mem_threadgroup);\n"
# (dtype, D, Dv, R, B, n_kv, N, lengths, splits): two threadgroups and two splits per sequence.
CASE = (mx.float32, 128, 64, 3, 2, 1, 96, [96, 37], 2)


@pytest.fixture(scope="module")
def case():
    dtype, d, dv, r, b, n_kv, n, lengths, splits = CASE
    rng = np.random.default_rng(7)
    queries = mx.array(rng.standard_normal((b, n_kv * r, 1, d)).astype(np.float32)).astype(dtype)
    kq = q4_format.quantize(mx.array(rng.standard_normal((b, n_kv, n, d)).astype(np.float32) * 2))
    vq = q4_format.quantize(mx.array(rng.standard_normal((b, n_kv, n, dv)).astype(np.float32)))
    want = np_(q4_format.decode_attention_q4(queries, kq, vq, d**-0.5, mx.array(lengths, dtype=mx.int32)))
    return queries, kq, vq, d**-0.5, lengths, splits, want


def broken(tmp_path, edit) -> Harness:
    """A harness over a copy of kernels/ whose decode_attention.metal went through `edit`."""
    root = tmp_path / "kernels"
    shutil.copytree(KERNELS, root)
    path = root / "decode_attention.metal"
    text = path.read_text()
    new = edit(text)
    assert new != text, "the edit did not apply"
    path.write_text(new)
    (tmp_path / "out").mkdir()
    return Harness(tmp_path / "out", kernels=root)


def start(h: Harness, case, **kw):
    queries, kq, vq, scale, lengths, splits, _ = case
    b, n_kv, n = kq.packed.shape[:3]
    d, dv, r = queries.shape[-1], vq.packed.shape[-1] * 8, queries.shape[1] // n_kv
    t = time.monotonic()
    proc, out = h.start("decode", [b, n_kv, n, splits], h.decode_inputs(queries, kq, vq, scale, lengths),
                        h.decode_defines(queries.dtype, d, dv, r), **kw)
    return proc, out, time.monotonic() - t


def result(out, case) -> np.ndarray:
    return np.fromfile(out / "out.bin", dtype=np.float32).reshape(case[-1].shape)


def nth(text: str, needle: str, k: int) -> int:
    i = -1
    for _ in range(k + 1):
        i = text.index(needle, i + 1)
    return i


def replace_nth(text: str, needle: str, new: str, k: int) -> str:
    i = nth(text, needle, k)
    return text[:i] + new + text[i + len(needle):]


def test_unbroken_kernel_is_clean_under_thread_sanitizer(tmp_path, case):
    h = Harness(tmp_path)
    for seed in (1, 2):
        proc, out, _ = start(h, case, tsan=True, seed=seed)
        assert proc.returncode == 0 and "ThreadSanitizer" not in proc.stderr, proc.stderr[-3000:]
        got = result(out, case)
        assert np.max(np.abs(got - case[-1])) / np.max(np.abs(case[-1])) < 1e-5


@pytest.mark.parametrize("which", [0, 1])
def test_deleted_barrier_is_caught(tmp_path, case, which):
    """ThreadSanitizer reports the race every time; the plain build gives wrong values or NaN."""
    h = broken(tmp_path, lambda s: replace_nth(s, BARRIER, "", which))
    proc, _, _ = start(h, case, tsan=True, seed=3)
    assert proc.returncode == 66 and "data race" in proc.stderr, proc.stderr[-3000:]
    wrong = 0
    for seed in (4, 5, 6):
        proc, out, _ = start(h, case, seed=seed)
        assert proc.returncode == 0, proc.stderr
        got = result(out, case)
        wrong += not np.allclose(got, case[-1], rtol=1e-4, atol=1e-5)
    assert wrong >= 1, "three runs without the barrier gave the right answer"


def test_barrier_round_from_two_call_sites_fails(tmp_path, case):
    divergent = ("  if (tid % 2) {\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  } else {\n"
                 "    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n")
    h = broken(tmp_path, lambda s: replace_nth(s, BARRIER, divergent, 0))
    proc, _, _ = start(h, case)
    assert proc.returncode == 3 and "mixes call sites" in proc.stderr, proc.stderr


def test_thread_leaving_before_a_barrier_fails_at_once(tmp_path, case):
    h = broken(tmp_path, lambda s: replace_nth(s, BARRIER, "  if (tid == 77) return;\n" + BARRIER, 1))
    proc, _, elapsed = start(h, case, timeout_s=120)
    assert proc.returncode == 3 and "left the kernel" in proc.stderr, proc.stderr
    assert elapsed < 60


def test_missing_arrival_times_out_instead_of_hanging(tmp_path, case):
    spin = "  if (tid == 5) {\n    volatile int forever = 1;\n    while (forever) {\n    }\n  }\n"
    h = broken(tmp_path, lambda s: replace_nth(s, BARRIER, spin + BARRIER, 0))
    proc, _, elapsed = start(h, case, timeout_s=3)
    assert proc.returncode == 3 and "arrived within 3 s" in proc.stderr, proc.stderr
    assert elapsed < 60


def test_divergent_simd_function_fails(tmp_path, case):
    h = broken(tmp_path, lambda s: s.replace("      s[r] += simd_shuffle_xor(",
                                             "      if (lane < 16) s[r] += simd_shuffle_xor("))
    proc, _, _ = start(h, case)
    assert proc.returncode == 3 and "SIMD-group function" in proc.stderr, proc.stderr


def test_uninitialised_threadgroup_memory_reads_nan(tmp_path, case):
    """Without the SIMD groups' maxima written, the merge reads the NaN poison: NaN sums, wrong output."""
    h = broken(tmp_path, lambda s: s.replace("    m_s[sg * RT + r] = m[r];\n", ""))
    proc, out, _ = start(h, case, seed=8)
    assert proc.returncode == 0, proc.stderr
    assert np.isnan(np.fromfile(out / "sums.bin", dtype=np.float32)).all()
    assert not np.allclose(result(out, case), case[-1], atol=1e-3)


def test_fp16_and_bfloat16_conversions_match_mlx(tmp_path):
    """The shim's float -> fp16 / bfloat16 rounding (nearest even, subnormals, overflow, NaN) equals MLX's."""
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    edge = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 6e-8, 2.98e-8, 1 + 2**-11, 1 + 3 * 2**-11,
                     1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([bits.view(np.float32), edge])
    x = x[~np.isnan(x)]  # NaN payloads differ by platform; NaN-ness is checked below
    h = Harness(tmp_path)
    got = h.run("round", [x.size], {"x": x}, {"f16": np.uint16, "bf16": np.uint16})
    assert np.array_equal(got["f16"], np_(mx.array(x).astype(mx.float16).view(mx.uint16)))
    assert np.array_equal(got["bf16"], np_(mx.array(x).astype(mx.bfloat16).view(mx.uint16)))
    nan = h.run("round", [1], {"x": np.array([np.nan], np.float32)}, {"f16": np.float16, "bf16": np.uint16})
    assert np.isnan(nan["f16"]).all() and (nan["bf16"] & 0x7fff > 0x7f80).all()
