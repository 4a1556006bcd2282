"""Turns of one agent never overlap (turnlock.py): concurrent `agentcache say`
processes and two Runtimes in one process land every turn, in the order they
held the agent's turn lock, each continuing the history the previous one saved."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.store import codec, container
from mlx_agentcache.store.layout import Layout
from mlx_agentcache.turnlock import TurnBusyError, TurnLock

AGENTCACHE = str(Path(sys.executable).parent / "agentcache")


def say(home: Path, d: Path, text: str, agent: str = "c") -> subprocess.Popen:
    env = dict(os.environ, AGENTCACHE_HOME=str(home))
    cmd = [AGENTCACHE, "say", "--cache-dir", str(d), "--agent", agent, "--max-tokens", "6", "--json", text]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    return json.loads(out)


def holding_open(procs, path: Path) -> set[int]:
    """The pids of `procs` that have `path` open: a turn waiting for its lock holds the file open."""
    pids = {p.pid for p in procs}
    if not Path("/proc").is_dir():  # macOS
        out = subprocess.run(["lsof", "-t", str(path)], capture_output=True, text=True).stdout
        return {int(x) for x in out.split()} & pids
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path.resolve()):
                    found.add(pid)
            except OSError:
                continue
    return found


def saved_history(d: Path, agent: str = "c") -> list[dict]:
    return json.loads((d / f"{agent}.json").read_text())["messages"]


def check_every_turn_landed(d: Path, first: str, results: dict[str, dict]) -> None:
    """The history holds the first exchange, then every concurrent turn once, each
    user message followed by that turn's own reply; each turn saw the ones before it."""
    msgs = saved_history(d)
    assert len(msgs) == 2 + 2 * len(results)
    assert msgs[0] == {"role": "user", "content": first}
    assert [m["role"] for m in msgs] == ["user", "assistant"] * (1 + len(results))
    order = [m["content"] for m in msgs[2::2]]
    assert sorted(order) == sorted(results)
    for i, text in enumerate(order):
        assert msgs[3 + 2 * i]["content"] == results[text]["reply"]
        assert results[text]["saved"] is True and results[text]["save_error"] is None
    tokens = [results[t]["cache_tokens"] for t in order]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens  # each continued the one before
    _, meta, _ = container.read_header(d / "c.safetensors", codec.FORMATS)
    assert int(meta["n_tokens"]) == tokens[-1]  # the cache is the last turn's


def test_two_say_processes_at_once_keep_both_turns(tmp_path, smollm2_path, model_home):
    d = tmp_path / "agents"
    finish(say(model_home, d, "Remember PELICAN"))
    procs = {t: say(model_home, d, t) for t in ("First question", "Second question")}
    check_every_turn_landed(d, "Remember PELICAN", {t: finish(p) for t, p in procs.items()})


def test_say_processes_wait_for_a_held_turn_then_all_land(tmp_path, smollm2_path, model_home):
    d = tmp_path / "agents"
    finish(say(model_home, d, "Remember PELICAN"))
    lock = TurnLock(Layout(d).turn_lock_file("c"), "c")
    assert lock.acquire(0)
    texts = ("Question one", "Question two", "Question three")
    procs = {t: say(model_home, d, t) for t in texts}
    try:
        deadline = time.monotonic() + 300  # the models load; each turn then waits for the lock this test holds
        while holding_open(procs.values(), lock.path) != {p.pid for p in procs.values()}:
            assert [t for t, p in procs.items() if p.poll() is not None] == [], "a turn ended while the test held the lock"
            assert time.monotonic() < deadline, "the say processes never reached the turn lock"
            time.sleep(0.05)
        assert [t for t, p in procs.items() if p.poll() is not None] == []
        assert len(saved_history(d)) == 2
    finally:
        lock.release()
    check_every_turn_landed(d, "Remember PELICAN", {t: finish(p) for t, p in procs.items()})


@pytest.fixture(scope="module")
def two_runtimes(model_home, tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    rts = [Runtime(home=model_home, cache_dir=d, max_tokens=6) for _ in range(2)]
    yield rts
    for rt in rts:
        rt.close()


def test_two_runtimes_continue_each_others_history(two_runtimes):
    rt1, rt2 = two_runtimes
    a1, a2 = rt1.agent("pair"), rt2.agent("pair")  # both read the (empty) history now
    a1.chat("Remember PELICAN")
    r = a2.chat("What did I ask you to remember?")
    assert [m["content"] for m in a2.messages[::2]] == ["Remember PELICAN", "What did I ask you to remember?"]
    assert r.stats.tier == "warm" and r.stats.restored_tokens > 0  # rt1's saved cache, not a re-prefill

    results = {}

    def talk(agent, text):
        results[text] = agent.chat(text)

    threads = [threading.Thread(target=talk, args=(a, t)) for a, t in ((a1, "one"), (a2, "two"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    rt1.flush(), rt2.flush()
    msgs = saved_history(rt1.cache_dir, "pair")
    assert len(msgs) == 8
    order = [m["content"] for m in msgs[4::2]]
    assert sorted(order) == ["one", "two"]
    assert [msgs[5]["content"], msgs[7]["content"]] == [results[t].text for t in order]

    # rt1's hot cache stops before rt2's turn: it is cut to the newer history and only the rest is prefilled
    last = a1.chat("three")
    rt1.flush()
    msgs = saved_history(rt1.cache_dir, "pair")
    assert len(msgs) == 10 and msgs[8]["content"] == "three" and msgs[9]["content"] == last.text
    assert last.stats.restored_tokens > 0
    history = len(a1.prompt_tokens(None, generation=False))
    assert 0 < history - last.stats.cache_tokens <= last.stats.generated_tokens + 4  # the closing marker waits for the next prompt
    _, meta, _ = container.read_header(rt1.pool.path("pair"), codec.FORMATS)
    assert int(meta["n_tokens"]) == last.stats.cache_tokens


def test_turn_waits_boundedly_then_fails_cleanly(two_runtimes):
    rt1, _ = two_runtimes
    a = rt1.agent("waiter")
    a.chat("hello")
    rt1.flush()
    rt1.turn_locks.wait()
    before = (rt1.cache_dir / "waiter.json").read_bytes()
    lock = TurnLock(Layout(rt1.cache_dir).turn_lock_file("waiter"), "waiter")
    assert lock.acquire(0)  # free once the turn's saves landed
    rt1.turn_locks.wait_s = 0.5
    try:
        t0 = time.monotonic()
        with pytest.raises(TurnBusyError, match="agent 'waiter' is in a turn in another process or runtime"):
            a.chat("not now")
        assert 0.4 < time.monotonic() - t0 < 10
        assert not rt1.turn_locks.held("waiter")
    finally:
        lock.release()
        rt1.turn_locks.wait_s = 300
    assert (rt1.cache_dir / "waiter.json").read_bytes() == before
    assert len(a.messages) == 2
    a.chat("now")
    rt1.flush()
    assert [m["content"] for m in saved_history(rt1.cache_dir, "waiter")[::2]] == ["hello", "now"]


def test_extend_in_another_runtime_continues_the_saved_history(two_runtimes):
    rt1, rt2 = two_runtimes
    a1, a2 = rt1.agent("notes"), rt2.agent("notes")
    a1.chat("Remember PELICAN")
    a2.extend("Tool output: the bird is a pelican.")  # a2 read the history before a1's turn
    rt2.flush()
    msgs = saved_history(rt1.cache_dir, "notes")
    assert [m["content"] for m in msgs][::2] == ["Remember PELICAN", "Tool output: the bird is a pelican."]
    assert len(msgs) == 3
    r = a1.chat("What is the bird?")  # rt1's hot cache ends before the note: cut, then the rest prefilled
    rt1.flush()
    assert len(saved_history(rt1.cache_dir, "notes")) == 5 and r.stats.restored_tokens > 0
