"""Choose the CPU BLAS from the CPU's features and load it before `mlx.core`.

On Linux the `mlx[cpu]` wheel links the reference BLAS: matrix products run about
20x slower than with an optimized one. MLX binds `cblas_sgemm` & co. when
`libmlx.so` loads, so a library opened with RTLD_GLOBAL *before* `mlx.core` wins.

The default is OpenBLAS from the `scipy-openblas32` wheel: a DYNAMIC_ARCH build
that picks its kernels from the CPU at run time (Haswell, Zen, SkylakeX, ...),
BSD-licensed, 8 MB, no Fortran runtime. Its symbols carry a `scipy_` prefix, so a
small compiled shim (`blas_shim.c`, built by `pip install`) forwards the plain
CBLAS names to it. Single-target builds are not used: the `cmeel-openblas` wheel
(SKYLAKEX only) died with SIGILL on AVX2 CPUs without AVX-512.

The decision is made from /proc/cpuinfo before any library is opened, never by
trying and crashing. A CPU or install that the library cannot serve keeps MLX's
reference BLAS, with one line on stderr saying why.

`AGENTCACHE_BLAS` picks explicitly: `auto` (default), `openblas`, `mkl` (Intel's
runtime from the `mkl` wheel, if installed) or `reference` (MLX's own).

OpenBLAS threads busy-wait; when they share cores with our reload and save
threads a 2-core machine ran prefill 6x and decode 14x slower, so we leave one
core free by default (OPENBLAS_NUM_THREADS / MKL_NUM_THREADS = cores - 1); an
explicit setting wins.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import warn

CHOICES = ("auto", "openblas", "mkl", "reference")


@dataclass(frozen=True)
class CpuInfo:
    """What the kernel reports about the CPU: enough to decide which BLAS can run."""

    arch: str
    model: str
    flags: frozenset[str]

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    def features(self) -> dict[str, bool]:
        """The features that decide BLAS kernels (and the ones that bit us before)."""
        return {
            "avx2": self.has("avx2"),
            "fma": self.has("fma"),
            "avx512f": self.has("avx512f"),
            "avx512bw+vl+dq": self.has("avx512bw", "avx512vl", "avx512dq"),
            "amx": self.has("amx_tile"),
            "neon": self.arch in ("aarch64", "arm64"),
        }


def read_cpuinfo(text: str | None = None, arch: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo (or `text`); machines without it get an empty flag set."""
    arch = arch or platform.machine().lower()
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(arch, model or platform.processor() or arch, frozenset(flags))


@dataclass
class BlasChoice:
    """Which BLAS serves MLX's matrix products in this process, and why."""

    name: str = "platform default"
    reason: str = ""
    library: str = ""
    threads: int | None = None
    kernel: str = ""  # OpenBLAS's own name for the kernels it picked (e.g. "Zen")
    cpu: CpuInfo | None = field(default=None, repr=False)

    def summary(self) -> str:
        parts = [self.name]
        if self.kernel:
            parts.append(f"kernels {self.kernel}")
        if self.threads:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return ", ".join(parts)


CHOICE = BlasChoice()


def _site_file(package: str, *parts: str) -> str | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    return path if os.path.exists(path) else None


def shim_library() -> str | None:
    """The compiled CBLAS shim (blas_shim.c), if `pip install` could build it."""
    spec = importlib.util.find_spec("mlx_agentcache._blas_shim")
    return spec.origin if spec is not None and spec.origin else None


def mkl_library() -> str | None:
    """libmkl_rt from the `mkl` wheel, if installed (it lives in <prefix>/lib, not in site-packages)."""
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if hits:
            return hits[0]
    return None


def _threads(var: str) -> int:
    os.environ.setdefault(var, str(max(1, (os.cpu_count() or 2) - 1)))
    try:
        return int(os.environ[var])
    except ValueError:
        return 0


def plan(cpu: CpuInfo, requested: str, system: str | None = None) -> tuple[str, str]:
    """(library, reason) for this CPU: a pure decision from features, testable anywhere."""
    system = system or platform.system()
    if system != "Linux":
        return "platform default", f"{system}: MLX uses the platform's BLAS (Accelerate on macOS)"
    if requested == "reference":
        return "reference", "AGENTCACHE_BLAS=reference"
    x86 = cpu.arch in ("x86_64", "amd64")
    if requested == "mkl":
        if not x86 or not cpu.has("avx2"):
            return "reference", "AGENTCACHE_BLAS=mkl, but MKL is only used on x86-64 CPUs with AVX2"
        return "mkl", "AGENTCACHE_BLAS=mkl"
    # OpenBLAS DYNAMIC_ARCH: its oldest x86-64 kernels need SSE3 ("pni"); any arm64 works.
    if x86 and not cpu.has("pni"):
        return "reference", "this CPU lacks SSE3, the oldest OpenBLAS kernels' floor"
    if not x86 and cpu.arch not in ("aarch64", "arm64"):
        return "reference", f"no optimized BLAS is packaged for {cpu.arch}"
    f = cpu.features()
    simd = "AVX-512" if f["avx512f"] else "AVX2" if f["avx2"] else "NEON" if f["neon"] else "SSE3"
    why = "requested" if requested == "openblas" else f"{simd} CPU"
    return "openblas", f"{why}: runtime-dispatch OpenBLAS picks its kernels for this CPU"


def _open_openblas() -> BlasChoice:
    lib = _site_file("scipy_openblas32", "lib", "libscipy_openblas.so")
    shim = shim_library()
    if lib is None:
        raise OSError("the scipy-openblas32 package is not installed")
    if shim is None:
        raise OSError("the BLAS shim was not built at install time (no C compiler?); reinstall with one")
    threads = _threads("OPENBLAS_NUM_THREADS")
    handle = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    handle.scipy_openblas_get_corename.restype = ctypes.c_char_p
    kernel = handle.scipy_openblas_get_corename().decode()
    threads = handle.scipy_openblas_get_num_threads() or threads
    return BlasChoice("OpenBLAS (scipy-openblas32, runtime dispatch)", library=lib, threads=threads, kernel=kernel)


def _open_mkl() -> BlasChoice:
    lib = mkl_library()
    if lib is None:
        raise OSError("the mkl package is not installed")
    threads = _threads("MKL_NUM_THREADS")
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    return BlasChoice("Intel MKL (mkl wheel)", library=lib, threads=threads)


def load_optimized_blas() -> BlasChoice:
    """Pick and open the BLAS; call once, before anything imports mlx.core."""
    global CHOICE
    cpu = read_cpuinfo()
    requested = os.environ.get("AGENTCACHE_BLAS", "auto").strip().lower() or "auto"
    if requested not in CHOICES:
        CHOICE = BlasChoice("MLX reference BLAS", f"AGENTCACHE_BLAS={requested!r} is not one of {', '.join(CHOICES)}", cpu=cpu)
        _say(CHOICE.reason)
        return CHOICE
    name, reason = plan(cpu, requested)
    if name in ("platform default", "reference"):
        CHOICE = BlasChoice("MLX reference BLAS" if name == "reference" else name, reason, cpu=cpu)
        if name == "reference" and requested != "reference":
            _say(f"{reason}; using MLX's reference BLAS (matrix products about 20x slower)")
        return CHOICE
    if "mlx.core" in sys.modules:
        CHOICE = BlasChoice("unknown", "mlx.core was imported before mlx_agentcache", cpu=cpu)
        return CHOICE
    try:
        CHOICE = _open_mkl() if name == "mkl" else _open_openblas()
    except (OSError, AttributeError) as e:
        CHOICE = BlasChoice("MLX reference BLAS", f"{name} could not be loaded: {e}", cpu=cpu)
        _say(f"{CHOICE.reason}; using MLX's reference BLAS (matrix products about 20x slower)")
        return CHOICE
    CHOICE.reason, CHOICE.cpu = reason, cpu
    return CHOICE


def _say(line: str) -> None:
    warn(f"warning: BLAS: {line}")


def measure_gflops(n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of one float32 n x n x n product through MLX (median of `repeats`, after a warm-up)."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9
