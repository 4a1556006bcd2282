"""Build step beyond pyproject.toml: the BLAS shim (Linux only; see mlx_agentcache/blas.py).

It is optional: without a C compiler the package still installs, and `blas.py` keeps
MLX's reference BLAS with one line saying why.
"""

import platform

from setuptools import Extension, setup

shim = Extension("mlx_agentcache._blas_shim", ["mlx_agentcache/blas_shim.c"], optional=True)
setup(ext_modules=[shim] if platform.system() == "Linux" else [])
