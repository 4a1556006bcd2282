"""GGUF import and the model store, on the two real models we ship.

The llama.cpp comparisons run when llama-cpp-python is installed (the
`llamacpp` extra): the same GGUF, greedy, 16 tokens per prompt. A mismatch
is accepted only where our top-2 logit gap is below TIE_GAP, i.e. the two
engines' arithmetic (llama.cpp rounds activations to 8 bits) can flip it.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import json
import time

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from gguf import GGMLQuantizationType as QT
from mlx_lm.models.cache import make_prompt_cache
from tokenizers import Tokenizer

from mlx_agentcache.models import gguf_import, model_store
from mlx_agentcache.models.model_loader import load_for_backend
from mlx_agentcache.models.model_store import ModelNotFound, gguf_file, resolve_model

MODELS = ["smollm2", "gemma3"]
NAMES = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}
GEN = 16
TIE_GAP = 0.5  # logits; measured gaps at the mismatches seen so far are listed in the report
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a CPU does.",
]
TRICKY = [
    "Hello world",
    " leading space",
    "  two leading spaces and trailing ",
    "new\nlines\n\n\nand\ttabs\t\t",
    "Digits 1234567890, 3.14159 and 1,000,000",
    "Unicode: café naïve Straße Ελληνικά русский 中文 日本語 한국어",
    "Emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 and ©®™ ∑∫√",
    "code:\n    def f(x):\n        return x**2  # square",
    "'s 're 've 'll don't I'm",
    "mixed   multiple    spaces\u200b zero width",
]


@pytest.fixture(scope="module", params=MODELS)
def which(request):
    return request.param


@pytest.fixture(scope="module")
def folder(which, request):
    return request.getfixturevalue(f"{which}_path")


@pytest.fixture(scope="module")
def loaded(folder):
    return load_for_backend(folder)


def test_folder_layout_and_config(folder, which):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / f).is_file(), f
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"], quant["mode"]) == (32, 4, "affine")
    assert config["quantization_config"] == quant
    assert config["tie_word_embeddings"] is True
    if which == "smollm2":
        assert config["model_type"] == "llama"
        assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
        assert config["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>
    else:
        assert config["model_type"] == "gemma3_text"
        assert (config["head_dim"], config["sliding_window"], config["sliding_window_pattern"]) == (256, 512, 6)
        assert config["rope_local_base_freq"] == 10000.0 and config["query_pre_attn_scalar"] == 256
        assert config["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "{" in tok_config["chat_template"]


def test_weights_are_the_gguf_weights(folder, which, model_home):
    """Dequantized MLX weights equal llama.cpp's, q/k rows back in HF order."""
    reader = GGUFReader(str(gguf_file(NAMES[which], model_home)))
    tensors = {t.name: t for t in reader.tensors}
    weights = mx.load(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    for gname, prefix, heads in [
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj", config["num_attention_heads"]),
        ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj", None),
        ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj", None),  # Gemma: Q4_K
        ("token_embd.weight", "model.embed_tokens", None),
    ]:
        t = tensors[gname]
        rows = slice(0, 2048)  # the vocab-sized embedding is large: its first rows suffice
        ref = dequantize(np.asarray(t.data)[rows], t.tensor_type)
        if heads and which == "smollm2":
            ref = gguf_import._unpermute_rows(ref, heads)
        w, scales, biases = (weights[f"{prefix}.{k}"][rows] for k in ("weight", "scales", "biases"))
        bits = config["quantization"].get(prefix, config["quantization"])["bits"]
        ours = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits)
        # Q4_K's combined scale d*sc is rounded to float16; the other blocks are exact.
        atol = 1e-3 * np.abs(ref).max() if t.tensor_type == QT.Q4_K else 1e-6
        np.testing.assert_allclose(np.array(ours), ref, atol=atol, err_msg=gname)
    if which == "gemma3":  # llama.cpp stores 1 + w; mlx-lm's Gemma RMSNorm adds the 1 itself
        raw = np.asarray(tensors["blk.0.attn_norm.weight"].data)
        norm = np.array(weights["model.layers.0.input_layernorm.weight"].astype(mx.float32))
        np.testing.assert_allclose(norm, raw - 1, atol=2e-2)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0])
def test_block_formats_map_exactly(qtype):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 128)).astype(np.float32)
    raw = quantize(w, qtype)
    t = type("T", (), {"data": raw, "tensor_type": qtype})()
    wq, scales, biases, bits = gguf_import._quantize(t, 4)
    ours = mx.dequantize(mx.array(wq), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    np.testing.assert_allclose(np.array(ours), dequantize(raw, qtype), atol=1e-6)


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's convert
    np.testing.assert_array_equal(gguf_import._unpermute_rows(permuted, heads), w)


def test_chat_template_ids(loaded, which):
    _, tok = loaded
    assert type(tok).__name__ == "TokenizerWrapper"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    text = tok.decode(ids)
    if which == "smollm2":
        assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        assert ids[:3] == [1, 9690, 198]  # <|im_start|>system\n (the template's default system turn)
        assert ids[-10:] == [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]
    else:
        assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        assert ids[:4] == [2, 105, 2364, 107] and ids.count(2) == 1


def test_tokenizer_round_trips(folder, loaded):
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    _, tok = loaded
    for s in TRICKY:
        ids = raw.encode(s, add_special_tokens=False).ids
        assert raw.decode(ids) == s
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_tokenizer_matches_llama_cpp(which, folder, model_home):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(gguf_file(NAMES[which], model_home)), vocab_only=True, verbose=False)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for s in TRICKY + ["<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert raw.encode(s, add_special_tokens=False).ids == llm.tokenize(s.encode(), add_bos=False, special=True), s


def _greedy(model, ids, steps):
    """Greedy tokens and, per step, the gap between the two best logits."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    out, gaps = [], []
    for _ in range(steps):
        top2 = mx.sort(logits)[-2:]
        tok = int(mx.argmax(logits))
        out.append(tok)
        gaps.append(float(top2[1] - top2[0]))
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]
    return out, gaps


def _prompt(tok, which, question):
    if which == "gemma3":  # the Gemma 3 270M GGUF is the pretrained model: plain completion
        return tok.encode(f"Question: {question}\nAnswer:")
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def test_greedy_answer_is_sensible(loaded, which):
    model, tok = loaded
    out, _ = _greedy(model, _prompt(tok, which, PROMPTS[0]), GEN)
    assert "Paris" in tok.decode(out)


def test_greedy_matches_llama_cpp(loaded, which, model_home):
    """Greedy from both engines; every llama.cpp token is our argmax or within TIE_GAP of it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = loaded
    llm = llama_cpp.Llama(
        model_path=str(gguf_file(NAMES[which], model_home)), n_ctx=256, n_threads=2, seed=0, verbose=False
    )
    report = []
    for question in PROMPTS:
        ids = _prompt(tok, which, question)
        ours, gaps = _greedy(model, ids, GEN)
        theirs = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs.append(t)
            if len(theirs) == GEN:
                break
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        # Teacher-forced on llama.cpp's tokens, so positions after a flipped tie count too.
        logits = model(mx.array([ids + theirs]))[0, len(ids) - 1 : -1].astype(mx.float32)
        chosen = mx.take_along_axis(logits, mx.array(theirs)[:, None], axis=-1)[:, 0]
        deficit = np.array(logits.max(axis=-1) - chosen)
        report.append((question, first, round(float(deficit.max()), 3)))
        assert deficit.max() < TIE_GAP, (question, deficit.round(3), tok.decode(ours), tok.decode(theirs))
        if first is not None:
            assert gaps[first] < TIE_GAP, (question, first, gaps[first])
    print(which, "(prompt, first mismatch, worst logit deficit of llama.cpp's token)", report)


def test_second_resolve_is_instant(smollm2_path, model_home):
    t = time.perf_counter()
    assert resolve_model("smollm2-135m", model_home) == smollm2_path
    assert time.perf_counter() - t < 1.0


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown model .*smollm2-135m"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def test_folder_path_used_as_is(smollm2_path, tmp_path):
    assert resolve_model(str(smollm2_path), tmp_path) == smollm2_path


def test_crash_mid_conversion_leaves_no_half_folder(model_home, tmp_path, monkeypatch):
    gguf = gguf_file("smollm2-135m", model_home)
    home = tmp_path / "home"
    target = home / "models" / gguf.stem

    def crash(path, weights):
        path.write_bytes(b"partial")
        raise RuntimeError("power cut")

    monkeypatch.setattr(gguf_import, "write_weights", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        resolve_model(str(gguf), home)
    assert not target.exists()
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []

    # a staging folder left by a killed process is swept by the next build
    (home / "models" / f".{gguf.stem}.staging-dead").mkdir()
    monkeypatch.undo()
    assert resolve_model(str(gguf), home) == target
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")) == [gguf.stem]


def test_builders_registry_is_open():
    assert {"smollm2-135m", "gemma3-270m"} <= set(model_store.BUILDERS)
    assert model_store.DEFAULT_MODEL == "smollm2-135m"
