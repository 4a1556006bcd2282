"""The BLAS choice: decided from CPU features, loaded before mlx.core, correct on every shape.

Products run in a child process: a BLAS built for the wrong CPU dies with SIGILL,
and the test must see that as a failure rather than take the test runner down.
"""

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from mlx_agentcache import blas

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 pni avx avx2 fma avx512f avx512dq avx512bw avx512vl amx_tile amx_bf16
"""
OLD_X86 = "model name\t: Some old CPU\nflags\t\t: fpu sse sse2\n"
GRAVITON = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\nCPU implementer\t: 0x41\n"

# The products MLX runs for our models: square, one row (decode), batched, and SmolLM2's
# own projections (hidden 576, MLP 1536, 9 query heads of 64, vocabulary 49152).
PRODUCTS = r"""
import json, sys
import mlx_agentcache
from mlx_agentcache import blas
import mlx.core as mx
import numpy as np

rng = np.random.default_rng(0)
shapes = [((256, 256), (256, 256)), ((1024, 1024), (1024, 1024)), ((1, 576), (576, 1536)),
          ((4, 64, 128), (4, 128, 32)), ((512, 576), (576, 1536)), ((9, 300, 64), (9, 64, 300)),
          ((1, 576), (576, 49152)), ((3, 577), (577, 5))]
if sys.argv[1:] == ["small"]:  # under CPU emulation: every kind of product, smaller sizes
    shapes = [((64, 64), (64, 64)), ((1, 576), (576, 192)), ((4, 16, 128), (4, 128, 32)), ((3, 577), (577, 5))]
worst = 0.0
for sa, sb in shapes:
    for dtype in (np.float32, np.float16):
        a = rng.standard_normal(sa).astype(dtype)
        b = rng.standard_normal(sb).astype(dtype)
        got = np.array(mx.array(a) @ mx.array(b)).astype(np.float64)
        want = a.astype(np.float64) @ b.astype(np.float64)
        scale = np.sqrt(sa[-1])  # the sum's natural size
        worst = max(worst, float(np.abs(got - want).max() / scale / (1e-5 if dtype == np.float32 else 1e-2)))
print(json.dumps({"blas": blas.CHOICE.name, "kernel": blas.CHOICE.kernel, "threads": blas.CHOICE.threads,
                  "reason": blas.CHOICE.reason, "worst": worst}))
"""


def run_products(env_extra: dict | None = None, prefix: list[str] | None = None, args: tuple = (), timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTCACHE_BLAS", "OPENBLAS_", "MKL_"))}
    env.update(env_extra or {})
    p = subprocess.run([*(prefix or []), sys.executable, "-c", PRODUCTS, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"child died (rc {p.returncode}; -4 is SIGILL):\n{p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_plan_follows_cpu_features():
    zen3 = blas.read_cpuinfo(ZEN3, "x86_64")
    assert zen3.model == "AMD EPYC 7763 64-Core Processor"
    assert zen3.features()["avx2"] and not zen3.features()["avx512f"]
    assert blas.plan(zen3, "auto", "Linux") == ("openblas", "AVX2 CPU: runtime-dispatch OpenBLAS picks its kernels for this CPU")

    spr = blas.read_cpuinfo(SAPPHIRE_RAPIDS, "x86_64")
    assert spr.features()["amx"] and spr.features()["avx512bw+vl+dq"]
    assert blas.plan(spr, "auto", "Linux")[0] == "openblas"
    assert blas.plan(spr, "mkl", "Linux")[0] == "mkl"
    assert blas.plan(zen3, "reference", "Linux")[0] == "reference"

    old = blas.read_cpuinfo(OLD_X86, "x86_64")
    name, why = blas.plan(old, "auto", "Linux")
    assert name == "reference" and "SSE3" in why
    assert blas.plan(old, "mkl", "Linux")[0] == "reference"

    arm = blas.read_cpuinfo(GRAVITON, "aarch64")
    assert blas.plan(arm, "auto", "Linux")[0] == "openblas"
    assert blas.plan(arm, "mkl", "Linux")[0] == "reference"
    assert blas.plan(zen3, "auto", "Darwin")[0] == "platform default"


def test_this_machine_reads_its_own_cpu():
    cpu = blas.read_cpuinfo()
    assert cpu.arch == platform.machine().lower()
    if platform.system() == "Linux":
        assert cpu.flags or cpu.arch not in ("x86_64", "amd64"), "no flags parsed from /proc/cpuinfo"


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS is chosen on Linux only; macOS uses Accelerate")
def test_optimized_blas_gives_numpy_values_on_every_shape():
    r, stderr = run_products()
    assert r["blas"].startswith("OpenBLAS"), f"expected the optimized BLAS, got {r} / {stderr}"
    assert r["kernel"], "OpenBLAS did not report the kernels it chose"
    assert r["threads"] == max(1, (os.cpu_count() or 2) - 1)
    assert r["worst"] < 1.0, r
    assert "warning: BLAS" not in stderr


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS is chosen on Linux only; macOS uses Accelerate")
def test_reference_blas_on_request_and_thread_override():
    r, _ = run_products({"AGENTCACHE_BLAS": "reference"})
    assert r["blas"] == "MLX reference BLAS" and r["worst"] < 1.0
    r, _ = run_products({"OPENBLAS_NUM_THREADS": "1"})
    assert r["threads"] == 1


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS is chosen on Linux only; macOS uses Accelerate")
def test_unknown_choice_falls_back_with_one_line():
    r, stderr = run_products({"AGENTCACHE_BLAS": "fastest"})
    assert r["blas"] == "MLX reference BLAS"
    lines = [line for line in stderr.splitlines() if line.startswith("warning: BLAS:")]
    assert len(lines) == 1 and "'fastest'" in lines[0]


@pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux", reason="emulates an x86-64 CPU")
def test_runs_on_an_avx2_cpu_without_avx512():
    """AMD Zen 3 (AVX2, FMA, no AVX-512), emulated by qemu-user on whatever CPU runs the tests.

    The `cmeel-openblas` wheel this replaces dies here with SIGILL (rc 132): its kernels
    are AVX-512 only. qemu-user shows the host's /proc/cpuinfo, so our stated reason may
    name the host's features; OpenBLAS's own dispatch reads the emulated CPUID, which is
    what decides the instructions executed.
    """
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: install Debian's qemu-user (the README's test command does)"
    r, _ = run_products(prefix=[qemu, "-cpu", "EPYC-Milan-v1"], args=("small",), timeout=600)
    assert r["blas"].startswith("OpenBLAS") and r["kernel"] in ("Haswell", "Zen"), r
    assert r["worst"] < 1.0, r


SHIM_PRODUCTS = r"""
import ctypes, itertools, json
import mlx_agentcache
from mlx_agentcache import blas
import numpy as np

shim = ctypes.CDLL(blas.shim_library())
f, i = ctypes.c_float, ctypes.c_int
shim.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, ctypes.c_void_p, i, ctypes.c_void_p, i, f, ctypes.c_void_p, i]
rng = np.random.default_rng(1)
worst, cases = 0.0, 0
for (m, n, k), ta, tb, beta in itertools.product([(1, 7, 5), (6, 1, 5), (1, 1, 4), (3, 4, 2), (1, 300, 577)],
                                                 (111, 112), (111, 112), (0.0, 0.5)):
    a = rng.standard_normal((m, k) if ta == 111 else (k, m)).astype(np.float32)
    b = rng.standard_normal((k, n) if tb == 111 else (n, k)).astype(np.float32)
    ldc = n + 3  # a padded output: only the first n columns of each row are C
    c = np.full((m, ldc), np.nan if beta == 0.0 else 2.0, np.float32)
    want = 1.5 * (a if ta == 111 else a.T).astype(np.float64) @ (b if tb == 111 else b.T) + (beta * c[:, :n] if beta else 0)
    shim.cblas_sgemm(101, ta, tb, m, n, k, 1.5, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], beta,
                     c.ctypes.data, ldc)
    worst = max(worst, float(np.abs(c[:, :n] - want).max()))
    assert np.isnan(c[:, n:]).all() or beta, "wrote outside C"
    cases += 1
print(json.dumps({"worst": worst, "cases": cases}))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="the shim is built on Linux only")
def test_shim_forwards_every_product_shape_exactly():
    """Called directly: one row, one column, every transposition, a padded C, stale NaNs in C ignored at beta 0."""
    p = subprocess.run([sys.executable, "-c", SHIM_PRODUCTS], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["cases"] == 40 and r["worst"] < 1e-4, r


def test_doctor_reports_cpu_blas_and_a_measured_rate():
    p = subprocess.run([sys.executable, "-m", "mlx_agentcache", "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout)
    cpu = blas.read_cpuinfo()
    assert info["cpu"] == cpu.model and info["arch"] == cpu.arch
    assert set(info["cpu_features"]) >= {"avx2", "avx512f", "amx"}
    assert info["cpu_features"]["avx2"] == cpu.has("avx2")
    assert info["blas_reason"] and info["sgemm_gflops_1024"] > 0
    if platform.system() == "Linux":
        assert info["blas"].startswith("OpenBLAS") and info["blas_library"].endswith("libscipy_openblas.so")
