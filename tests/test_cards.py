"""Cache cards (cards.py, bitalloc.py) on real models and real files: the
allocator's budget, round trips, RoPE position shifts against a receiver that
prefilled the same tokens there, refusals, the CLI and the workflow step."""

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_agentcache import bitalloc, cards
from mlx_agentcache.kvcache import AgentCache, LayerCache
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.store.container import CacheFileError

TEXT = "The committee met on Tuesday to review the budget, the hiring plan and the new office lease before the end of the quarter."


@pytest.fixture(scope="module")
def fp16_runner(model_home, smollm2_path):
    return ModelRunner.load(str(smollm2_path), model_home, kv_bits=16)


@pytest.fixture(scope="module")
def q4_runner(model_home, smollm2_path):
    return ModelRunner.load(str(smollm2_path), model_home)


@pytest.fixture(scope="module")
def fp16_model(model_home, fp16_runner):
    """fp16 runners by model name, each loaded once."""
    loaded = {"smollm2-135m": fp16_runner}

    def get(name: str) -> ModelRunner:
        if name not in loaded:
            loaded[name] = ModelRunner.load(name, model_home, kv_bits=16)
        return loaded[name]

    return get


def prefilled(runner, tokens, at=0, mode=None):
    """A cache whose context starts at position `at` (nothing before it) and holds `tokens`."""
    mode = mode or runner.kv_bits
    cache = AgentCache([LayerCache.restore(mode, w, at, at, (), None) for w in runner.windows], [0] * at)
    runner.prefill(tokens, cache, logits=False)
    return cache


def card_bits(card: cards.CacheCard) -> float:
    """Average bits per value counted from the card's tensors themselves."""
    bits = values = 0
    for layer in card.layers:
        for part in ("k", "v"):
            for b, t in (layer[part] or {}).items():
                bits += sum(x.nbytes for x in t) * 8
                values += t[0].shape[0] * t[0].shape[1] * card.header["head_dim"]
    return bits / values


# -- allocator ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("budget", [2.5, 2.7, 3.0, 3.5, 4.0, 5.0, 8.0, 12.0])
def test_allocator_meets_its_budget_exactly(n, budget):
    rng = np.random.default_rng(n)
    imp = rng.pareto(1.5, n)
    weights = rng.integers(1, 5, n)
    w = bitalloc.allocate(imp, budget, 64, weights=weights)
    assert set(w.tolist()) <= {2, 3, 4, 8, 16}
    got = bitalloc.bits_per_value(w, 64, weights=weights)
    assert got <= budget
    assert budget - got < (16 - 2.5) * weights.max() / weights.sum() + 1e-9 or (w >= 8).all()  # filled to within one upgrade
    assert set(bitalloc.allocate(imp, budget, 64, weights=weights, levels=(2, 4, 8)).tolist()) <= {2, 4, 8, 16}
    assert np.array_equal(w, bitalloc.allocate(imp, budget, 64, weights=weights))  # deterministic
    assert ((w == 16) <= np.isin(np.arange(n), list(range(4)) + list(range(n - 16, n)))).all()  # fp16 only for protected tokens


def test_allocator_prefers_important_tokens_and_respects_caps():
    imp = np.ones(200)
    imp[100] = 1000.0
    w = bitalloc.allocate(imp, 3.0, 64, protect_first=0, protect_last=0)
    assert w[100] == 8 and (w[:100] <= 4).all()
    cap = np.full(200, 4)
    assert bitalloc.allocate(imp, 8.0, 64, cap=cap).max() == 4
    assert bitalloc.min_budget(64) == 2.5 and bitalloc.uniform(3.0, 64) == (2, 32) and bitalloc.uniform(5.0, 64) == (4, 32)


def test_allocator_refuses_a_budget_below_the_minimum():
    with pytest.raises(ValueError, match="below the minimum of 2.5"):
        bitalloc.allocate(np.ones(10), 2.4, 64)
    with pytest.raises(ValueError, match="below the minimum"):
        bitalloc.uniform(2.0, 64)


# -- cards on a cache --------------------------------------------------------------


def test_card_file_round_trip_and_budget(fp16_runner, tmp_path):
    r = fp16_runner
    tokens = r.tokenizer.encode(TEXT)
    cache = prefilled(r, tokens)
    card = cards.export(cache, 0, len(tokens), 3.5, source="planner", model="smollm2", fingerprint=r.fingerprint)
    assert card_bits(card) == pytest.approx(card.avg_bits) and card.avg_bits <= 3.5
    path = cards.write(card, tmp_path / "plan.card", r.fingerprint)
    back = cards.read(path, r.fingerprint)
    assert back.tokens == tokens and np.array_equal(back.widths, card.widths) and back.hops == 1
    for i in (0, 15, 29):
        assert mx.array_equal(back.dense(i)[0], card.dense(i)[0]).item()
    s = back.summary()
    assert s["tokens"] == len(tokens) and s["bytes"] == path.stat().st_size and s["source"] == "planner" and s["avg_bits"] <= 3.5


@pytest.mark.numerics
@pytest.mark.parametrize("model", ["smollm2-135m", "deepseek-v2-tiny-random", "gemma3-270m"])
@pytest.mark.parametrize("at", [37, 0])
def test_position_shift_matches_a_receiver_that_prefilled_there(model, at, fp16_model):
    """Keys injected at new positions equal, layer by layer, the keys of the same
    tokens prefilled at those positions; the next-token logits agree too."""
    r = fp16_model(model)
    tokens = r.tokenizer.encode(TEXT)
    src_at = 11 if at == 0 else 0  # moved forward by 37, or back to 0 from 11
    source = prefilled(r, tokens, src_at)
    card = cards.export(source, src_at, src_at + len(tokens), 16, mode="uniform", fingerprint=r.fingerprint)
    receiver = AgentCache([LayerCache.restore(16, w, at, at, (), None) for w in r.windows], [0] * at)
    assert cards.inject(card, receiver, r) == at
    truth = prefilled(r, tokens, at)
    for i, (a, b) in enumerate(zip(receiver.layers, truth.layers)):
        ka, kb = a.dense(at, at + len(tokens))[0].astype(mx.float32), b.dense(at, at + len(tokens))[0].astype(mx.float32)
        err = mx.abs(ka - kb).max().item() / (mx.abs(kb).max().item() + 1e-6)
        assert err < 4e-3, f"{model} layer {i}: relative key error {err}"
    la, lb = r.prefill([tokens[-1]], receiver), r.prefill([tokens[-1]], truth)
    assert int(mx.argmax(la).item()) == int(mx.argmax(lb).item())
    assert mx.abs(la - lb).max().item() < 0.05 * mx.abs(lb).max().item()
    if at:  # without the shift the keys would sit 37 positions early: the test can tell
        unshifted = AgentCache([LayerCache.restore(16, w, at, at, (), None) for w in r.windows], [0] * at)
        for layer, i in zip(unshifted.layers, range(len(r.windows))):
            k, v = card.dense(i)
            layer.append_dense(k, v)
        k0 = unshifted.layers[0].dense(at, at + len(tokens))[0].astype(mx.float32)
        assert mx.abs(k0 - truth.layers[0].dense(at, at + len(tokens))[0].astype(mx.float32)).max().item() > 0.1


def test_gemma_window_layers_keep_only_their_window(fp16_model):
    r = fp16_model("gemma3-270m")
    window = min(w for w in r.windows if w)
    tokens = (r.tokenizer.encode(TEXT * 40))[: window + 40]
    card = cards.export(prefilled(r, tokens), 0, len(tokens), 4.0, fingerprint=r.fingerprint)
    lows = {spec["first"] for spec in card.header["layers"]}
    assert lows == {0, len(tokens) - window}
    receiver = AgentCache([LayerCache(16, w) for w in r.windows])
    r.prefill(r.tokenizer.encode("Notes:"), receiver, logits=False)
    cards.inject(card, receiver, r)
    assert all(layer.offset == receiver.offset for layer in receiver.layers)
    assert r.prefill(r.tokenizer.encode(" Summary"), receiver).shape[0] > 0


# -- through the runtime ---------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("kv", ["fp16", "q4c"])
def test_inject_into_a_fresh_agent_continues_as_the_source(kv, fp16_runner, q4_runner, tmp_path):
    """A 16-bit card of the whole context holds the source's cache as attention
    sees it: the receiver replies exactly as the source does from its own
    (quantized) cache, restores the card's tokens and prefills only its message."""
    runner = fp16_runner if kv == "fp16" else q4_runner
    assert runner.new_cache().layers[0].mode == kv
    rt = Runtime(runner=runner, cache_dir=tmp_path, max_tokens=12)
    try:
        planner = rt.agent("planner", system="You plan.")
        planner.chat("Plan a picnic in three steps.")
        card = planner.export_card(tmp_path / "plan.card", bits=16, mode="uniform")
        coder = rt.agent("coder")
        coder.inject(tmp_path / "plan.card")
        mine = coder.chat("Now list what to buy.")
        theirs = planner.chat("Now list what to buy.")
        assert mine.text == theirs.text
        assert mine.stats.restored_tokens == card.n == theirs.stats.restored_tokens
        assert mine.stats.prefilled_tokens == theirs.stats.prefilled_tokens
    finally:
        rt.close()
    again = Runtime(runner=runner, cache_dir=tmp_path, max_tokens=4)  # the context is in the history on disk
    try:
        s = again.agent("coder").chat("And the drinks?").stats
        assert s.restored_tokens > card.n and s.prefilled_tokens < 30
    finally:
        again.close()


def test_append_after_context_then_hop_again(q4_runner, tmp_path):
    rt = Runtime(runner=q4_runner, cache_dir=tmp_path, max_tokens=10)
    try:
        rt.agent("planner", system="You plan.").chat("Plan a picnic.")
        rt.agent("planner").chat("Shorter.")
        executor = rt.agent("executor", system="You execute.")
        executor.chat("Hello.")
        before = len(executor.prompt_tokens(None, generation=False))
        card = rt.agent("planner").export_card(bits=3.0, span="last-turn")
        assert card.avg_bits <= 3.0 and card.first > 0
        executor.inject(card)
        assert executor.context["tokens"][before:] == card.tokens
        s = executor.chat("What is step 2?").stats
        assert s.restored_tokens == before + card.n
        hop = executor.export_card(bits=2.5, span="all")
        assert hop.hops == 2 and hop.avg_bits <= 2.5
        inside = hop.widths[before : before + card.n]
        assert (inside <= card.widths).all()  # never more precision than the card gave
    finally:
        rt.close()


def test_refusals_change_nothing(fp16_runner, fp16_model, tmp_path):
    rt = Runtime(runner=fp16_runner, cache_dir=tmp_path / "a", max_tokens=4)
    try:
        rt.agent("planner").chat("Plan a picnic.")
        path = rt.agent("planner").export_card(tmp_path / "plan.card", bits=4.0).path
        with pytest.raises(ValueError, match="below the minimum"):
            rt.agent("planner").export_card(tmp_path / "low.card", bits=2.0)
        assert not (tmp_path / "low.card").exists()
        coder = rt.agent("coder")
        coder.chat("Hi.")
        rt.flush()  # the history file is written by the runtime's writer thread
        history = (tmp_path / "a" / "coder.json").read_text()
        raw = path.read_bytes()
        damaged = tmp_path / "damaged.card"
        damaged.write_bytes(raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:])
        with pytest.raises(CacheFileError, match="checksum mismatch"):
            coder.inject(damaged)
        truncated = tmp_path / "truncated.card"
        truncated.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(CacheFileError, match="truncated"):
            coder.inject(truncated)
        assert (tmp_path / "a" / "coder.json").read_text() == history and coder.context is None
    finally:
        rt.close()
    other = Runtime(runner=fp16_model("gemma3-270m"), cache_dir=tmp_path / "g", max_tokens=4)
    try:
        with pytest.raises(cards.CardError, match="another model"):
            other.agent("coder").inject(path)
        assert other.agent("coder").context is None
    finally:
        other.close()


def test_cli_card_export_show_inject(model_home, smollm2_path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlx_agentcache.cli import app

    monkeypatch.setenv("AGENTCACHE_HOME", str(model_home))
    common = ["--model", str(smollm2_path), "--cache-dir", str(tmp_path / "d")]
    cli = CliRunner()
    out = cli.invoke(app, ["say", "Plan a picnic.", "--agent", "planner", "--max-tokens", "8"] + common)
    assert out.exit_code == 0, out.output
    card = tmp_path / "plan.card"
    out = cli.invoke(app, ["card", "export", str(card), "--agent", "planner", "--bits", "3.5", "--range", "last-turn"] + common)
    assert out.exit_code == 0, out.output
    out = cli.invoke(app, ["card", "show", str(card), "--json"])
    info = json.loads(out.output)
    assert info["source"] == "planner" and info["avg_bits"] <= 3.5 and info["hops"] == 1 and info["bytes"] == card.stat().st_size
    out = cli.invoke(app, ["card", "inject", str(card), "--agent", "coder"] + common)
    assert out.exit_code == 0, out.output
    out = cli.invoke(app, ["say", "Go on.", "--agent", "coder", "--max-tokens", "4", "--json"] + common)
    turn = json.loads(out.output.strip().splitlines()[-1])
    assert turn["restored_tokens"] >= info["tokens"]
    bad = cli.invoke(app, ["card", "export", str(tmp_path / "x.card"), "--agent", "planner", "--bits", "2"] + common)
    assert bad.exit_code == 1 and "below the minimum" in bad.output
    chat = cli.invoke(app, ["chat", "--agent", "planner", "--max-tokens", "4"] + common,
                      input="/handoff planner -> critic --bits 3\n@critic Any risk?\n/quit\n")
    assert chat.exit_code == 0, chat.output
    assert "to critic at" in chat.output and "critic: " in chat.output


def test_workflow_handoff_step(q4_runner, tmp_path):
    from mlx_agentcache import workflow

    wf = workflow.loads(
        "agents: {planner: {system: You plan.}, executor: {system: You execute.}}\n"
        "script:\n  - planner: Plan a picnic.\n  - handoff: {from: planner, to: executor, bits: 3}\n  - executor: Carry out the plan above.\n"
    )
    rt = Runtime(runner=q4_runner, cache_dir=tmp_path, max_tokens=6)
    try:
        results = workflow.run(rt, wf)
    finally:
        rt.close()
    assert [r.handoff_from for r in results] == [None, "planner", None]
    card_tokens = len(rt.agent("planner").prompt_tokens(None, generation=False))
    assert results[2].stats.restored_tokens >= card_tokens and results[2].stats.prefilled_tokens < 40
    with pytest.raises(workflow.WorkflowError, match="bits"):
        workflow.loads("agents: {a: {}, b: {}}\nscript:\n  - handoff: {from: a, to: b, bits: 1}\n")
    for example in ("plan_execute_review", "debate"):
        steps = workflow.load(Path(__file__).parent.parent / "examples" / f"{example}.yaml").steps
        assert any(s.handoff for s in steps)


def test_server_cachecard_download_and_upload(smollm2_path, model_home, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from mlx_agentcache.server.app import create_app
    from mlx_agentcache.server.state import ServerConfig

    monkeypatch.setenv("AGENTCACHE_HOME", str(model_home))
    app = create_app(ServerConfig(model=str(smollm2_path), cache_dir=tmp_path, default_max_tokens=6))
    with TestClient(app, base_url="http://127.0.0.1") as client:  # without a key: Host must name this server
        deadline = time.time() + 120
        while client.get("/health").status_code != 200 and time.time() < deadline:  # the model loads in the background
            time.sleep(0.2)
        r = client.post("/v1/chat/completions", headers={"X-Agent-Id": "planner"},
                        json={"model": str(smollm2_path), "messages": [{"role": "user", "content": "Plan a picnic."}], "max_tokens": 6})
        assert r.status_code == 200, r.text
        card = client.get("/v1/agents/planner/cachecard", params={"bits": 3.5})
        assert card.status_code == 200, card.text
        assert float(card.headers["x-card-avg-bits"]) <= 3.5
        binary = {"content-type": "application/octet-stream"}  # without a key uploads must say so (no form can)
        up = client.post("/v1/agents/coder/cachecard", content=card.content, headers=binary)
        assert up.status_code == 201, up.text
        assert up.json()["context_tokens"] == int(card.headers["x-card-tokens"])
        bad = client.post("/v1/agents/coder2/cachecard", content=card.content[:-10], headers=binary)
        assert bad.status_code == 400 and "truncated" in bad.text
        low = client.get("/v1/agents/planner/cachecard", params={"bits": 2})
        assert low.status_code == 400 and "below the minimum" in low.text


def test_hops_at_the_same_budget_reach_a_fixed_point(fp16_runner):
    """Each token keeps its width (the previous card caps it and the budget
    allows it). MLX's affine quantizer snaps a grid once when it quantizes
    decoded values again; from the second card on, a hop changes nothing."""
    r = fp16_runner
    tokens = r.tokenizer.encode(TEXT * 3)
    cache, hop = prefilled(r, tokens), []
    for h in range(3):
        hop.append(cards.export(cache, 0, len(tokens), 3.5, cap=hop[-1].widths if hop else None, hops=h + 1, fingerprint=r.fingerprint))
        cache = AgentCache([LayerCache(16, w) for w in r.windows])
        cards.inject(hop[-1], cache, r)
    assert np.array_equal(hop[1].widths, hop[0].widths) and np.array_equal(hop[2].widths, hop[0].widths) and hop[2].hops == 3
    for i in range(len(r.windows)):
        for a, b in zip(hop[1].dense(i), hop[2].dense(i)):
            assert mx.array_equal(a, b).item(), f"layer {i} moved between hop 2 and 3"
    lower = cards.export(cache, 0, len(tokens), 2.5, cap=hop[0].widths, fingerprint=r.fingerprint)
    assert (lower.widths <= hop[0].widths).all() and lower.avg_bits <= 2.5
