"""The cache pool: budget and eviction, write-behind, restores, multi-phase
context, shared prefixes, locking across processes, full disks."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx
import pytest

from mlx_agentcache import pool as pool_mod
from mlx_agentcache.kvcache import AgentCache, LayerCache
from mlx_agentcache.pool import AgentBusyError, CachePool
from mlx_agentcache.prefixes import SharedSegment, own_bytes, prefix_of
from mlx_agentcache.store import codec, container, segments
from tiny import random_cache, same_tensors, tiny_runner, tokens

# Prefill through a restored or shared cache reads the same Q4 codes; only
# float summation order can differ from an uninterrupted run.
LOGIT_TOL = 1e-3
BLOCKED_S = 10.0  # an operation that took this long waited for what a test holds (a file, a write): far above a loaded machine's delays
TESTS = Path(__file__).parent


def new_random_cache() -> AgentCache:
    return AgentCache([LayerCache(4) for _ in range(2)])


def disk(pool: CachePool, name: str) -> int:
    """Bytes of the agent's manifest and segments."""
    return segments.disk_bytes(pool.path(name))


def rpool(tmp_path, **kw) -> CachePool:
    """A pool over model-free random caches (2 layers, 2 heads, dim 64)."""
    kw.setdefault("warn", lambda m: None)
    return CachePool(tmp_path, "f" * 32, new_random_cache, **kw)


@pytest.fixture(scope="module")
def runner():
    return tiny_runner()


def turn(pool: CachePool, runner, name: str, prompt: list[int]):
    """One model step for `name`: reuse what is cached, prefill the rest, check in."""
    _, tier = pool.checkout(name)
    cache, reuse = pool.begin_turn(name, prompt)
    logits = runner.prefill(prompt[reuse:], cache)
    pool.checkin(name, cache)
    return tier, reuse, logits


# -- budget, eviction, write-behind ------------------------------------------


def test_lru_eviction_under_budget_and_counters(tmp_path):
    p = rpool(tmp_path, budget_bytes=float("inf"))
    one = own_bytes(random_cache(1))
    p.budget = int(2.5 * one)
    for seed, name in enumerate("abc"):
        cache, tier = p.checkout(name)
        assert tier == "cold"
        p.checkin(name, random_cache(seed))
    assert p.flush() == {}
    assert list(p.hot) == ["b", "c"] and p.tier("a") == "warm"
    assert p.stats.evictions == 1 and p.stats.writes == 3
    cache, tier = p.checkout("a")  # restoring a needs room: b (least recently used) goes
    assert tier == "warm" and same_tensors(cache, random_cache(0))
    p.checkin("a", cache)
    p.flush()
    assert list(p.hot) == ["c", "a"] and p.stats.evictions == 2
    s = p.summary()
    assert s["hits"] == {"hot": 0, "warm": 1, "cold": 3}
    assert s["bytes_read"] == disk(p, "a")
    # a's second save changed nothing: it wrote a new manifest only
    assert s["bytes_written"] == sum(disk(p, n) for n in "abc") + p.path("a").stat().st_size
    assert s["hot_bytes"] <= p.budget and s["pending_writes"] == 0


def test_busy_agents_are_never_evicted(tmp_path):
    p = rpool(tmp_path, budget_bytes=int(1.5 * own_bytes(random_cache(1))))
    p.checkout("a")
    p.checkin("a", random_cache(1))
    held, tier = p.checkout("a")  # in a turn
    assert tier == "hot"
    p.checkout("b")
    p.checkin("b", random_cache(2))  # over budget: a is older but busy, so b goes
    p.flush()
    assert p.tier("a") == "hot" and p.tier("b") == "warm"


def test_memory_only_pool_evicts_to_cold(tmp_path):
    p = rpool(tmp_path, budget_bytes=int(1.5 * own_bytes(random_cache(1))), persist=False)
    for seed, name in enumerate("ab"):
        p.checkout(name)
        p.checkin(name, random_cache(seed))
    assert p.tier("a") == "cold" and p.tier("b") == "hot" and p.stats.evictions == 1
    assert not list(tmp_path.glob("*.safetensors"))


def test_default_budget_is_a_fraction_of_available_memory(monkeypatch):
    available = pool_mod.available_memory()  # one real reading: MemAvailable moves between two reads
    monkeypatch.setattr(pool_mod, "available_memory", lambda: available)
    assert pool_mod.default_budget() == int(available * pool_mod.BUDGET_FRACTION) > 0


def test_write_behind_never_blocks_turns_and_eviction_waits_only_for_its_victim(tmp_path, monkeypatch):
    gate = threading.Event()
    real = container.write_tensors

    def slow_for_one(path, *a):
        if Path(path).name == "slow.safetensors":
            assert gate.wait(20)
        return real(path, *a)

    monkeypatch.setattr(container, "write_tensors", slow_for_one)
    p = rpool(tmp_path, budget_bytes=float("inf"))
    one = own_bytes(random_cache(1))
    p.budget = int(2.5 * one)

    p.checkout("x")
    p.checkin("x", random_cache(1))
    p.flush("x")
    t0 = time.perf_counter()
    p.checkout("slow")
    p.checkin("slow", random_cache(2))
    assert time.perf_counter() - t0 < BLOCKED_S and p.pending("slow")  # the turn did not wait for disk (held for 20 s)
    p.checkout("y")
    p.checkin("y", random_cache(3))  # evicts x (clean): no wait for slow's write
    assert p.tier("x") == "warm" and p.pending("slow")

    done = threading.Event()

    def z_turn():
        p.checkout("z")
        p.checkin("z", random_cache(4))  # must evict slow: waits for its save
        done.set()

    t = threading.Thread(target=z_turn)
    t.start()
    assert not done.wait(0.5)
    gate.set()
    t.join(20)
    assert done.is_set() and p.tier("slow") == "warm"
    cache, _ = codec.load(p.path("slow"), p.fingerprint)
    assert same_tensors(cache, random_cache(2))


def test_save_failure_keeps_agent_hot_and_tells_the_user(tmp_path, monkeypatch):
    messages = []
    p = rpool(tmp_path, budget_bytes=1, warn=messages.append)
    p.checkout("a")
    p.checkin("a", random_cache(1))
    p.flush()
    monkeypatch.setattr(container.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    p.checkout("a")
    p.checkin("a", random_cache(2))
    failed = p.flush()
    assert "No space left" in failed["a"] and any("No space left" in m for m in messages)
    assert p.tier("a") == "hot" and "a" in p.summary()["unsaved"] and p.stats.write_errors == 1
    p.checkout("b")
    p.checkin("b", random_cache(3))  # over budget, but a's newest state is only in memory
    assert p.tier("a") == "hot"
    cache, _ = codec.load(p.path("a"), p.fingerprint)
    assert same_tensors(cache, random_cache(1))  # the previous file is intact


def test_close_frees_saved_caches_at_once_and_keeps_unsaved_ones(tmp_path, monkeypatch):
    """The pool and its callbacks form reference cycles: without close letting go,
    a closed pool's caches would hold their memory until the cycle collector ran."""
    import gc
    import weakref

    p = rpool(tmp_path)
    for seed, name in enumerate("ab"):
        p.checkout(name)
        p.checkin(name, random_cache(seed))
    p.flush()
    monkeypatch.setattr(container.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    p.checkout("b")
    p.checkin("b", random_cache(5))  # its save fails: memory is newer than its file
    saved = weakref.ref(p.hot["a"])
    gc.disable()
    try:
        p.close()
        assert saved() is None and "a" not in p.hot
    finally:
        gc.enable()
    assert same_tensors(p.hot["b"], random_cache(5)) and "No space left" in p.save_errors()["b"]
    monkeypatch.undo()
    cache, tier = p.checkout("a")  # a closed pool still answers, from disk
    assert tier == "warm" and same_tensors(cache, random_cache(0))


def test_a_budgeted_pool_hands_an_evicted_cache_s_memory_to_its_next_restore(tmp_path):
    """On a CPU, MLX keeps 32 MB of freed buffers; the pool lets it keep what the budget
    has room for, so a restore reuses the memory an eviction freed instead of faulting
    new pages in. An unlimited budget leaves MLX's limit alone; close puts it back."""
    def big(seed: int) -> AgentCache:
        return random_cache(seed, layers=10, heads=8, n=4096, dim=128)  # 47 MB of q4 arrays, over MLX's 32 MB

    size = own_bytes(big(0))
    assert size > 40 << 20
    def pool(d: Path, budget: float) -> CachePool:
        return CachePool(d, "f" * 32, lambda: AgentCache([LayerCache(4) for _ in range(10)]), budget, lambda m: None, share_prefixes=False)

    p = pool(tmp_path / "budget", 4 * size)
    p.checkout("a")
    p.checkin("a", big(0))
    for _ in range(2):  # the second eviction frees arrays of the restore's own shapes
        p.evict("a")
        held = mx.get_cache_memory()
        cache, tier = p.checkout("a")
        assert tier == "warm" and same_tensors(cache, big(0))
        p.checkin("a", cache)
        del cache
    if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return  # their allocators keep freed buffers up to the memory limit by themselves
    assert held >= size  # the evicted cache's buffers were kept...
    after = mx.get_cache_memory()
    assert after <= held - size // 2  # ...and the restore took them back
    mx.eval(mx.zeros((size,), mx.uint8))  # other memory freed (a prefill's activations) goes back to the system
    assert mx.get_cache_memory() <= max(after, 32 << 20)
    p.close()
    assert mx.get_cache_memory() <= 32 << 20
    q = pool(tmp_path / "unlimited", float("inf"))
    q.checkout("a")
    q.checkin("a", big(1))
    q.evict("a")
    assert mx.get_cache_memory() <= 32 << 20


def test_stale_temporary_files_are_removed(tmp_path):
    dead = tmp_path / ".a.safetensors.tmp999999999"
    mine = tmp_path / f".b.safetensors.tmp{os.getpid()}"
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    rpool(tmp_path)
    assert not dead.exists() and mine.exists()


# -- restores and refusals ---------------------------------------------------


def test_warm_restore_gives_identical_tensors(tmp_path):
    p = rpool(tmp_path)
    p.checkout("a")
    p.checkin("a", random_cache(5, n=700))
    p.close()
    q = rpool(tmp_path)
    cache, tier = q.checkout("a")
    assert tier == "warm" and same_tensors(cache, random_cache(5, n=700))
    assert q.stats.bytes_read == disk(q, "a")


def _damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "bitflip":
        data[-7] ^= 0x80
    elif kind == "truncated":
        del data[len(data) // 3 :]
    elif kind == "oversized-header":
        data[:8] = (1 << 50).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["bitflip", "truncated", "oversized-header", "wrong-model", "wrong-version"])
def test_refused_file_is_moved_aside_and_agent_prefills(tmp_path, kind, monkeypatch):
    messages = []
    p = rpool(tmp_path, warn=messages.append, write_behind=False)
    if kind == "wrong-model":
        codec.save(p.path("a"), random_cache(1), "0" * 32)
    elif kind == "wrong-version":
        monkeypatch.setattr(container, "VERSION", 1)
        codec.save(p.path("a"), random_cache(1), p.fingerprint)
        monkeypatch.undo()
    else:
        codec.save(p.path("a"), random_cache(1), p.fingerprint)
        _damage(p.path("a"), kind)
    original = p.path("a").read_bytes()
    cache, tier = p.checkout("a")
    assert tier == "cold" and cache.offset == 0 and p.stats.refused_files == 1
    assert len(messages) == 1 and "cache for agent 'a' not used" in messages[0] and "re-prefilling" in messages[0]
    bad = list(tmp_path.glob("a.safetensors.bad-*"))
    assert len(bad) == 1 and bad[0].read_bytes() == original  # kept, not deleted
    assert not p.path("a").exists()


# -- context across phases ---------------------------------------------------


def test_phases_append_reuse_every_block_and_rewrites_trim_at_first_difference(tmp_path, runner):
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    phase1 = tokens(300, seed=3)  # one full block and a partial one
    _, reuse, _ = turn(p, runner, "a", phase1)
    assert reuse == 0
    cache = p.hot["a"]
    assert cache.offset == 300 and len(cache.layers[0].segments) == 1

    phase2 = phase1 + tokens(250, seed=4)  # grows into the partial block and past it
    _, reuse, logits = turn(p, runner, "a", phase2)
    assert reuse == 300
    ref_cache = runner.new_cache()
    ref = runner.prefill(phase2, ref_cache)
    assert float(mx.abs(logits - ref).max()) < LOGIT_TOL

    rewritten = phase2[:123] + tokens(40, seed=5)  # a later phase edits history
    _, reuse, logits = turn(p, runner, "a", rewritten)
    assert reuse == 123 and p.hot["a"].offset == len(rewritten)
    ref = runner.prefill(rewritten, runner.new_cache())
    assert float(mx.abs(logits - ref).max()) < LOGIT_TOL

    p.flush()
    p.forget("a")  # next phase comes from disk
    phase3 = rewritten + tokens(30, seed=6)
    tier, reuse, logits = turn(p, runner, "a", phase3)
    assert tier == "warm" and reuse == len(rewritten)
    ref = runner.prefill(phase3, runner.new_cache())
    assert float(mx.abs(logits - ref).max()) < LOGIT_TOL


@pytest.fixture(scope="module")
def byte_runner(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    from mlx_agentcache.models import tiny_models

    d = tmp_path_factory.mktemp("tok")
    tiny_models.write_byte_tokenizer(d)
    return tiny_runner(tokenizer=load_tokenizer(d))


def test_agent_extend_and_rewrite(tmp_path, byte_runner):
    from mlx_agentcache.runtime import Runtime

    rt = Runtime(cache_dir=tmp_path, runner=byte_runner, max_tokens=3)
    a = rt.agent("researcher", system="You collect notes.")
    s1 = a.extend("Phase 1 notes: " + "alpha " * 40)
    assert s1.restored_tokens == 0 and s1.cache_tokens == s1.prefilled_tokens
    s2 = a.extend("Phase 2 notes: " + "beta " * 40)
    assert s2.restored_tokens == s1.cache_tokens  # every cached token, partial last block included
    assert s2.prefilled_tokens == len(a.prompt_tokens(None, generation=False)) - s2.restored_tokens
    r = a.chat("Summarise.")
    assert r.stats.tier == "hot" and r.stats.restored_tokens >= s2.cache_tokens - 1
    old = a.prompt_tokens(None, generation=False)
    msgs = [dict(m) for m in a.messages]
    msgs[1]["content"] = "Phase 2 notes: " + "gamma " * 10  # rewrite the second phase
    s3 = a.rewrite(msgs)
    new = a.prompt_tokens(None, generation=False)
    first_diff = next(i for i, (x, y) in enumerate(zip(old, new)) if x != y)
    assert s3.restored_tokens == first_diff and s3.cache_tokens == len(new)
    assert rt.flush() == {}
    rt2 = Runtime(cache_dir=tmp_path, runner=byte_runner, max_tokens=3)
    s4 = rt2.agent("researcher").extend("Phase 3: " + "delta " * 5)
    assert s4.tier == "warm" and s4.restored_tokens == len(new)


# -- shared prefixes -----------------------------------------------------------

SYSTEM = tokens(600, seed=9)  # two full blocks (512 tokens) are shareable
SHARED_MODES = (4, "q4c", "q4k")


@pytest.fixture(scope="module", params=SHARED_MODES, ids=lambda m: f"kv-{m}")
def mode_runner(request):
    return tiny_runner(kv_bits=request.param)


def test_shared_prefix_is_stored_once_in_memory_and_on_disk(tmp_path, mode_runner):
    """In every KV mode: q4c blocks hold whole key groups and the exact sinks."""
    runner = mode_runner
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    solo = runner.new_cache()
    runner.prefill(SYSTEM + tokens(20, seed=100), solo)
    per_agent = own_bytes(solo)
    logits = {}
    for i, name in enumerate(["a", "b", "c", "d"]):
        _, reuse, logits[name] = turn(p, runner, name, SYSTEM + tokens(20 + i, seed=100 + i))
        assert reuse == (0 if name == "a" else 512)  # b turns a's blocks into a prefix; b, c, d skip them
    assert p.stats.prefix_hits == 3
    for name in "abcd":
        first = [layer.segments[0] for layer in p.hot[name].layers]
        assert all(isinstance(s, SharedSegment) and s.length == 512 for s in first)
    assert p.hot_bytes < 4 * per_agent * 0.6
    s = p.summary()
    assert s["shared_prefixes_in_memory"] == 1 and s["shared_prefix_bytes_saved"] > 2 * per_agent * 512 / 620

    ref = runner.prefill(SYSTEM + tokens(23, seed=103), runner.new_cache())
    assert float(mx.abs(logits["d"] - ref).max()) < LOGIT_TOL

    p.flush()
    blocks = list((tmp_path / "blocks").glob("*.safetensors"))
    assert len(blocks) == 1
    key = blocks[0].stem
    for name in "abcd":
        info = p.describe(name)
        assert {k: info["shared_prefix"][k] for k in ("hash", "tokens")} == {"hash": key, "tokens": 512}
        assert info["file_bytes"] < blocks[0].stat().st_size  # only the tail is in the agent file

    q = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    assert q.prefixes.refs[key] == set("abcd")  # rebuilt from the agent files
    restored = {}
    for name in "abcd":
        restored[name], tier = q.checkout(name)
        assert tier == "warm" and same_tensors(restored[name], p.hot[name])
    agent_files = sum(disk(q, name) for name in "abcd")
    assert q.stats.bytes_read == agent_files + blocks[0].stat().st_size  # the block file was read once


def test_a_prefix_one_agent_holds_on_disk_is_found_after_a_restart(tmp_path, mode_runner):
    """No block file yet and no agent in memory: the listing index names the agent on disk
    by its first block, its file is read and the new agent attaches instead of prefilling."""
    runner = mode_runner
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    turn(p, runner, "a", SYSTEM + tokens(20, seed=100))
    p.close()
    assert not list(tmp_path.glob("blocks/*.safetensors"))
    q = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    tier, reuse, logits = turn(q, runner, "b", SYSTEM + tokens(21, seed=101))
    assert (tier, reuse, q.stats.prefix_hits) == ("cold", 512, 1)
    assert q.stats.bytes_read == disk(q, "a")  # a's files, read once
    ref = runner.prefill(SYSTEM + tokens(21, seed=101), runner.new_cache())
    assert float(mx.abs(logits - ref).max()) < LOGIT_TOL
    q.close()
    blocks = list(tmp_path.glob("blocks/*.safetensors"))
    assert len(blocks) == 1 and q.describe("b")["shared_prefix"]["tokens"] == 512  # b's save wrote the block
    other = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    _, reuse, _ = turn(other, runner, "c", tokens(300, seed=7) + SYSTEM)  # another start: nothing to share
    assert reuse == 0 and other.stats.prefix_hits == 0


def test_room_is_made_before_an_agent_on_disk_is_read_for_its_prefix(tmp_path, runner):
    """Its whole cache is read before the prefix is cut from it: that memory counts, so
    idle agents are evicted first, as before a restore."""
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    turn(p, runner, "a", SYSTEM + tokens(20, seed=100))
    p.close()
    q = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    turn(q, runner, "keep", tokens(300, seed=5))
    q.flush()
    prompt = SYSTEM + tokens(21, seed=101)
    q.budget = q.hot_bytes + q.ledger.turn_bytes(len(prompt)) + disk(q, "a") // 2  # the new turn fits; a's file beside it does not
    seen, read = [], q.store.read
    q.store.read = lambda name, source: (seen.append((name, q.tier("keep"))), read(name, source))[1]
    _, reuse, _ = turn(q, runner, "b", prompt)
    assert reuse == 512 and q.stats.prefix_hits == 1
    assert seen == [("a", "warm")]  # keep was evicted (and on disk) before a was read


def test_trimming_into_a_shared_prefix_copies_and_leaves_others_alone(tmp_path, mode_runner):
    runner = mode_runner
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    for i, name in enumerate("ab"):
        turn(p, runner, name, SYSTEM + tokens(20, seed=200 + i))
    b_before = [layer.dense(0, layer.offset) for layer in p.hot["b"].layers]
    edited = SYSTEM[:300] + tokens(50, seed=7)  # a rewrites inside the shared blocks
    _, reuse, _ = turn(p, runner, "a", edited)
    assert reuse == 300
    # the trim copied; on checkin the one block a still has in common is shared again (a view)
    assert all(isinstance(layer.segments[0], SharedSegment) and layer.segments[0].length == 256 for layer in p.hot["a"].layers)
    for layer, kv in zip(p.hot["b"].layers, b_before):
        assert all(mx.array_equal(x, y).item() for x, y in zip(kv, layer.dense(0, layer.offset)))
    p.flush()
    assert p.describe("a")["shared_prefix"]["tokens"] == 256
    cache, _ = codec.load(p.path("a"), p.fingerprint)
    assert cache.tokens == edited


def test_q4c_agents_on_a_shared_block_export_self_contained_archives(tmp_path):
    """After the block: only a tail (a), or more whole groups and a tail (b); the archive puts
    the block's groups and sinks back in front."""
    from mlx_agentcache import catalog

    runner = tiny_runner(kv_bits="q4c")
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    for name, extra in (("a", 30), ("b", 200)):
        turn(p, runner, name, SYSTEM + tokens(extra, seed=500))
    p.flush()
    assert [r[0] for r in p.hot["b"].layers[0].stored_segments(0)] == ["q4c", "q8"]
    for name in "ab":
        assert prefix_of(p.hot[name]) is not None and p.describe(name)["shared_prefix"]["tokens"] == 512
        archive = catalog.export_archive(tmp_path, name, tmp_path / f"{name}.archive.safetensors")
        inlined, _ = codec.load(archive, runner.fingerprint)  # no blocks/ needed
        assert same_tensors(inlined, p.hot[name])


def test_gc_removes_only_unreferenced_blocks_and_missing_blocks_are_refused(tmp_path, runner):
    messages = []
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=messages.append)
    for i, name in enumerate("ab"):
        turn(p, runner, name, SYSTEM + tokens(20, seed=300 + i))
    p.flush()
    assert p.gc_prefixes() == []
    block = next((tmp_path / "blocks").glob("*.safetensors"))
    p.remove("a")
    assert p.gc_prefixes() == []  # b still refers to it
    p.remove("b")
    assert p.gc_prefixes() == [block] and not block.exists()

    turn(p, runner, "c", SYSTEM + tokens(5, seed=1))
    turn(p, runner, "d", SYSTEM + tokens(5, seed=2))
    p.flush()
    next((tmp_path / "blocks").glob("*.safetensors")).unlink()
    q = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=messages.append)
    cache, tier = q.checkout("c")
    assert tier == "cold" and "shared prefix" in messages[-1] and "missing" in messages[-1]


def test_an_agent_never_takes_a_block_on_disk_from_its_own_memory(tmp_path):
    """m gets the system prompt in two turns (a q4c group re-quantized when it fills), so the
    block m and n make holds other bytes than c's one-go prefill. c, restored from its own
    file, keeps its own blocks at checkin: a restore gives back what it had in memory."""
    runner = tiny_runner(kv_bits="q4c")
    solo = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None, share_prefixes=False)
    turn(solo, runner, "c", SYSTEM + tokens(20, seed=700))
    solo.close()
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    turn(p, runner, "m", SYSTEM[:300])
    turn(p, runner, "m", SYSTEM + tokens(20, seed=701))
    _, reuse, _ = turn(p, runner, "n", SYSTEM + tokens(20, seed=702))
    assert reuse == 512
    p.close()
    q = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=pytest.fail)
    _, reuse, _ = turn(q, runner, "c", SYSTEM + tokens(30, seed=700))
    assert reuse == 620 and prefix_of(q.hot["c"]) is None
    q.flush()
    r = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=pytest.fail)
    assert same_tensors(r.checkout("c")[0], q.hot["c"])


def test_a_damaged_q4c_block_refuses_only_its_agents_and_is_written_anew(tmp_path):
    runner = tiny_runner(kv_bits="q4c")
    p = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    for i, name in enumerate("cd"):
        turn(p, runner, name, SYSTEM + tokens(20, seed=600 + i))
    turn(p, runner, "e", tokens(300, seed=3))  # shares nothing
    p.flush()
    (block,) = (tmp_path / "blocks").glob("*.safetensors")
    data = bytearray(block.read_bytes())
    data[len(data) // 2] ^= 0xFF
    block.write_bytes(bytes(data))

    messages = []
    q = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=messages.append)
    assert q.checkout("e")[1] == "warm" and messages == []
    for name in "cd":
        assert q.checkout(name)[1] == "cold"
        q.checkin(name, runner.new_cache(), persist=False)
    assert len(messages) == 2 and all(m.count("\n") == 0 and block.name in m for m in messages)
    assert not block.exists()  # moved aside, so it is not referred to again
    _, reuse, logits = turn(q, runner, "c", SYSTEM + tokens(20, seed=600))  # re-prefills all of it
    assert reuse == 0
    _, reuse, _ = turn(q, runner, "d", SYSTEM + tokens(20, seed=601))
    assert reuse == 512  # c's own prefill makes the new block
    q.flush()
    r = CachePool(tmp_path, runner.fingerprint, runner.new_cache, warn=pytest.fail)
    for name in "cde":
        assert r.checkout(name)[1] == "warm"


# -- two processes, full disks -------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
import mlx_agentcache
from test_pool import rpool
from pathlib import Path
p = rpool(Path({dir!r}))
with p.store.lock("x"):
    print("locked", flush=True)
    time.sleep({hold})
"""


def test_second_process_waits_for_the_agent_lock_or_fails_clearly(tmp_path):
    p = rpool(tmp_path, write_behind=False, lock_timeout=0.3)
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=str(TESTS), dir=str(tmp_path), hold=2.0)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(AgentBusyError, match="agent 'x' is being saved by another process"):
            p.save("x", random_cache(1))
        assert not p.path("x").exists()
        p.store.lock_timeout = 20
        t0 = time.monotonic()
        p.save("x", random_cache(1))  # waits for the other writer, then saves
        assert time.monotonic() - t0 > 0.5
    finally:
        child.wait(20)
    cache, _ = codec.load(p.path("x"), p.fingerprint)
    assert same_tensors(cache, random_cache(1))


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_cleanly_and_keeps_old_file(small_disk):
    messages = []
    p = rpool(small_disk, warn=messages.append, budget_bytes=1)
    p.checkout("a")
    p.checkin("a", random_cache(1, n=100))
    assert p.flush() == {}
    old = p.path("a").read_bytes()
    p.checkout("a")
    p.checkin("a", random_cache(2, n=4000))  # ~1 MB does not fit in 256 KiB
    failed = p.flush()
    assert "No space left on device" in failed["a"]
    assert any("agent 'a' was not saved" in m and "stays in memory" in m for m in messages)
    assert p.tier("a") == "hot" and p.path("a").read_bytes() == old
    assert [x.name for x in small_disk.iterdir() if x.name.startswith(".a.")] == []  # no partial file left
    assert same_tensors(p.hot["a"], random_cache(2, n=4000))
    p.checkout("a")
    p.checkin("a", random_cache(3, n=120))  # space is back for a smaller state: saved, then evictable
    assert p.flush() == {} and "a" not in p.summary()["unsaved"]
    cache, _ = codec.load(p.path("a"), p.fingerprint)
    assert same_tensors(cache, random_cache(3, n=120))


# -- management CLI -------------------------------------------------------------


def test_agents_cli_ls_show_export_import_rm_gc(tmp_path, runner, monkeypatch):
    import json

    from typer.testing import CliRunner

    from mlx_agentcache import catalog
    from mlx_agentcache.cli import app

    d, other = tmp_path / "agents", tmp_path / "elsewhere"
    p = CachePool(d, runner.fingerprint, runner.new_cache, warn=lambda m: None, model="tiny")
    for i, name in enumerate("ab"):
        turn(p, runner, name, SYSTEM + tokens(30, seed=400 + i))
    p.flush()
    history = {"name": "a", "system": "You plan.", "messages": [{"role": "user", "content": "hi"}]}
    (d / "a.json").write_text(json.dumps(history))
    (d / "c.json").write_text(json.dumps({"name": "c", "messages": []}))  # history only: cold
    cli = CliRunner()

    def run(*args, code=0):
        r = cli.invoke(app, ["agents", *args])
        assert r.exit_code == code, r.output
        return r.output

    listing = {i["name"]: i for i in json.loads(run("ls", "--cache-dir", str(d), "--json"))}
    assert set(listing) == {"a", "b", "c"} and listing["c"]["tier"] == "cold"
    assert listing["a"]["tier"] == "warm" and listing["a"]["tokens"] == 630 and listing["a"]["model"] == "tiny"
    assert listing["a"]["shared_bytes"] > listing["a"]["bytes"]  # most of it lives in the shared block
    assert "NAME" in run("ls", "--cache-dir", str(d))
    shown = json.loads(run("show", "a", "--cache-dir", str(d), "--json"))
    assert shown["status"] == "ok" and shown["shared_prefix"]["tokens"] == 512 and shown["messages"] == 1

    card = tmp_path / "a.archive.safetensors"
    assert "exported" in run("export", "a", "-o", str(card), "--cache-dir", str(d))
    inlined, _ = codec.load(card, runner.fingerprint)  # self-contained: no blocks/ next to it
    assert same_tensors(inlined, p.hot["a"])
    run("import", str(card), "--name", "a2", "--cache-dir", str(other))
    q = CachePool(other, runner.fingerprint, runner.new_cache, warn=lambda m: None)
    cache, tier = q.checkout("a2")
    assert tier == "warm" and same_tensors(cache, p.hot["a"])
    assert json.loads((other / "a2.json").read_text())["messages"] == history["messages"]
    assert "already exists" in run("import", str(card), "--name", "a2", "--cache-dir", str(other), code=1)

    run("rm", "a", "--cache-dir", str(d), code=1)  # no terminal, no --yes: nothing happens
    assert (d / "a.safetensors").exists()
    run("rm", "a", "--cache-dir", str(d), "--yes")
    assert not (d / "a.safetensors").exists() and not (d / "a.json").exists()

    monkeypatch.setattr(container, "VERSION", 1)
    codec.save(d / "old.safetensors", random_cache(1), runner.fingerprint)
    monkeypatch.undo()
    codec.save(d / "foreign.safetensors", random_cache(1), "0" * 32)
    (d / "x.safetensors.bad-20250101-000000-1").write_bytes(b"junk")
    (d / ".b.safetensors.tmp999999999").write_bytes(b"junk")
    monkeypatch.setattr(catalog, "installed_fingerprints", lambda home: {runner.fingerprint})
    out = run("gc", "--cache-dir", str(d), "--dry-run")
    assert "older cache format" in out and "model not installed" in out and "damaged" in out and "interrupted" in out
    assert "shared prefix block" not in out  # b still uses it
    run("gc", "--cache-dir", str(d), "--yes")
    left = sorted(x.name for x in d.iterdir() if x.is_file())
    assert left == ["b.safetensors", "c.json"]
    run("rm", "b", "--cache-dir", str(d), "--yes")
    assert "shared prefix block no agent uses" in run("gc", "--cache-dir", str(d), "--yes")
    assert list((d / "blocks").glob("*.safetensors")) == []


# -- the engine never waits behind a reload -------------------------------------


@pytest.fixture
def held_open(tmp_path):
    """Hold a write lease on a file: the kernel then blocks every open() of it
    (in any thread) until the lease is released, a real read that cannot start."""
    import fcntl
    import signal

    held = []
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease break is signalled to the holder

    def hold(path: Path):
        fd = os.open(path, os.O_WRONLY)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        held.append(fd)

        def opener_blocked() -> bool:  # a reader's open() is breaking the lease
            return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK

        def release() -> None:
            if fd in held:
                held.remove(fd)
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                os.close(fd)

        return opener_blocked, release

    yield hold
    for fd in held:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
    signal.signal(signal.SIGIO, previous)


def test_decode_is_not_delayed_by_a_reload_in_flight(tmp_path, byte_runner, held_open):
    from mlx_agentcache.scheduler import Scheduler, Turn

    runner = byte_runner
    n_big = 100_000  # 2 layers x 1 head x 64 dims: a 14 MB file
    pool = CachePool(tmp_path, runner.fingerprint, runner.new_cache, float("inf"), share_prefixes=False, warn=lambda m: None)
    big_cache = random_cache(3, layers=2, heads=1, n=n_big, dim=64)
    big_cache.tokens = tokens(n_big, seed=3, vocab=256)
    codec.save(pool.path("big"), big_cache, runner.fingerprint)
    assert pool.tier("big") == "warm" and pool.path("big").stat().st_size > 10 << 20
    turn(pool, runner, "idle", tokens(40, seed=8, vocab=256))  # a hot agent the engine can take at once
    sched = Scheduler(runner, pool, max_batch=4, prefill_chunk=64)
    opener_blocked, release = held_open(pool.path("big"))
    try:
        big = sched.submit(Turn("big", big_cache.tokens + [7], max_tokens=1))
        deadline = time.monotonic() + 20
        while not opener_blocked() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert opener_blocked() and big.status == "loading", "the loader is inside open() of the big file"

        # while the read is in flight: every pool operation the engine needs returns at once
        slowest = 0.0
        for op in (
            lambda: pool.tier("idle"),
            lambda: pool.hot_bytes,
            lambda: pool.summary(),
            lambda: pool.checkout("idle"),
            lambda: pool.begin_turn("idle", tokens(40, seed=8, vocab=256) + [9]),
            lambda: pool.checkin("idle", pool.hot["idle"]),
            lambda: pool.checkout("fresh"),
            lambda: pool.checkin("fresh", pool.begin_turn("fresh", tokens(3, vocab=256))[0]),
        ):
            t0 = time.perf_counter()
            op()
            slowest = max(slowest, time.perf_counter() - t0)
        # waiting on the held file would last until the kernel breaks the lease (lease-break-time, 45 s by
        # default): a bound far below that and far above a loaded machine's scheduling delays
        assert slowest < BLOCKED_S, f"a pool operation took {slowest:.3f} s while a read was in flight"

        # and whole turns run: admitted, prefilled, decoded step by step, checked in
        talker = sched.submit(Turn("talker", tokens(30, seed=11, vocab=256), max_tokens=6))
        talker.wait(30)
        assert talker.status == "done" and len(talker.tokens) == 6
        assert opener_blocked() and not big.done, "the big read was still blocked meanwhile"
        steps = [t1 - t0 for kind, who, t0, t1 in sched.timeline if kind == "decode" and "talker" in who]
        assert len(steps) == 5 and max(steps) < BLOCKED_S

        release()
        big.wait(60)
        assert big.stats.tier == "warm" and big.stats.restored_tokens == n_big
    finally:
        release()  # an open() still blocked would hold up close() until the kernel breaks the lease
        sched.close(cancel=True)
