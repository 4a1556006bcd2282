"""Load an MLX model folder in the form that runs fastest on this backend.

Model folders hold 4-bit weights. On Metal, quantized matmuls are fast and we
keep them. On MLX's CPU backend they are not: a prefill through
`quantized_matmul` is tens of times slower than a float32 matmul through
OpenBLAS, and float16 arithmetic is slower still. So on CPU we cast to
float32 and, by default, dequantize the Linear layers and the embedding once
at load time. Decoding is faster that way too: the tied vocab head through
`quantized_matmul` costs more than reading its float32 copy (measured with
scripts/bench_weight_forms.py). The price is memory: 4 bytes per weight.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def dequantize_layers(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Swap QuantizedLinear (and QuantizedEmbedding) layers for float32 ones."""
    swaps = []
    for name, m in model.named_modules():
        is_embedding = isinstance(m, nn.QuantizedEmbedding)
        if not isinstance(m, nn.QuantizedLinear) and not (embeddings and is_embedding):
            continue
        w = mx.dequantize(
            m.weight,
            m.scales.astype(mx.float32),
            m.biases.astype(mx.float32),
            group_size=m.group_size,
            bits=m.bits,
            mode=m.mode,
        )
        new = nn.Embedding(*w.shape) if is_embedding else nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        new.weight = w
        if "bias" in m:
            new.bias = m.bias.astype(mx.float32)
        swaps.append((name, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def to_float32(model: nn.Module) -> nn.Module:
    """Cast every floating parameter, quantization scales and biases included."""
    model.set_dtype(mx.float32)  # mlx skips non-float (packed) weights
    return model


def prepare_for_backend(model: nn.Module, dequantize: bool | None = None) -> nn.Module:
    """Make a loaded model fast here: float32 and dequantized on CPU, as is on GPU."""
    if dequantize is None:
        dequantize = not on_gpu()
    if not on_gpu():
        to_float32(model)
    if dequantize:
        dequantize_layers(model)
    mx.eval(model.parameters())
    return model


def load_for_backend(path: str | Path, dequantize: bool | None = None):
    """`mlx_lm.utils.load(path)` followed by `prepare_for_backend`; returns (model, tokenizer)."""
    from mlx_lm.utils import load

    model, tokenizer = load(str(path))
    return prepare_for_backend(model, dequantize), tokenizer
