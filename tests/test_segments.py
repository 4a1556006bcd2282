"""Agent caches as segments and a manifest (store/segments.py): a turn appends
what it changed, restores are exact, old segments are collected and counted,
and damaged or missing segments refuse only their agent's cache."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import pytest

from mlx_agentcache import catalog
from mlx_agentcache.pool import CachePool
from mlx_agentcache.store import container, index, segments
from mlx_agentcache.store.layout import Layout
from tiny import random_cache, same_tensors, tiny_runner, tokens

TESTS = Path(__file__).parent


def pool(d, runner, **kw) -> CachePool:
    kw.setdefault("warn", pytest.fail)
    return CachePool(d, runner.fingerprint, runner.new_cache, budget_bytes=float("inf"), share_prefixes=False, **kw)


def turn(p: CachePool, runner, name: str, prompt: list[int]) -> int:
    """One turn and its save; returns the bytes it wrote."""
    before = p.stats.bytes_written
    p.checkout(name)
    cache, reuse = p.begin_turn(name, prompt)
    runner.prefill(prompt[reuse:], cache, logits=False)
    p.checkin(name, cache)
    assert p.flush() == {}
    return p.stats.bytes_written - before


def stored(p: CachePool, name: str) -> int:
    return segments.disk_bytes(p.path(name))


@pytest.mark.parametrize("mode", ["q4c", "q4", "fp16"])
def test_turns_append_their_tokens_and_restore_exactly(tmp_path, mode):
    """Short turns that cut the last tokens (as a chat template's end of turn does) and add
    new ones, across q4c key groups: each writes a small share of the stored bytes, and
    after every turn a fresh process view restores exactly the hot cache."""
    runner = tiny_runner(kv_bits=mode)
    p = pool(tmp_path, runner)
    prompt = tokens(700)
    first = turn(p, runner, "a", prompt)
    assert first >= stored(p, "a")
    shares = []
    for t in range(12):
        prompt = p.hot["a"].tokens[:-2] + tokens(22, seed=10 + t)
        shares.append(turn(p, runner, "a", prompt) / stored(p, "a"))
        back, tier = pool(tmp_path, runner).checkout("a")
        assert tier == "warm" and same_tensors(back, p.hot["a"])
    # the median turn (a whole-file save wrote 1.0; here the manifest and its token ids weigh most)
    assert sorted(shares)[len(shares) // 2] < 0.15, shares
    assert max(shares) < 0.6, shares  # a merge of segments rewrites part, never everything
    layout = Layout(tmp_path)
    named = segments.referenced(container.peek_meta(p.path("a")))
    assert {layout.segment_id(s) for s in layout.segment_files("a")} == named  # nothing left behind
    assert len(named) <= 6 and p.stats.bytes_collected > 0
    assert catalog.describe(tmp_path, "a", verify=True)["status"] == "ok"


def test_a_rewritten_history_cuts_the_segments(tmp_path):
    runner = tiny_runner(kv_bits="q4c")
    p = pool(tmp_path, runner)
    turn(p, runner, "a", tokens(600))
    turn(p, runner, "a", tokens(600) + tokens(30, seed=4))
    turn(p, runner, "a", tokens(200) + tokens(100, seed=5))  # cut inside the first segment's q4c body
    back, _ = pool(tmp_path, runner).checkout("a")
    assert same_tensors(back, p.hot["a"]) and back.tokens == tokens(200) + tokens(100, seed=5)


def test_a_save_by_another_process_is_not_appended_to(tmp_path):
    """Two pools (processes) on one directory: each save continues the manifest it knows
    only if that is still the one on disk; otherwise it writes the whole cache."""
    runner = tiny_runner(kv_bits="q4c")
    p1, p2 = pool(tmp_path, runner), pool(tmp_path, runner)
    turn(p1, runner, "a", tokens(400))
    turn(p2, runner, "a", tokens(400) + tokens(50, seed=2))
    written = turn(p1, runner, "a", tokens(400) + tokens(20, seed=3))
    assert written >= stored(p1, "a")
    back, _ = pool(tmp_path, runner).checkout("a")
    assert same_tensors(back, p1.hot["a"])


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign"])
def test_a_bad_segment_refuses_only_its_agent(tmp_path, damage):
    runner = tiny_runner(kv_bits="q4c")
    p = pool(tmp_path, runner)
    for name, seed in (("a", 1), ("b", 2)):
        turn(p, runner, name, tokens(300, seed=seed))
        turn(p, runner, name, tokens(300, seed=seed) + tokens(10, seed=9))
    layout = Layout(tmp_path)
    seg = layout.segment_files("a")[0]
    if damage == "missing":
        seg.unlink()
    elif damage == "truncated":
        seg.write_bytes(seg.read_bytes()[:-100])
    else:  # another agent's segment under this one's name
        seg.write_bytes(layout.segment_files("b")[0].read_bytes())
    warnings = []
    q = pool(tmp_path, runner, warn=warnings.append)
    cache, tier = q.checkout("a")
    assert tier == "cold" and cache.offset == 0
    assert len(warnings) == 1 and "agent 'a' not used" in warnings[0] and seg.name in warnings[0], warnings
    assert q.checkout("b")[1] == "warm" and len(warnings) == 1


def test_rows_no_piece_uses_are_still_checksummed(tmp_path):
    """A turn that cuts tokens leaves rows of an older segment that no piece names: a restore
    reads them aside, and a flipped bit there refuses the cache, naming that segment."""
    import json

    runner = tiny_runner(kv_bits="q4c")
    p = pool(tmp_path, runner)
    turn(p, runner, "a", tokens(300))
    turn(p, runner, "a", p.hot["a"].tokens[:-2] + tokens(10, seed=3))
    layout, meta = Layout(tmp_path), container.peek_meta(p.path("a"))
    segs = json.loads(meta["segments"])
    g, r, *_ = next(x for x in json.loads(meta["pieces"])[0] if x[5] < json.loads(container.peek_meta(
        layout.segment_file("a", segs[x[0]]))["runs"])[0][x[1]][2])  # a piece that ends before its run
    seg = layout.segment_file("a", segs[g])
    header, _, start = container.read_header(seg, (segments.SEGMENT_FORMAT,))
    last = start + header[f"layers.0.{r}.k.0" if r else "layers.0.k.0"]["data_offsets"][1] - 1  # the last head's last row
    data = bytearray(seg.read_bytes())
    data[last] ^= 0x10
    seg.write_bytes(bytes(data))
    warnings = []
    cache, tier = pool(tmp_path, runner, warn=warnings.append).checkout("a")
    assert tier == "cold" and len(warnings) == 1 and f"{seg.name}: checksum mismatch" in warnings[0], warnings


def test_gc_collects_segments_of_interrupted_saves_and_removed_agents(tmp_path):
    runner = tiny_runner(kv_bits="q4c")
    p = pool(tmp_path, runner)
    turn(p, runner, "a", tokens(300))
    turn(p, runner, "b", tokens(300, seed=2))
    layout = Layout(tmp_path)
    orphan = layout.segment_file("a", "0123456789abcdef")  # a save killed before its manifest
    orphan.write_bytes(layout.segment_files("a")[0].read_bytes())
    p.path("b").unlink()  # a manifest gone: its segments are no one's
    plan = catalog.gc_plan(tmp_path, set())
    segs = {q for q, why in plan if why == "segment no manifest names"}
    assert segs == {orphan} | set(layout.segment_files("b"))
    freed = catalog.gc_apply(tmp_path, plan)
    assert freed >= orphan.stat().st_size if orphan.exists() else freed > 0
    assert not orphan.exists() and not layout.segment_files("b")
    back, tier = pool(tmp_path, runner).checkout("a")
    assert tier == "warm" and same_tensors(back, p.hot["a"])


def test_a_killed_saves_segment_is_removed_by_the_agents_next_save_not_by_every_pool_start(tmp_path):
    runner = tiny_runner(kv_bits="q4c")
    turn(pool(tmp_path, runner), runner, "a", tokens(300))
    left = Layout(tmp_path).segments_dir("a") / ".0123456789abcdef.safetensors.tmp999999999"  # no such process
    left.write_bytes(b"half a segment")
    p = pool(tmp_path, runner)
    assert left.exists()  # a pool's start reads no agent's segments folder
    assert [why for q, why in catalog.gc_plan(tmp_path, set()) if q == left] == ["temporary file of an interrupted save"]
    turn(p, runner, "a", tokens(300) + tokens(10, seed=5))
    assert not left.exists()


def test_rm_removes_the_segments(tmp_path):
    runner = tiny_runner(kv_bits="q4c")
    p = pool(tmp_path, runner)
    turn(p, runner, "a", tokens(300))
    assert Layout(tmp_path).segment_files("a")
    removed = catalog.remove(tmp_path, "a")
    assert p.path("a") in removed and not Layout(tmp_path).segment_files("a")


# -- kills during an append and during gc --------------------------------------

CHILD = """
import sys
sys.path.insert(0, {tests!r})
from crashstates import advance, new_cache
from mlx_agentcache.pool import CachePool
p = CachePool({d!r}, "f" * 32, new_cache, float("inf"), warn=lambda m: None, share_prefixes=False, write_behind=False)
cache, tier = p.checkout("a")
k = {start}
while True:
    advance(cache, k)
    p.save("a", cache)
    print(k, flush=True)
    k += 1
"""

GC_CHILD = """
from mlx_agentcache import catalog
while True:
    catalog.gc_apply({d!r}, catalog.gc_plan({d!r}, set()))
    print(1, flush=True)
"""


def test_sigkill_during_appends_and_gc_leaves_the_last_complete_turn(tmp_path):
    """A real process appends turns (each a known state) and is killed at random points,
    every other time while another process runs gc; the cache always loads as the last
    finished turn or the one whose manifest was being renamed, byte for byte."""
    from crashstates import new_cache, replayed, state_tokens

    rng = random.Random(7)
    k, kills, with_gc, mid = 0, 0, 0, 0
    t_end = time.monotonic() + 60
    while kills < 16 and time.monotonic() < t_end:
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), d=str(tmp_path), start=k)], stdout=subprocess.PIPE, text=True)
        gc = None
        if kills % 2:
            gc = subprocess.Popen([sys.executable, "-c", GC_CHILD.format(d=str(tmp_path))], stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()
        assert first.strip(), "child died before its first save"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        if gc is not None:
            os.kill(gc.pid, signal.SIGKILL)
            with_gc += bool(gc.stdout.read().strip())
            gc.wait()
        out = first + child.stdout.read()
        child.wait()
        kills += 1
        mid += any(q.name.startswith(".") for q in (tmp_path / "segments" / "a").iterdir())
        last = max(int(x) for x in out.split())
        p = CachePool(tmp_path, "f" * 32, new_cache, float("inf"), warn=pytest.fail, share_prefixes=False)
        cache, tier = p.checkout("a")
        got = next((j for j in (last, last + 1) if cache.tokens == state_tokens(j)), None)
        assert tier == "warm" and got is not None, (last, cache.offset)
        assert same_tensors(cache, replayed(got))
        k = got + 1
    print(f"{kills} kills, {with_gc} with gc running, {mid} inside a segment write")
    assert kills >= 10 and with_gc >= 4


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from crashstates import advance, new_cache
from mlx_agentcache.pool import CachePool
p = CachePool({d!r}, "f" * 32, new_cache, float("inf"), warn=lambda m: None, share_prefixes=False, write_behind=False)
cache = new_cache()
for k in range({start}, {start} + 12):
    advance(cache, k)
    p.save("a", cache)
    print(k, flush=True)
"""

OTHERS = """
import os
from mlx_agentcache import catalog
from mlx_agentcache.store import index
n = 0
while not os.path.exists({stop!r}) or n < 3:
    n += 1
    if {rm}:
        catalog.remove({d!r}, "a")
    else:
        index.listing({d!r}, warn=lambda m: None)
"""


def test_concurrent_writers_rm_and_listings_never_corrupt_the_store(tmp_path):
    """Two processes saving one agent, one removing it and one listing, all at once: after
    them the agent restores as one of the states written, byte for byte (or is gone), gc
    finds only what an interrupted save can leave, and the index says what the files say."""
    from crashstates import new_cache, replayed, state_tokens

    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(TESTS), d=str(tmp_path), start=s)], stdout=subprocess.PIPE, text=True)
             for s in (0, 20)]
    stop = tmp_path.parent / f"{tmp_path.name}-stop"
    procs += [subprocess.Popen([sys.executable, "-c", OTHERS.format(d=str(tmp_path), rm=rm, stop=str(stop))]) for rm in (True, False)]
    written = set()
    for p in procs[:2]:
        written |= {int(x) for x in p.communicate(timeout=300)[0].split()}
    stop.touch()  # the writers are done: the others finish their round
    for p in procs[2:]:
        assert p.wait(timeout=300) == 0
    assert len(written) == 24
    path = Layout(tmp_path).agent_file("a")
    if path.exists():
        cache, tier = CachePool(tmp_path, "f" * 32, new_cache, float("inf"), warn=pytest.fail, share_prefixes=False).checkout("a")
        k = next(j for j in written if state_tokens(j) == cache.tokens)
        assert tier == "warm" and same_tensors(cache, replayed(k))
    assert all(why == "segment no manifest names" for _, why in catalog.gc_plan(tmp_path, set()))
    assert index.listing(tmp_path) == [catalog.describe(tmp_path, n) for n in Layout(tmp_path).names()]
