"""The Q4 agent cache on each supported architecture.

Real checkpoints: SmolLM2-135M (Llama layout) and Gemma 3 270M (sliding
windows). Random tiny models (mlx_agentcache.models.tiny_models): Llama 3 (GQA,
llama3 RoPE) and DeepSeek-V2 (MLA + MoE, latent cache). Contexts are short
but cross a 256-token block and, for Gemma, the 512-token window.

Accuracy bounds were measured on this suite's text (tests/data) and are
stated with their measured values in docs/architectures.md. Random models
have flat next-token distributions (near-ties are common), so top-1
agreement is asserted on real models only; KL bounds hold for all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_agentcache import q4
from mlx_agentcache.models import mla, tiny_models
from mlx_agentcache.models.model_store import resolve_model
from mlx_agentcache.store import codec, container
from mlx_agentcache.q4 import BLOCK_TOKENS, KEY_GROUP
from mlx_agentcache.models.runner import ModelRunner

TEXT = (Path(__file__).parent / "data" / "python_reference.txt").read_text()
GEN = 16
N_TOKENS = {"smollm2": 700, "gemma3": 1100, "llama3-tiny-random": 700, "deepseek-v2-tiny-random": 700}

# Mode q4 (named explicitly: the default mode may change) vs fp16 cache over 17 next-token
# distributions (after the prompt, then 16 teacher-forced steps): (mean KL(fp16 || q4),
# max KL, min top-1 agreement or None). Measured 2026-11-30: smollm2 0.188 / 0.723 / 15 of 17,
# gemma3 0.0992 / 0.275 / 17 of 17, llama3-tiny-random 1.18e-3 / 1.62e-3,
# deepseek-v2-tiny-random 4.31e-3 / 1.03e-2. KL bounds are about 1.25x those; top-1 allows
# one more of the 17 to differ (a near-tie may flip on another CPU's summation order).
Q4_BOUNDS = {
    "smollm2": (0.24, 0.9, 0.82),
    "gemma3": (0.125, 0.35, 0.94),
    "llama3-tiny-random": (1.5e-3, 2.1e-3, None),
    "deepseek-v2-tiny-random": (5.5e-3, 1.3e-2, None),
}
# fp16 agent cache vs mlx-lm's own fp16 caches: only summation order differs.
NATIVE_LOGIT_TOL = 0.05
# Latent (absorbed) vs full MLA, both with fp16 caches: measured max |logit diff| 7e-4.
MLA_LOGIT_TOL = 5e-3


@dataclass
class Arch:
    name: str
    runner: ModelRunner
    prompt: list[int]
    cont: list[int]
    cache: object  # the uninterrupted in-memory Q4 cache (only the restore test decodes on it)
    logits: mx.array
    file: Path
    _fp16: tuple = field(default=None, repr=False)

    def load(self):
        cache, _ = codec.load(self.file, self.runner.fingerprint, self.runner.new_cache().layers)
        return cache

    def fp16(self):
        """(cache, logits) after prefilling the prompt into a 16-bit cache, computed once."""
        if self._fp16 is None:
            cache = self.runner.new_cache(bits=16)
            self._fp16 = cache, self.runner.prefill(self.prompt, cache)
        return self._fp16


def load_runner(path: Path, mla_mode: str = "latent") -> ModelRunner:
    return ModelRunner.load(str(path), Path(path).parent, mla_mode=mla_mode)


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def model_path(name: str, request, tiny_home: Path) -> Path:
    if name in tiny_models.CONFIGS:  # built fresh, through the model store's registry
        return resolve_model(name, tiny_home)
    try:
        return Path(request.getfixturevalue(f"{name}_path"))
    except pytest.FixtureLookupError:
        pytest.skip(f"no {name}_path fixture (tests/conftest.py provides the real models)")


@pytest.fixture(scope="module", params=[pytest.param(n, marks=[] if n in tiny_models.CONFIGS else [pytest.mark.slow]) for n in N_TOKENS])
def arch(request, tiny_home, tmp_path_factory) -> Arch:
    name = request.param
    runner = load_runner(model_path(name, request, tiny_home))
    ids = runner.tokenizer.encode(TEXT[:20000])[: N_TOKENS[name] + GEN]
    prompt, cont = ids[: N_TOKENS[name]], ids[N_TOKENS[name] :]
    assert len(cont) == GEN
    cache = runner.new_cache()
    logits = runner.prefill(prompt, cache)
    file = tmp_path_factory.mktemp(name) / "agent.safetensors"
    codec.save(file, cache, runner.fingerprint)
    return Arch(name, runner, prompt, cont, cache, logits, file)


def greedy(runner: ModelRunner, logits: mx.array, cache, n: int = GEN) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits)))
        logits = runner.decode([out[-1]], [cache])[0]
    return out


def teacher_forced(arch: Arch, cache, first: mx.array) -> mx.array:
    """Next-token logits after the prompt and after each continuation token (one causal chunk)."""
    return mx.concatenate([first[None], arch.runner.logits(arch.cont, cache)], axis=0)


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def layer_bytes_per_token(config: dict) -> int:
    """Q4 bytes one token takes in one layer (keys + values), as in docs/architectures.md."""
    if config["model_type"] == "deepseek_v2":  # latent mode: one single-head key, no values
        return q4.bytes_per_token(1, config["kv_lora_rank"] + config["qk_rope_head_dim"], 0)
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return q4.bytes_per_token(heads, head_dim, head_dim)


def q4c_layer_bytes(config: dict, span: dict) -> int:
    """Bytes of one persisted q4c layer, from the model's dimensions and the span's runs, written
    out from the layout (docs/quality.md), not from the code that stores it."""
    if config["model_type"] == "deepseek_v2":  # a latent layer stores q4 (one 4-bit key, groups of 64)
        d = config["kv_lora_rank"] + config["qk_rope_head_dim"]
        return sum(n * (d // 2 + d // 64 * 4) for _, n in span["runs"])
    h = config.get("num_key_value_heads") or config["num_attention_heads"]
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    values = d // 2 + d // 32 * 2  # 4-bit codes, one fp16 scale per 32
    per_token = {"q4c": d // 2 + values, "q8": 2 * (d + d // 64 * 4)}  # the tail: 8-bit keys and values
    total = sum(n * per_token[e] for e, n in span["runs"])
    total += sum(n // 128 * d * 4 for e, n in span["runs"] if e == "q4c")  # fp16 scale + bias per channel per 128 tokens
    return h * (total + span.get("sinks", 0) * 2 * d * 2)


# -- every architecture ------------------------------------------------------


@pytest.mark.numerics
def test_restore_then_greedy_matches_uninterrupted(arch):
    restored = arch.load()
    assert restored.tokens == arch.prompt
    assert [layer.offset for layer in restored.layers] == [len(arch.prompt)] * len(restored.layers)
    after_restore = greedy(arch.runner, arch.logits, restored)
    uninterrupted = greedy(arch.runner, arch.logits, arch.cache)
    assert after_restore == uninterrupted


@pytest.mark.numerics
def test_q4_logits_close_to_fp16(arch, tmp_path):
    cache16, first16 = arch.fp16()
    ref = log_softmax(teacher_forced(arch, cache16, first16))
    q4_cache = arch.runner.new_cache("q4")
    first = arch.runner.prefill(arch.prompt, q4_cache)
    codec.save(tmp_path / "q4.safetensors", q4_cache, arch.runner.fingerprint)  # through a file, as a restore would
    restored, _ = codec.load(tmp_path / "q4.safetensors", arch.runner.fingerprint)
    assert restored.layers[0].mode == "q4"
    got = log_softmax(teacher_forced(arch, restored, first))
    kl = (mx.exp(ref) * (ref - got)).sum(axis=-1)
    top1 = (mx.argmax(ref, axis=-1) == mx.argmax(got, axis=-1)).mean().item()
    mean_kl, max_kl, min_top1 = Q4_BOUNDS[arch.name]
    print(f"{arch.name}: KL mean {kl.mean().item():.2e} max {kl.max().item():.2e}, top-1 {top1:.2f}")
    assert kl.mean().item() < mean_kl and kl.max().item() < max_kl
    if min_top1 is not None:
        assert top1 >= min_top1


@pytest.mark.numerics
def test_fp16_cache_matches_mlx_lm_cache(arch):
    """Our 16-bit cache (windows, masks, RoPE offsets, latent MLA) against mlx-lm's own caches."""
    _, ours = arch.fp16()
    runner = arch.runner
    native = make_prompt_cache(runner.model)
    for a in range(0, len(arch.prompt), 512):  # same chunking as prefill
        h = runner._forward(mx.array(arch.prompt[a : a + 512])[None], native, logits=False)
    ref = runner._head(h[:, -1:])[0, -1].astype(mx.float32)
    assert int(mx.argmax(ours)) == int(mx.argmax(ref))
    assert mx.abs(ours - ref).max().item() < NATIVE_LOGIT_TOL


def test_disk_bytes_per_token(arch):
    """File = 8 + header + 4 bytes per token id + sum over layers of persisted tokens x layer bytes/token."""
    header, meta, data_start = container.read_header(arch.file, codec.FORMATS)
    spans = json.loads(meta["layers"])
    n = len(arch.prompt)
    assert meta["kv_mode"] == "q4c"  # the default
    latent = arch.runner.mla_mode == "latent"
    for s in spans:  # every persisted token is in one run; the first 4 of a context are also kept exact
        assert sum(c for _, c in s["runs"]) == s["offset"] - s["start"]
        assert s.get("sinks") == (4 if s["start"] == 0 and not latent else None)
    expect = 4 * n + sum(q4c_layer_bytes(arch.runner.config, s) for s in spans)
    assert arch.file.stat().st_size - data_start == expect
    q4_file = arch.file.with_name("q4.safetensors")  # and q4, token by token
    q4_cache = arch.runner.new_cache("q4")
    arch.runner.prefill(arch.prompt, q4_cache)
    codec.save(q4_file, q4_cache, arch.runner.fingerprint)
    header, meta, data_start = container.read_header(q4_file, codec.FORMATS)
    per_layer = layer_bytes_per_token(arch.runner.config)
    assert q4_file.stat().st_size - data_start == 4 * n + sum(min(n, s["window"] or n) * per_layer for s in json.loads(meta["layers"]))
    assert data_start < 64 * 1024  # header overhead stays small and separate
    full = [s for s in spans if s["window"] is None]
    assert full and all(s["start"] == 0 for s in full)


def test_sliding_layers_persist_at_most_window(arch):
    windows = [w for w in arch.runner.windows if w]
    n = len(arch.prompt)
    if not windows:  # global attention only: every layer keeps the whole context
        _, meta, _ = container.read_header(arch.file, codec.FORMATS)
        assert all(s["start"] == 0 and s["offset"] == n for s in json.loads(meta["layers"]))
        return
    assert n > windows[0] + BLOCK_TOKENS  # whole blocks were dropped in memory
    _, meta, _ = container.read_header(arch.file, codec.FORMATS)
    for s, w in zip(json.loads(meta["layers"]), arch.runner.windows):
        assert s["window"] == w and s["offset"] == n
        # q4c keeps whole 128-token key groups: a window layer saves from the group edge before its window
        kept = s["offset"] - s["start"]
        assert (min(n, w) <= kept < min(n, w) + KEY_GROUP and s["start"] % KEY_GROUP == 0) if w else kept == n
    for layer in arch.cache.layers:
        if layer.window:
            assert layer.start > 0 and layer.start % BLOCK_TOKENS == 0
            assert layer.stored < layer.window + BLOCK_TOKENS
    restored = arch.load()
    for layer in restored.layers:
        if layer.window:
            assert layer.window <= layer.stored < layer.window + KEY_GROUP and layer.offset == n


# -- DeepSeek-V2 latent cache --------------------------------------------------


@pytest.fixture(scope="module")
def deepseek(request, tiny_home) -> tuple[ModelRunner, ModelRunner]:
    path = model_path("deepseek-v2-tiny-random", request, tiny_home)
    return load_runner(path, "latent"), load_runner(path, "full")


def test_mla_latent_cache_at_least_4x_smaller(deepseek):
    latent, full = deepseek
    assert latent.fingerprint != full.fingerprint  # the two layouts never share cache files
    ids = latent.tokenizer.encode(TEXT[:300])
    sizes = []
    for runner in deepseek:
        cache = runner.new_cache("q4")  # the formula's layout (the default q4c stores the latent as q4 too)
        runner.prefill(ids, cache)
        sizes.append(cache.nbytes / len(ids))
    assert sizes[0] == mla.bytes_per_token(latent.config, "latent")
    assert sizes[1] == mla.bytes_per_token(latent.config, "full")
    assert sizes[1] / sizes[0] >= 4


@pytest.mark.numerics
def test_mla_latent_matches_full_with_fp16_caches(deepseek):
    ids = deepseek[0].tokenizer.encode(TEXT[:20000])[:600]
    outs = []
    for runner in deepseek:
        cache = runner.new_cache(bits=16)
        logits = [runner.prefill(ids[:-8], cache)]
        logits += [runner.decode([t], [cache])[0] for t in ids[-8:]]
        outs.append(mx.stack(logits))
    assert mx.abs(outs[0] - outs[1]).max().item() < MLA_LOGIT_TOL


@pytest.mark.numerics
def test_mla_batched_decode_matches_single(deepseek):
    runner = deepseek[0]
    ids = runner.tokenizer.encode(TEXT[:2000])
    prompts = [ids[:300], ids[100:140]]
    solo, batch = [], []
    for p in prompts:
        a, b = runner.new_cache(), runner.new_cache()
        runner.prefill(p, a)
        runner.prefill(p, b)
        solo.append(runner.decode([p[-1]], [a])[0])
        batch.append(b)
    both = runner.decode([p[-1] for p in prompts], batch)
    for i in range(2):
        assert mx.abs(both[i] - solo[i]).max().item() < 1e-3


def test_tiny_models_are_labelled_random(tiny_home, request):
    for name in tiny_models.CONFIGS:
        path = model_path(name, request, tiny_home)
        assert "random" in name
        assert "RANDOM" in json.loads((path / "config.json").read_text())["_comment"]
        assert "RANDOM" in (path / "README.md").read_text()


def test_window_cache_can_always_start_over():
    """A prompt that diverges before the window must re-prefill, not fail to trim."""
    from mlx_agentcache.kvcache import AgentCache, LayerCache

    cache = AgentCache([LayerCache(4, window=512), LayerCache(4)])
    for a in range(0, 1200, 300):
        for layer in cache.layers:
            layer.update_and_fetch(mx.ones((1, 1, 300, 64)), mx.ones((1, 1, 300, 64)))
        cache.tokens.extend(range(a, a + 300))
    assert cache.layers[0].start > 0
    assert cache.reusable_prefix([0, 1, 2, -1]) == 0
    cache.trim_to(0)
    assert all(layer.offset == layer.start == layer.stored == 0 for layer in cache.layers)


def test_tiny_models_run_on_a_worker_thread(tiny_home, request):
    """Turns run on the scheduler's thread: nothing built lazily at load may be left unevaluated."""
    import threading

    for name in tiny_models.CONFIGS:
        runner = load_runner(model_path(name, request, tiny_home))
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("logits", runner.prefill([1, 2, 3], runner.new_cache())))
        worker.start()
        worker.join()
        assert out["logits"].shape == (tiny_models.VOCAB,)


def test_mla_absorbs_a_quantized_kv_b_proj(request, tiny_home):
    """Real checkpoints ship kv_b_proj as QuantizedLinear: it is dequantized once for the absorbed matrices."""
    import mlx.nn as nn
    from mlx_lm.utils import load

    path = model_path("deepseek-v2-tiny-random", request, tiny_home)
    ids = list(range(40, 120))
    outs = []
    for mode in mla.MODES:
        model, tokenizer, config = load(str(path), return_config=True)
        nn.quantize(model, group_size=64, bits=4)
        runner = ModelRunner(model, tokenizer, config, path, mla_mode=mode)
        assert isinstance(model.model.layers[0].self_attn.kv_b_proj, nn.QuantizedLinear)
        outs.append(runner.prefill(ids, runner.new_cache(bits=16)))
    assert mx.abs(outs[0] - outs[1]).max().item() < MLA_LOGIT_TOL


# -- Gemma 3 agents across restarts --------------------------------------------


@pytest.mark.slow
def test_gemma_agent_restored_from_disk_reuses_its_whole_cache(gemma3_path, model_home, tmp_path):
    """A restored sliding layer holds only `window` tokens and cannot be cut back, so every
    turn ends with the cache cut to its common prefix with the rendered history; after a
    restart all of it is reused and the next turn prefills the rest of the history (the
    end-of-turn marker) with its own message."""
    from mlx_agentcache.runtime import Runtime

    def runtime():
        return Runtime(model=str(gemma3_path), home=model_home, cache_dir=tmp_path, max_tokens=6)

    rt = runtime()
    a = rt.agent("reader", system="You answer in one short sentence.")
    asked = len(a.prompt_tokens(TEXT[:5000] + "\n\nWhat is this text about?"))
    first = a.chat(TEXT[:5000] + "\n\nWhat is this text about?")
    history = a.prompt_tokens(None, generation=False)
    rt.flush()
    saved, _ = codec.load(rt.pool.path("reader"), rt.runner.fingerprint, rt.runner.new_cache().layers)
    kept = len(saved.tokens)
    assert kept > 1100 and saved.tokens == history[:kept]
    assert asked <= kept < len(history) <= kept + first.stats.generated_tokens + 4  # at least the end-of-turn marker waits
    assert any(layer.window and layer.start > 0 for layer in saved.layers)

    b = runtime().agent("reader")
    question = "Name one topic it covers."
    full = b.prompt_tokens(question)
    second = b.chat(question)
    assert second.stats.tier == "warm"
    assert second.stats.restored_tokens == kept
    assert second.stats.prefilled_tokens == len(full) - kept
