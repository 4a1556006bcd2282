"""Load an optimized BLAS before `mlx.core` on Linux.

The `mlx[cpu]` wheel links the reference BLAS, which makes matrix products
about 25x slower than OpenBLAS. MLX resolves `cblas_*` symbols at load time,
so a library opened with RTLD_GLOBAL *before* `mlx.core` wins. We use the
OpenBLAS of the `cmeel-openblas` wheel. It needs `libgfortran.so.5`; when the
system has none, we reuse the libgfortran that the MLX wheel itself bundles
(under a mangled soname) by writing a copy whose soname reads
`libgfortran.so.5` into the user's cache directory.

OpenBLAS threads busy-wait; when they share cores with our own I/O threads
(background reloads and saves) or another process, a 2-core machine ran
prefill 6x and decode 14x slower. We leave one core free by default
(OPENBLAS_NUM_THREADS = cores - 1); an explicit setting wins.

Set AGENTCACHE_BLAS=reference to keep MLX's own BLAS (for comparisons).
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
import sysconfig
from pathlib import Path

STATE = {"blas": "platform default", "detail": ""}


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(dirs))


def _find(pattern: str) -> str | None:
    for d in _site_dirs():
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    return None


def _gfortran_from_mlx_wheel() -> bool:
    """Preload the MLX wheel's bundled libgfortran under the soname OpenBLAS asks for."""
    src = _find("mlx_cpu.libs/libgfortran-*.so*")
    if src is None:
        return False
    for quadmath in glob.glob(os.path.join(os.path.dirname(src), "libquadmath-*.so*")):
        ctypes.CDLL(quadmath, mode=ctypes.RTLD_GLOBAL)
    home = Path(os.environ.get("AGENTCACHE_HOME", Path.home() / ".agentcache"))
    dst = home / "lib" / "libgfortran.so.5"
    if not dst.exists():
        data = Path(src).read_bytes()
        old = os.path.basename(src).encode() + b"\0"
        new = b"libgfortran.so.5\0"
        if data.count(old) != 1 or len(new) > len(old):
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data.replace(old, new.ljust(len(old), b"\0")))
        os.replace(tmp, dst)
    ctypes.CDLL(str(dst), mode=ctypes.RTLD_GLOBAL)
    return True


def load_optimized_blas() -> str:
    """Open OpenBLAS globally if we are on Linux and mlx.core is not loaded yet."""
    if platform.system() != "Linux" or os.environ.get("AGENTCACHE_BLAS") == "reference":
        STATE["blas"] = "mlx default" if platform.system() == "Linux" else STATE["blas"]
        return STATE["blas"]
    if "mlx.core" in sys.modules:
        STATE["blas"] = "unknown (mlx.core was imported before mlx_agentcache)"
        return STATE["blas"]
    lib = _find("cmeel.prefix/lib/libopenblas.so.0")
    if lib is None:
        STATE["blas"] = "reference (cmeel-openblas not installed)"
        return STATE["blas"]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        try:
            if not _gfortran_from_mlx_wheel():
                raise OSError("no libgfortran.so.5")
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            STATE["blas"] = f"reference (OpenBLAS failed to load: {e})"
            return STATE["blas"]
    STATE["blas"] = f"OpenBLAS ({os.environ['OPENBLAS_NUM_THREADS']} threads)"
    STATE["detail"] = lib
    return STATE["blas"]
