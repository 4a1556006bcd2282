"""Small deterministic models and caches for the pool and cache-file tests.

`tiny_runner` is a seeded random 2-layer Llama (output is meaningless) wrapped
in a ModelRunner; `random_cache` builds an AgentCache without any model, so
crash tests can recreate the exact tensors a child process saved.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx

from mlx_agentcache.kvcache import AgentCache, LayerCache


class TokenizerStub:
    eos_token_ids = [0]


def tiny_runner(kv_bits: int = 4, layers: int = 2, seed: int = 0, tokenizer=None):
    from mlx_lm.models.llama import Model, ModelArgs

    from mlx_agentcache.models.runner import ModelRunner

    args = ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=layers, intermediate_size=256,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=512, num_key_value_heads=1, tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return ModelRunner(model, tokenizer or TokenizerStub(), {**args.__dict__, "seed": seed}, None, kv_bits)


def tokens(n: int, seed: int = 1, vocab: int = 512) -> list[int]:
    """Deterministic token ids in [1, vocab) (0 is the stub's EOS)."""
    return [1 + (seed * 7919 + i * 104729) % (vocab - 1) for i in range(n)]


def random_cache(seed: int, layers: int = 2, heads: int = 2, n: int = 300, dim: int = 64, bits: int | str = 4) -> AgentCache:
    """An AgentCache with seeded random keys/values: same seed, same bytes, in any process.
    `bits` is a KV mode (4 = q4, or "q4c", ...)."""
    out = []
    for i in range(layers):
        k, v = mx.random.normal((2, heads, n, dim), key=mx.random.key(seed * 1000 + i))
        layer = LayerCache(bits)
        layer.append_dense(k, v)
        out.append(layer)
    mx.eval([s.keys + s.values for layer in out for s in layer.segments])
    return AgentCache(out, tokens(n, seed))


def same_tensors(a: AgentCache, b: AgentCache) -> bool:
    if a.tokens != b.tokens or len(a.layers) != len(b.layers):
        return False
    for x, y in zip(a.layers, b.layers):
        rx, ry = x.stored_segments(x.start), y.stored_segments(y.start)
        if x.offset != y.offset or x.start != y.start or [r[0] for r in rx] != [r[0] for r in ry]:
            return False
        if (x.sinks is None) != (y.sinks is None) or (x.sinks is not None and not all(
                mx.array_equal(p, q).item() for p, q in zip(x.sinks, y.sinks))):
            return False
        for (_, kx, vx), (_, ky, vy) in zip(rx, ry):
            px, py = kx + (vx or ()), ky + (vy or ())
            if len(px) != len(py) or not all(p.shape == q.shape and mx.array_equal(p, q).item() for p, q in zip(px, py)):
                return False
    return True
