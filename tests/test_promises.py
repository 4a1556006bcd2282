"""What the README promises, checked against something other than the code under test.

Sizes: the bytes the caches hold, read off the stored arrays' own `nbytes`,
against a byte count written out here from the format's definition (4-bit
codes, an fp16 scale and bias per 64 values), not from q4_format or mla.
Quality: `quality.compare` against mlx-lm's own perplexity evaluation
(`mlx_lm.perplexity.eval_ppl`) on the same tokens and windows. And the
switches: `--mla full` on the command line, `Agent.stream`, and
MLX_AGENTCACHE_METAL_KERNELS=0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx
import pytest

from mlx_agentcache import q4_format, quality
from mlx_agentcache.models import mla
from mlx_agentcache.models.model_store import resolve_model
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.store import codec, container
from mlx_agentcache.store import formats as store_formats

TEXT = (Path(__file__).parent / "data" / "python_reference.txt").read_text()


def q4_bytes(values: int) -> int:
    """Bytes of `values` 4-bit values in groups of 64: half a byte each, plus an fp16
    scale and an fp16 bias (4 bytes) per group."""
    assert values % 64 == 0
    return values // 2 + values // 64 * 4


def stored_nbytes(cache) -> int:
    """Bytes of the arrays the cache holds for its tokens, from MLX's own `nbytes`."""
    total = 0
    for layer in cache.layers:
        for seg in layer.segments:
            k, v = seg.view()  # the stored tokens of the segment, without spare capacity
            total += sum(a.nbytes for a in k) + (sum(a.nbytes for a in v) if v is not None else 0)
    return total


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def test_q4_bytes_per_token_from_real_tensors(tiny_home):
    """Llama 3 layout (GQA): every layer stores K and V of each KV head, 4.5 bits a value."""
    runner = ModelRunner.load(str(resolve_model("llama3-tiny-random", tiny_home)), tiny_home)
    cfg = runner.config
    n = 512
    cache = runner.new_cache("q4")
    runner.prefill(runner.tokenizer.encode(TEXT)[:n], cache)
    heads, d = cfg["num_key_value_heads"], cfg["head_dim"]
    per_token = cfg["num_hidden_layers"] * heads * (q4_bytes(d) + q4_bytes(d))
    assert stored_nbytes(cache) == n * per_token
    assert q4_format.bytes_per_token(heads, d, d) * cfg["num_hidden_layers"] == per_token
    # fp16 for contrast: 2 bytes a value, and the 3.56x of the README
    cache16 = runner.new_cache("fp16")
    runner.prefill(runner.tokenizer.encode(TEXT)[:n], cache16)
    assert stored_nbytes(cache16) == n * cfg["num_hidden_layers"] * heads * 2 * d * 2
    assert round(stored_nbytes(cache16) / stored_nbytes(cache), 2) == 3.56


def test_mla_bytes_per_token_from_real_tensors(tiny_home):
    """DeepSeek-V2: the latent cache holds one (kv_lora_rank + rope)-wide vector per token and
    layer; the full cache holds per-head keys (nope + rope) and values (v_head_dim)."""
    path = resolve_model("deepseek-v2-tiny-random", tiny_home)
    cfg = json.loads((path / "config.json").read_text())
    ids = list(TEXT.encode()[:256])  # byte-level tokenizer: one token a byte
    layers = cfg["num_hidden_layers"]
    expect = {
        "latent": layers * q4_bytes(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]),
        "full": layers * cfg["num_attention_heads"] * (q4_bytes(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) + q4_bytes(cfg["v_head_dim"])),
    }
    for mode, per_token in expect.items():
        runner = ModelRunner.load(str(path), tiny_home, kv_bits="q4", mla_mode=mode)
        cache = runner.new_cache("q4")
        runner.prefill(ids, cache)
        assert stored_nbytes(cache) == len(ids) * per_token, mode
        assert mla.bytes_per_token(cfg, mode) == per_token, mode
    assert expect["full"] / expect["latent"] == 8.0  # the README's "8.0x smaller" for this model


def test_compare_perplexity_matches_mlx_lm_eval(smollm2_path, model_home):
    """fp16 cache, two windows of 128 tokens: mlx-lm scores the same windows without any cache."""
    from mlx_lm.perplexity import eval_ppl

    runner = ModelRunner.load(str(smollm2_path), model_home)
    tokens = runner.tokenizer.encode(TEXT)[:256]
    ours = quality.compare(runner, tokens, ["fp16"], context=128)
    theirs, _ = eval_ppl(runner.model, mx.array(tokens).reshape(2, 128), batch_size=2)
    assert ours["tokens"] == 2 * 127
    assert math.isclose(ours["fp16"]["ppl"], float(theirs), rel_tol=5e-4), (ours["fp16"]["ppl"], float(theirs))  # 3e-5 measured (fp16 K/V rounding)
    assert ours["fp16"]["kl"] == 0 and ours["fp16"]["top1_agree"] == 1


def test_stream_yields_the_reply_chat_would_give(smollm2_path, model_home, tmp_path):
    rt = Runtime(cache_dir=tmp_path, home=model_home, runner=ModelRunner.load(str(smollm2_path), model_home), max_tokens=12)
    try:
        pieces = list(rt.agent("streamer").stream("Name two colours."))
        reply = rt.agent("chatter").chat("Name two colours.")
        streamer = rt.agent("streamer")
        assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
        assert "".join(pieces) == reply.text
        assert streamer.last_stats.generated_tokens == reply.stats.generated_tokens > 0
        assert streamer.messages[-1] == {"role": "assistant", "content": reply.text}  # the streamed turn is history
    finally:
        rt.close()


def test_cli_mla_full_stores_per_head_keys_and_values(model_home, tmp_path):
    """`--mla full` caches mlx-lm's per-head K/V; a latent run refuses that file like one
    from another model (re-prefill, one warning) instead of misreading it."""
    env = dict(os.environ, AGENTCACHE_HOME=str(model_home))
    cfg = json.loads((resolve_model("deepseek-v2-tiny-random", model_home) / "config.json").read_text())

    def say(*extra):
        p = subprocess.run([sys.executable, "-m", "mlx_agentcache", "say", "--model", "deepseek-v2-tiny-random", "--kv", "q4", "--agent", "a",
                            "--cache-dir", str(tmp_path), "--max-tokens", "2", "--json", *extra, "Hello there."],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout), p.stderr

    full, _ = say("--mla", "full")
    n = full["cache_tokens"]
    per_token = cfg["num_hidden_layers"] * cfg["num_attention_heads"] * (
        q4_bytes(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) + q4_bytes(cfg["v_head_dim"]))
    def data_bytes(path, formats):
        return path.stat().st_size - container.read_header(path, formats)[2]

    (segment,) = (tmp_path / "segments" / "a").glob("*.safetensors")  # the manifest holds the token ids, the segment the K/V
    assert data_bytes(tmp_path / "a.safetensors", codec.FORMATS) == 4 * n
    assert data_bytes(segment, (store_formats.SEGMENT,)) == n * per_token
    again, _ = say("--mla", "full")
    assert again["tier"] == "hot" or again["restored_tokens"] >= n  # restored, not recomputed
    latent, err = say()
    assert latent["restored_tokens"] == 0 and "warning" in err.lower()


@pytest.mark.parametrize("switch, kernels", [("0", False), ("1", True)])
def test_metal_kernels_switch(switch, kernels):
    """MLX_AGENTCACHE_METAL_KERNELS=0 turns the kernels off even where Metal is reported.
    No Metal here: a child process reports it (mx.metal.is_available) to reach the switch."""
    code = textwrap.dedent("""
        import mlx_agentcache, mlx.core as mx
        mx.metal.is_available = lambda: True
        from mlx_agentcache import q4
        k = q4._metal_kernels()
        print(type(k).__name__ if k is not None else None)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MLX_AGENTCACHE_METAL_KERNELS=switch))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == ("CheckedKernels" if kernels else "None")
