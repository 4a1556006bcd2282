"""Turns of one agent that any process can replay exactly: state k's tokens and,
for any position, the keys and values it stores (for the kill tests)."""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx

from mlx_agentcache.kvcache import AgentCache, LayerCache
from tiny import tokens

LAYERS, HEADS, DIM, VOCAB = 2, 2, 64, 512
_TABLE = mx.random.normal((LAYERS, 2, VOCAB, HEADS, DIM), key=mx.random.key(11))


def new_cache() -> AgentCache:
    return AgentCache([LayerCache("q4c") for _ in range(LAYERS)])


def state_tokens(k: int) -> list[int]:
    """300 tokens, then per turn: the last 2 cut (a template's end of turn), 15 new."""
    out = tokens(300)
    for j in range(k):
        out = out[:-2] + tokens(15, seed=100 + j)
    return out


def advance(cache: AgentCache, k: int) -> None:
    """Turn the cache into state k: cut at the common prefix, append the rest."""
    target = state_tokens(k)
    cache.trim_to(cache.common_prefix(target))
    a = cache.offset
    ids = mx.array(target[a:])
    pos = mx.arange(a, len(target)).astype(mx.float32)[None, :, None]
    for i, layer in enumerate(cache.layers):
        k_, v_ = (_TABLE[i, part][ids].transpose(1, 0, 2) + 0.01 * pos for part in (0, 1))
        layer.append_dense(k_, v_)
    cache.tokens = list(target)


def replayed(k: int) -> AgentCache:
    cache = new_cache()
    for j in range(k + 1):
        advance(cache, j)
    return cache
