"""DeepSeek-V2 multi-head latent attention over a latent Q4 cache.

mlx-lm's DeepseekV2Attention expands each token's compressed latent into
full per-head keys and values before caching them: H * (nope + rope + v)
numbers per token and layer. The latent itself is much smaller, so this
module caches, per token, one single-head "key"

    [ c = kv_a_layernorm(latent)  (kv_lora_rank) | roped k_pe  (qk_rope_head_dim) ]

in the ordinary Q4 LayerCache, and attends with absorbed projections
(kv_b_proj split per head into W_uk (nope x rank) and W_uv (v x rank)):

    score_h = (q_nope_h W_uk_h) . c + q_pe_h . k_pe      (query lives in latent space)
    out_h   = (sum_t p_t c_t) W_uv_h^T                    (values are the keys' latent part)

Values are read straight from the stored keys (`values_from_keys`): since
kv_lora_rank is a multiple of the Q4 group size (64), the latent part of a
key is a whole number of groups and slicing the packed codes, scales and
biases along the last axis yields a valid Q4 tensor of the latent alone.

`install` swaps the class of each attention instance for a subclass that
overrides `__call__` only; everything else in mlx-lm's model is untouched,
and caches other than ours still take mlx-lm's own path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.deepseek_v2 import DeepseekV2Attention

from .. import q4
from ..kvcache import BatchView, LayerCache
from ..q4 import GROUP_SIZE

MODES = ("latent", "full")


def _dense_weight(layer: nn.Module) -> mx.array:
    """The weight of a Linear or QuantizedLinear as a dense matrix (out, in)."""
    if isinstance(layer, nn.QuantizedLinear):
        mode = getattr(layer, "mode", "affine")
        return mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size, bits=layer.bits, mode=mode
        ).astype(layer.scales.dtype)
    return layer.weight


class LatentMLAAttention(DeepseekV2Attention):
    """DeepseekV2Attention caching the latent instead of per-head K/V (see module doc)."""

    def _absorb(self) -> None:
        if self.kv_lora_rank % GROUP_SIZE:
            raise ValueError(f"kv_lora_rank {self.kv_lora_rank} is not a multiple of the group size {GROUP_SIZE}")
        w = _dense_weight(self.kv_b_proj).reshape(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        # Leading underscores keep these out of parameters(): they are derived, not weights.
        self._w_uk = w[:, : self.qk_nope_head_dim, :]  # (H, nope, rank): q_nope -> latent
        self._w_uv_t = w[:, self.qk_nope_head_dim :, :].swapaxes(1, 2)  # (H, rank, v): latent -> value
        mx.eval(self._w_uk, self._w_uv_t)

    def _latent_values(self, k: tuple) -> tuple:
        """Stored keys (fp16 or packed Q4/Q8 triple) -> their latent part, as values."""
        d = self.kv_lora_rank + self.qk_rope_head_dim
        return tuple(x[..., : x.shape[-1] * self.kv_lora_rank // d] for x in k)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if not isinstance(cache, (LayerCache, BatchView)):
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)

        latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, L, rank)
        k_pe = k_pe.reshape(B, L, 1, self.qk_rope_head_dim).transpose(0, 2, 1, 3)
        q_pe = self.rope(q_pe, cache.offset)
        k_pe = self.rope(k_pe, cache.offset)
        cache.update_and_fetch(mx.concatenate([latent, k_pe.astype(latent.dtype)], axis=-1), None)

        queries = mx.concatenate([q_nope @ self._w_uk, q_pe], axis=-1)  # (B, H, L, rank + rope)
        out = cache.attend(queries, self.scale, values_from_keys=self._latent_values)  # (B, H, L, rank)
        out = out.astype(x.dtype) @ self._w_uv_t  # (B, H, L, v)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def bytes_per_token(config: dict, mode: str = "latent") -> int:
    """Q4 cache bytes per token, all layers, of a DeepSeek-V2 config in either mode."""
    rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    if mode == "latent":
        per_layer = q4.bytes_per_token(1, rank + rope, 0)
    else:
        heads, nope, v = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
        per_layer = q4.bytes_per_token(heads, nope + rope, v)
    return config["num_hidden_layers"] * per_layer


def install(model: nn.Module) -> int:
    """Switch every DeepseekV2Attention in `model` to the latent cache; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is DeepseekV2Attention:
            m.__class__ = LatentMLAAttention
            m._absorb()
        if isinstance(m, LatentMLAAttention):
            n += 1
    return n


def uninstall(model: nn.Module) -> int:
    """Back to mlx-lm's own attention (full per-head K/V in the cache)."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is LatentMLAAttention:
            m.__class__ = DeepseekV2Attention
            for k in ("_w_uk", "_w_uv_t"):
                m.pop(k, None)
            n += 1
    return n
