"""Architecture-neutral prefill and decode on agent caches.

The runner wraps an mlx-lm model (Llama, Gemma 3, DeepSeek-V2, ...) without
changing its definition. Two things are added around it:

* attention: the model module's `scaled_dot_product_attention` is routed to
  `LayerCache.attend` when the cache is one of ours (other caches take the
  original path), so attention reads the quantized blocks directly;
* logits: prefill runs the transformer body only and applies the vocabulary
  head to the last position, because the head over every prompt position
  would dominate prefill time on large vocabularies.

The pool, scheduler and CLI talk to this interface only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import DEFAULT_KV
from ..kvcache import SINK_TOKENS, AgentCache, BatchView, LayerCache, StoredShape
from ..q4 import KEY_GROUP

PREFILL_CHUNK = 512


def _route_attention(model: nn.Module) -> None:
    """Make every model module's attention call dispatch on our cache types."""
    names = {type(m).__module__ for _, m in model.named_modules()}
    for name in names:
        mod = sys.modules.get(name)
        orig = getattr(mod, "scaled_dot_product_attention", None)
        if orig is None or getattr(orig, "agentcache", False):
            continue

        def sdpa(queries, keys, values, cache, scale, mask, sinks=None, _orig=orig):
            if isinstance(cache, (LayerCache, BatchView)):
                return cache.attend(queries, scale)
            return _orig(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

        sdpa.agentcache = True
        mod.scaled_dot_product_attention = sdpa


def _materialize(model: nn.Module) -> None:
    """Evaluate arrays a model builds lazily outside its parameters (RoPE frequency tables).

    Turns run on the scheduler's thread, and MLX cannot evaluate a graph that
    was built on another thread's stream.
    """
    mx.eval([v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)])


def fingerprint(model_path: Path) -> str:
    """Identity of a model folder: config plus every weight file's name, size and header."""
    h = hashlib.sha256((Path(model_path) / "config.json").read_bytes())
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 1 << 24)))
    return h.hexdigest()[:32]


class ModelRunner:
    """Prefill, decode and cache creation for one loaded model."""

    def __init__(
        self, model: nn.Module, tokenizer, config: dict, path: Path | None = None, kv_bits: int | str = DEFAULT_KV, mla_mode: str = "latent"
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = Path(path) if path else None
        self.kv_bits = kv_bits
        self._mode = LayerCache(kv_bits)
        self.fingerprint = fingerprint(path) if path else hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]
        self.windows = self._layer_windows()
        self.mla_mode = self._set_mla_mode(mla_mode)
        if self.mla_mode == "latent" and self._mode.rotate_keys:
            raise ValueError(f"{self.path.name if self.path else 'this model'}: a latent cache (DeepSeek MLA) cannot use q4k, "
                             "whose rotated keys cannot serve as values; use q4c, q4, q8 or fp16, or --mla full")
        if self.mla_mode:  # the cache layout differs per mode: files must not mix
            self.fingerprint = hashlib.sha256(f"{self.fingerprint}:mla={self.mla_mode}".encode()).hexdigest()[:32]
        _route_attention(model)
        _materialize(model)
        body = getattr(model, "model", None)
        self._body = body if body is not None and hasattr(body, "embed_tokens") else None
        self.stored_shapes = self._probe_shapes()

    @classmethod
    def load(cls, name_or_path: str, home: Path, kv_bits: int | str = DEFAULT_KV, mla_mode: str = "latent") -> "ModelRunner":
        from .model_store import load_model, resolve_model

        path = resolve_model(name_or_path, home)
        model, tokenizer, config = load_model(path)
        return cls(model, tokenizer, config, path, kv_bits, mla_mode)

    def _set_mla_mode(self, mode: str) -> str | None:
        """DeepSeek-V2 MLA: cache the latent ("latent", see mla.py) or mlx-lm's full K/V ("full")."""
        from . import mla

        if mode not in mla.MODES:
            raise ValueError(f"mla_mode must be one of {mla.MODES}, got {mode!r}")
        if self.config.get("model_type") != "deepseek_v2":
            return None
        (mla.install if mode == "latent" else mla.uninstall)(self.model)
        return mode

    def _layer_windows(self) -> list[int | None]:
        """Sliding window per layer, read from the model's own cache layout."""
        from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

        return [c.max_size if isinstance(c, RotatingKVCache) else None for c in make_prompt_cache(self.model)]

    @property
    def eos_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    def _probe_shapes(self) -> list[StoredShape]:
        """What each layer stores per token in this runner's KV mode, read off a
        one-token prefill: architecture-neutral (GQA, MLA latent, windows alike)."""
        cache = AgentCache([LayerCache(self.kv_bits, w) for w in self.windows])
        self.prefill([0] * (SINK_TOKENS + KEY_GROUP), cache, logits=False)  # enough for a q4c body group
        return [StoredShape.of(*next(s for s in layer.segments if s.encoding == layer.encoding).view()) for layer in cache.layers]

    def new_cache(self, bits: int | str | None = None) -> AgentCache:
        """An empty cache; in the runner's own KV mode its layers know the shapes
        this model stores, so restored files are checked against them."""
        layers = [LayerCache(bits or self.kv_bits, w) for w in self.windows]
        if layers[0].mode == self._mode.mode:
            for layer, shape in zip(layers, self.stored_shapes):
                layer.expect = shape
        return AgentCache(layers)

    # -- forward -------------------------------------------------------------
    def _head(self, h: mx.array) -> mx.array:
        if "lm_head" in self.model:
            return self.model.lm_head(h)
        return self._body.embed_tokens.as_linear(h)

    def _forward(self, inputs: mx.array, caches, logits: bool) -> mx.array:
        if self._body is None:  # unknown layout: the whole model, logits everywhere
            return self.model(inputs, cache=caches)
        h = self._body(inputs, cache=caches)
        return self._head(h) if logits else h

    def prefill(self, tokens: list[int], cache: AgentCache, chunk: int = PREFILL_CHUNK, logits: bool = True) -> mx.array | None:
        """Append `tokens` to `cache`; return float32 logits (vocab,) after the last one.

        logits=False skips the vocabulary head: the scheduler prefills a long
        prompt in slices and needs logits after the last slice only."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        h = None
        for a in range(0, len(tokens), chunk):
            part = tokens[a : a + chunk]
            h = self._forward(mx.array(part)[None], cache.layers, logits=False)
            cache.tokens.extend(part)
            mx.eval([(s.keys, s.values) for layer in cache.layers for s in layer.segments[-1:]])
        if not logits:
            return None
        last = h[:, -1:, :]
        out = self._head(last) if self._body is not None else last
        return out[0, -1].astype(mx.float32)

    def logits(self, tokens: list[int], cache: AgentCache, chunk: int = PREFILL_CHUNK) -> mx.array:
        """Logits at every position (for perplexity), computed chunk by chunk."""
        outs = []
        for a in range(0, len(tokens), chunk):
            part = tokens[a : a + chunk]
            out = self._forward(mx.array(part)[None], cache.layers, logits=True)[0].astype(mx.float32)
            cache.tokens.extend(part)
            mx.eval(out)
            outs.append(out)
        return mx.concatenate(outs, axis=0)

    def decode(self, tokens: list[int], caches: list[AgentCache]) -> mx.array:
        """One step for several agents at once: (B,) tokens -> (B, vocab) logits."""
        if len(caches) == 1:
            layer_caches = caches[0].layers
        else:
            layer_caches = [BatchView([c.layers[i] for c in caches]) for i in range(len(caches[0].layers))]
        out = self._forward(mx.array(tokens)[:, None], layer_caches, logits=True)
        for c, t in zip(caches, tokens):
            c.tokens.append(t)
        return out[:, -1].astype(mx.float32)

    def sample(self, logits: mx.array, temperature: float, key: mx.array | None) -> int:
        if temperature <= 0:
            return int(mx.argmax(logits).item())
        return int(mx.random.categorical(logits / temperature, key=key).item())
