"""mlx-agentcache: many named agents, each with a persistent 4-bit KV cache."""

from .blas import load_optimized_blas

load_optimized_blas()  # must run before anything imports mlx.core

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Runtime", "Agent", "TurnStats"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
