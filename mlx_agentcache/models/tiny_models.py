"""Tiny, RANDOMLY initialised models of real architectures.

The DeepSeek-V2 (MLA + MoE) and Llama 3 code paths need testing and
benchmarking on machines that cannot download multi-gigabyte checkpoints.
These builders write ordinary MLX model folders (config.json,
model.safetensors, a byte-level tokenizer) whose shapes follow the real
configurations scaled down, with seeded random weights. Their output is
gibberish by design; every name, config and README says "random".

The weights are float32 so that comparisons between cache layouts measure
the cache, not weight rounding. The architecture itself comes from mlx-lm's
model definitions: only the parameter shapes are read from them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

COMMENT = "RANDOM WEIGHTS: tiny seeded random model for tests and benchmarks; its output is meaningless."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 256 + len(SPECIAL_TOKENS)


def deepseek_v2_config() -> dict:
    """DeepSeek-V2(-Lite) layout scaled down: MLA with a q LoRA, MoE with shared experts, yarn RoPE."""
    return {
        "_comment": COMMENT,
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": VOCAB,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 192,
        "kv_lora_rank": 128,  # multiple of 64: latent and rope parts fill whole Q4 groups
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "max_position_embeddings": 163840,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 258,
        "torch_dtype": "float32",
    }


def llama3_config() -> dict:
    """Llama 3 layout scaled down: GQA 8/2 heads (real: 32/8), head_dim 64, llama3 RoPE scaling."""
    return {
        "_comment": COMMENT,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 258,
        "torch_dtype": "float32",
    }


def llama3_8b_geometry_config() -> dict:
    """Llama 3.1 8B's KV geometry (32 layers, 8 KV heads, head_dim 128) on a small
    hidden size: its caches are as large as the real model's (a Q4 cache of 4K tokens
    is about 150 MB), so reloads cost what they would, while the weights stay cheap.
    8 query heads, not the real 32: on a CPU, attention over the cache dominates a
    decode step, and a quarter of the queries keeps a step near one reload's time
    (on an Apple GPU a reload of 150 MB takes several 8B decode steps). For the
    interleave benchmark; its decode speed is not an 8B model's."""
    return llama3_config() | {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 32,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 128,
    }


def llama3_8b_width_config() -> dict:
    """Two of Llama 3.1 8B's layers at their true width (hidden 4096, MLP 14336, 32 query
    and 8 KV heads of 128): per layer the same weights and the same cache as the real
    model, so the share of a decode step spent on weights and on the cache, and with
    it what batching buys, is the real model's on this backend. 1.7 GB of float32.
    For the batch probe (scripts/probe_batch.py)."""
    return llama3_config() | {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    }


CONFIGS = {"deepseek-v2-tiny-random": deepseek_v2_config, "llama3-tiny-random": llama3_config,
           "llama3-8b-geometry-random": llama3_8b_geometry_config, "llama3-8b-width-random": llama3_8b_width_config}


def random_weights(config: dict, seed: int) -> dict[str, mx.array]:
    """Seeded weights for every parameter of mlx-lm's model for `config`.

    Scales keep activations O(1) through depth (std 1/sqrt(fan_in)) so that
    logits are decisive and greedy decoding is a meaningful comparison.
    """
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in sorted(tree_flatten(model.parameters())):
        if name.endswith("norm.weight"):
            w = np.ones(p.shape, np.float32)
        elif name.endswith("bias"):
            w = np.zeros(p.shape, np.float32)
        elif name.endswith("embed_tokens.weight"):
            w = rng.standard_normal(p.shape, np.float32)
        else:
            w = rng.standard_normal(p.shape, np.float32) / np.sqrt(p.shape[-1])
        out[name] = mx.array(w)
    return out


def write_byte_tokenizer(dest: Path) -> None:
    """A byte-level tokenizer (one token per byte, ChatML specials) loadable by mlx-lm."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=1,
        )
    )


def build(name: str, dest: Path, seed: int = 0) -> Path:
    """Write the random model `name` into `dest` (created); returns `dest`."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(CONFIGS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[name]()
    write_byte_tokenizer(dest)
    mx.save_safetensors(str(dest / "model.safetensors"), random_weights(config, seed), metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    (dest / "README.md").write_text(
        f"# {name} (RANDOM WEIGHTS)\n\n{COMMENT}\n\n"
        f"Architecture `{config['model_type']}` with mlx-lm's model definition, shapes scaled down from the real "
        f"configuration, weights drawn from a seeded normal distribution (seed {seed}). Built by "
        "`mlx_agentcache.models.tiny_models`; do not use for anything but tests and benchmarks.\n"
    )
    return dest
