"""KV cache quality: the q4k key scheme, its persistence, and `agentcache eval ppl`."""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import json

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mlx_agentcache import quality
from mlx_agentcache.store import codec, container
from mlx_agentcache.cli import app
from mlx_agentcache.kvcache import LayerCache, kv_mode, rotate
from tiny import tiny_runner, tokens

TEXT = __import__("pathlib").Path(__file__).parent / "data" / "python_reference.txt"


def exact_attention(q, k, v, scale):
    """float32 softmax attention of (1, Hq, 1, D) queries over (1, Hkv, T, D) keys."""
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    p = mx.softmax((q * scale) @ k.swapaxes(-1, -2), axis=-1)
    return p @ v


def test_modes():
    assert kv_mode("q4k") == (4, True) and kv_mode("q4") == (4, False) and kv_mode(8) == (8, False) and kv_mode("16") == (16, False)
    assert LayerCache("q4k").mode == "q4k" and LayerCache(16).mode == "fp16"
    with pytest.raises(ValueError):
        kv_mode("q3")
    with pytest.raises(ValueError):
        LayerCache(8, rotate_keys=True)


@pytest.mark.parametrize("d", [64, 128, 192, 256])
def test_rotation_keeps_dot_products_and_is_its_own_inverse(d):
    q, k = mx.random.normal((3, 5, d), key=mx.random.key(0)), mx.random.normal((3, 7, d), key=mx.random.key(1))
    assert mx.allclose(rotate(q) @ rotate(k).swapaxes(-1, -2), q @ k.swapaxes(-1, -2), atol=1e-4)
    assert mx.allclose(rotate(rotate(q)), q, atol=1e-5)


def test_rotated_keys_cut_the_error_of_outlier_channels():
    """Keys with two large channels, as real keys have: q4k attends closer to exact than q4.

    Values are integers 0..15, which Q4 stores exactly, so the error is the keys' alone.
    """
    err = {"q4": 0.0, "q4k": 0.0}
    for seed in range(4):
        key = mx.random.split(mx.random.key(seed), 3)
        k = mx.random.normal((1, 2, 600, 128), key=key[0]) + mx.zeros(128).at[mx.array([3, 70])].add(mx.array([12.0, -9.0]))
        v = mx.random.randint(0, 16, (1, 2, 600, 128), key=key[1]).astype(mx.float32)
        q = mx.random.normal((1, 4, 1, 128), key=key[2])
        exact = exact_attention(q, k, v, 128**-0.5)
        for mode in err:
            c = LayerCache(mode)
            c.update_and_fetch(k, v)
            err[mode] += (mx.linalg.norm(c.attend(q, 128**-0.5) - exact) / mx.linalg.norm(exact)).item()
    assert err["q4k"] < 0.8 * err["q4"], err


def test_latent_caches_refuse_rotated_keys():
    c = LayerCache("q4k")
    c.update_and_fetch(mx.zeros((1, 1, 4, 64)), None)
    with pytest.raises(ValueError, match="q4k"):
        c.attend(mx.zeros((1, 2, 1, 64)), 1.0, values_from_keys=lambda k: k)


def test_q4k_round_trips_through_a_cache_file(tmp_path):
    """Save mid-conversation, load, go on: the same logits as never having stopped."""
    runner = tiny_runner()
    prompt = tokens(300)
    live = runner.new_cache("q4k")
    runner.prefill(prompt, live)
    path = tmp_path / "a.safetensors"
    codec.save(path, live, runner.fingerprint)
    _, meta = container.read_tensors(path, (codec.FORMAT,))
    assert meta["kv_keys"] == "hadamard" and meta["kv_bits"] == "4"
    loaded, _ = codec.load(path, runner.fingerprint, expect_layers=runner.new_cache("q4k").layers)
    assert all(layer.rotate_keys for layer in loaded.layers) and loaded.tokens == prompt
    for tok in tokens(5, seed=3):
        a, b = runner.decode([tok], [live])[0], runner.decode([tok], [loaded])[0]
        assert mx.array_equal(a, b)
    with pytest.raises(container.CacheFileError, match="q4k"):
        codec.load(path, runner.fingerprint, expect_layers=runner.new_cache("q4").layers)
    plain = runner.new_cache("q4")
    runner.prefill(prompt, plain)
    codec.save(path, plain, runner.fingerprint)
    assert "kv_keys" not in container.read_tensors(path, (codec.FORMAT,))[1]
    with pytest.raises(container.CacheFileError, match="q4"):
        codec.load(path, runner.fingerprint, expect_layers=runner.new_cache("q4k").layers)


def test_nested_contexts_score_like_separate_windows():
    runner = tiny_runner()
    toks = tokens(300, seed=5)
    nested = quality.compare(runner, toks, ["fp16", "q4"], [64, 128], chunk=32)
    parts = [quality.compare(runner, toks[o : o + 64], ["fp16", "q4"], 64, chunk=32) for o in (0, 128, 256)]
    n = sum(p["tokens"] for p in parts)
    assert nested[64]["tokens"] == n and nested[128]["tokens"] == 297
    for key in ("nll", "kl", "top1_agree"):
        want = sum(p["q4"][key] * p["tokens"] for p in parts) / n
        assert nested[64]["q4"][key] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert nested[64]["fp16"]["kl"] == 0 and nested[64]["fp16"]["top1_agree"] == 1


def test_eval_ppl_cli(model_home, smollm2_path, monkeypatch, tmp_path):
    """On a real model: quantizing the cache does not lower perplexity, rotating keys recovers most of it."""
    monkeypatch.setenv("AGENTCACHE_HOME", str(model_home))
    text = tmp_path / "short.py"
    text.write_text(TEXT.read_text(encoding="utf-8")[:6000])
    ppl = {}
    for kv in ("fp16", "q4", "q4k"):
        r = CliRunner().invoke(app, ["eval", "ppl", "--model", "smollm2-135m", "--kv", kv, "--context", "300", "--limit", "600", "--json", str(text)])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["tokens"] == 598 and out["kv"] == kv and out["seconds"] > 0
        ppl[kv] = out["ppl"]
    assert ppl["fp16"] <= ppl["q4"] * 1.01, ppl
    assert ppl["q4k"] < ppl["q4"], ppl
    bad = CliRunner().invoke(app, ["eval", "ppl", "--kv", "q3", str(text)])
    assert bad.exit_code == 2
