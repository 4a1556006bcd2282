"""The cache budget holds at every instant, and a pinned agent stays hot,
through a real server: uvicorn on loopback (in this process, so the pool's
accounting and the arrays it accounts for can be watched while requests run),
the official `openai` SDK, the real SmolLM2-135M.

The budget is 4 MiB: one SmolLM2 agent with a short conversation holds one
256-token block in every layer (about 1.8 MiB in Q4), so two fit and five
agents must cycle through disk.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from server_process import free_port

MODEL = "smollm2-135m"
KEY = "budget-key"
BUDGET = 4 << 20
TIMEOUT_S = 300


class InProcessServer:
    """`create_app` served by uvicorn on a thread of this process."""

    def __init__(self, cache_dir: Path):
        import uvicorn

        from mlx_agentcache.server import ServerConfig, create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(ServerConfig(model=MODEL, cache_dir=cache_dir, budget_bytes=BUDGET, api_key=KEY, default_max_tokens=8))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def start(self) -> "InProcessServer":
        self.thread.start()
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server not ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)
        assert not self.thread.is_alive()

    @property
    def pool(self):
        return self.app.state.runtime.pool

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers={"x-api-key": KEY}, timeout=TIMEOUT_S)

    def post(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, headers={"x-api-key": KEY}, timeout=TIMEOUT_S)

    def metric(self, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", self.get("/metrics").text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


@pytest.fixture(scope="module")
def served(smollm2_path, model_home, tmp_path_factory):
    old = os.environ.get("AGENTCACHE_HOME")
    os.environ["AGENTCACHE_HOME"] = str(model_home)  # the runtime finds the converted model there
    s = InProcessServer(tmp_path_factory.mktemp("budget") / "cache").start()
    try:
        yield s
    finally:
        s.stop()
        if old is None:
            os.environ.pop("AGENTCACHE_HOME", None)
        else:
            os.environ["AGENTCACHE_HOME"] = old


def array_bytes(pool) -> int:
    """What the pool's caches take, counted from their arrays (not from the
    pool's own bookkeeping): every non-shared segment of every cache that is
    hot or checked out, plus the shared prefixes in memory. Under the ledger's lock."""
    from mlx_agentcache.prefixes import SharedSegment

    caches = pool.ledger.caches()
    own = sum(
        sum(x.nbytes for x in s.keys) + sum(x.nbytes for x in s.values or ())
        for c in caches
        for layer in c.layers
        for s in layer.segments
        if not isinstance(s, SharedSegment)
    ) + sum(x.nbytes for c in caches for layer in c.layers if layer.sinks is not None for x in layer.sinks)
    return own + (pool.prefixes.memory_bytes() if pool.prefixes else 0)


def chat(client, agent: str, messages: list[dict]):
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_headers={"X-Agent-Id": agent})
    return r.choices[0].message.content, r.model_extra["x_agentcache"], r.usage


def test_budget_holds_at_every_instant_and_the_accounting_matches_the_arrays(served):
    pool = served.pool
    assert pool.budget == BUDGET and 0 < pool.turn_bytes(60, 8) < BUDGET // 2  # two short agents fit, five do not
    samples: list[tuple[int, int]] = []  # (accounted, from the arrays)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with pool.ledger.lock:
                real = array_bytes(pool)
                samples.append((pool.hot_bytes, real))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    agents = [f"budget-{i}" for i in range(5)]
    convs = {a: [{"role": "user", "content": f"I am agent {a}. Name a fruit."}] for a in agents}
    tiers: list[str] = []
    try:
        with ThreadPoolExecutor(len(agents)) as ex:
            for _ in range(3):  # every round, all five at once
                results = dict(zip(agents, ex.map(lambda a: chat(served.client(), a, convs[a]), agents)))
                for a, (text, info, _) in results.items():
                    tiers.append(info["tier"])
                    convs[a] += [{"role": "assistant", "content": text}, {"role": "user", "content": "Another one."}]
    finally:
        stop.set()
        sampler.join()
    served.app.state.runtime.flush()
    assert len(samples) > 100
    over = [s for s in samples if s[0] > BUDGET]
    assert not over, f"{len(over)} of {len(samples)} samples over the budget, max {max(over)[0]}"
    assert all(real <= accounted for accounted, real in samples), "arrays held more than the pool accounted for"
    with pool.ledger.lock:
        assert pool.hot_bytes == array_bytes(pool) > 0  # idle: the accounting is exactly the arrays
    assert pool.stats.peak_hot_bytes <= BUDGET and pool.stats.over_budget == 0
    assert served.metric("agentcache_hot_bytes_peak") <= BUDGET and served.metric("agentcache_over_budget_total") == 0
    assert pool.stats.evictions > 0 and "warm" in tiers  # the budget did bind: agents went to disk and came back


def test_pinned_agent_stays_hot_while_others_cycle_through_disk(served):
    client = served.client()
    keeper = [{"role": "user", "content": "I am the keeper. Remember the word lantern."}]
    text, info, _ = chat(client, "keeper", keeper)
    keeper += [{"role": "assistant", "content": text}, {"role": "user", "content": "Which word?"}]
    r = served.post("/v1/agents/keeper/pin")
    assert r.status_code == 200 and r.json() == {"name": "keeper", "pinned": True, "tier": "hot"}
    assert served.get("/v1/agents/keeper").json()["pinned"] is True

    others = {f"cycler-{i}": [{"role": "user", "content": f"I am cycler {i}. Count to three."}] for i in range(4)}
    tiers = {}
    for _ in range(2):
        for name, msgs in others.items():
            text, info, _ = chat(client, name, msgs)
            tiers.setdefault(name, []).append(info["tier"])
            msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again."}]
            assert served.get("/v1/agents/keeper").json()["tier"] == "hot"
    assert all(t[1] == "warm" for t in tiers.values()), tiers  # they went through disk; the keeper did not
    listed = {a["name"]: a for a in served.get("/v1/agents").json()["data"]}
    assert listed["keeper"]["pinned"] is True and listed["keeper"]["tier"] == "hot"
    assert not any(listed[n]["pinned"] for n in others)
    _, info, usage = chat(client, "keeper", keeper)
    assert info["tier"] == "hot" and usage.prompt_tokens_details.cached_tokens > 0

    # a second pin would leave other agents less than half the budget; a pinned agent is not evicted
    r = served.post("/v1/agents/cycler-3/pin")
    assert r.status_code == 409 and r.json()["error"]["code"] == "pin_refused" and "50%" in r.json()["error"]["message"]
    r = served.post("/v1/agents/keeper/evict")
    assert r.status_code == 409 and r.json()["error"]["code"] == "agent_pinned"
    assert served.post("/v1/agents/nobody/pin").status_code == 404
    assert served.post("/v1/agents/bad..id/pin").status_code == 400
    assert served.get("/v1/agents").json()["memory"]["pinned"] == ["keeper"]
    assert served.metric("agentcache_pinned_agents") == 1

    # unpinned, it cycles like the others
    assert served.post("/v1/agents/keeper/unpin").json() == {"name": "keeper", "pinned": False, "was_pinned": True, "tier": "hot"}
    for name, msgs in others.items():
        chat(client, name, msgs)
    assert served.get("/v1/agents/keeper").json()["tier"] == "warm"
    assert served.pool.stats.peak_hot_bytes <= BUDGET and served.pool.stats.over_budget == 0


# -- the pool alone: pins against a budget of whole caches -----------------------------
def test_pool_pins_skip_eviction_are_capped_and_give_way_when_they_outgrow_it(tmp_path):
    from mlx_agentcache.kvcache import AgentCache, LayerCache
    from mlx_agentcache.pool import CachePool, PinError
    from mlx_agentcache.prefixes import own_bytes
    from tiny import random_cache

    messages: list[str] = []
    p = CachePool(tmp_path, "f" * 32, lambda: AgentCache([LayerCache(4) for _ in range(2)]), warn=messages.append)
    one = own_bytes(random_cache(1))  # 300 tokens: two blocks a layer
    p.budget = int(2.5 * one)
    with pytest.raises(PinError, match="no cache to pin"):
        p.pin("a")
    for seed, name in enumerate("ab"):
        p.checkout(name)
        p.checkin(name, random_cache(seed))
    p.pin("a")  # the least recently used: the first eviction candidate
    with pytest.raises(PinError, match="over 50% of the"):
        p.pin("b")  # two pinned caches would be 2 of 2.5
    for seed, name in enumerate("cde", start=2):
        p.checkout(name)
        p.checkin(name, random_cache(seed))
        assert p.tier("a") == "hot" and p.hot_bytes <= p.budget
    p.flush()
    assert p.pinned == {"a"} and list(p.hot) == ["a", "e"] and p.tier("b") == p.tier("c") == "warm"
    assert p.describe("a")["pinned"] is True and p.describe("e")["pinned"] is False and p.summary()["pinned"] == ["a"]

    # a pinned agent that grows past half the budget is unpinned, with a warning
    grown = random_cache(9, n=600)
    p.checkout("a")
    p.checkin("a", grown)
    p.flush()
    assert p.pinned == set() and p.stats.unpinned == 1 and any("agent 'a' unpinned" in m for m in messages)

    # unpinned agents are evicted like any other; deleting an agent drops its pin
    assert p.unpin("a") is False
    p.checkout("a")
    p.checkin("a", random_cache(0))
    p.pin("a")
    p.remove("a")
    assert p.pinned == set() and p.stats.over_budget == 0 and p.stats.peak_hot_bytes <= p.budget
