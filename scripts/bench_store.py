"""The agent store at agent scale: bytes a turn writes, restore bandwidth, listing time.

* Bytes written per turn against context length: an agent of the 8B
  geometry's stored shapes (from the model's config: layers, KV heads, head
  dim; keys and values are seeded random, since bytes depend on shapes only)
  in the default KV mode takes short turns (the last 2 tokens cut, as a chat
  template's end of turn does, 18 prefilled, 4 decoded one by one), saved
  through the pool as segments; beside it, the bytes a whole-file save (the
  version 2 store) writes for the same cache after the same turn.
* Restore bandwidth: a running pool restores that agent (manifest and every
  segment) after evicting it, with the page cache dropped for its files
  (posix_fadvise), against a plain sequential read of the same files, the
  first restore after a restart (a new process: its memory is faulted in for
  the first time), a restore of the same cache saved as one version 2
  file, and a new process that only allocates the arrays such a restore
  fills, alternating (each repeat starts with the next one), after a warm-up.
* `agentcache agents ls` over 100, 1,000 and 10,000 agents (copies of one
  small agent's files): wall time of the whole command, process start
  included, and its CPU time; sizes alternate, after a warm-up run that
  builds the index.
* Shared prefixes (a real model, SmolLM2 135M, q4c; prompts are the test
  suite's Python reference text): bytes on disk (agent files, their
  segments, block files) of 6 agents with the same 1.5K-token system prompt
  and of N agents sharing a 2K prefix, each with its own 24-token question,
  against one agent alone; and the time to first token of a new agent whose
  prompt starts with a 4K-token prefix another agent shared (its block on
  disk, nothing in memory) against a warm restore of that agent with the
  same question, alternating in fresh pools after a warm-up, and of a new
  agent while the prefix is in memory.
* Time to first token of a returning agent with 10 and with 1,000 agents of
  4K tokens on disk: SmolLM2-135M (real weights) in the default KV mode; one
  agent's files (manifest and history copied, segments hard-linked) stand
  for every agent; one Runtime per directory; before each turn the agent is
  evicted and its files dropped from the page cache, so each turn restores
  from disk. The two directories alternate turn by turn, after a warm-up
  turn each; p50 and p95 over the turns.

Medians with min-max over the repeats. Writes store.json and store.md.

    python scripts/bench_store.py [--quick] [--out bench_results] [--parts turns,restore,ls,sharing,ttft]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx

from mlx_agentcache.blas import read_cpuinfo
from mlx_agentcache.config import default_home
from mlx_agentcache.kvcache import AgentCache, LayerCache
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.pool import CachePool
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.store import codec, history, segments
from mlx_agentcache.store.container import peek_meta
from mlx_agentcache.store.layout import Layout

GEOMETRY = "llama3-8b-geometry-random"
SHARING_MODEL = "smollm2-135m"
TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "python_reference.txt"
PARTS = ("turns", "restore", "ls", "sharing", "ttft")
AGENTCACHE = str(Path(sys.executable).parent / "agentcache")


def spread(xs: list[float], nd: int = 4) -> dict:
    return {"median": round(statistics.median(xs), nd), "min": round(min(xs), nd), "max": round(max(xs), nd), "n": len(xs)}


def p95(xs: list[float]) -> float:
    """The nearest-rank 95th percentile."""
    return sorted(xs)[-(-95 * len(xs) // 100) - 1]


def geometry(home: Path) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the 8B geometry, from its config."""
    cfg = json.loads((home / "models" / GEOMETRY / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads


class Agent:
    """Seeded random keys and values of one geometry appended as a model would."""

    def __init__(self, layers: int, heads: int, dim: int):
        self.shape = (layers, heads, dim)
        self.step = 0

    def new_cache(self) -> AgentCache:
        return AgentCache([LayerCache("q4c") for _ in range(self.shape[0])])

    def append(self, cache: AgentCache, n: int) -> None:
        layers, heads, dim = self.shape
        for i, layer in enumerate(cache.layers):
            k, v = mx.random.normal((2, heads, n, dim), key=mx.random.key(self.step * 1000 + i)).astype(mx.float16)
            layer.append_dense(k, v)
        self.step += 1
        cache.tokens += [1 + (self.step * 7 + j) % 30000 for j in range(n)]
        mx.eval([x for layer in cache.layers for s in layer.segments for x in s.keys + (s.values or ())])


def turn(agent: Agent, cache: AgentCache) -> None:
    cache.trim_to(cache.offset - 2)
    agent.append(cache, 18)
    for _ in range(4):
        agent.append(cache, 1)


def bytes_per_turn(agent: Agent, contexts: list[int], turns: int, work: Path) -> list[dict]:
    rows = []
    for n in contexts:
        d = work / f"turns-{n}"
        pool = CachePool(d, "f" * 32, agent.new_cache, float("inf"), share_prefixes=False, write_behind=False)
        cache = agent.new_cache()
        pool.checkout("a")
        agent.append(cache, n)
        pool.checkin("a", cache)
        ours, whole, stored = [], [], []
        for _ in range(turns):
            before = pool.stats.bytes_written
            turn(agent, cache)
            pool.checkout("a")
            pool.checkin("a", cache)
            ours.append(pool.stats.bytes_written - before)
            stored.append(segments.disk_bytes(pool.path("a")))
            whole.append(codec.save(d / "whole.safetensors", cache, "f" * 32))  # the version 2 store: one file per save
        rows.append({"context": n, "turns": turns, "bytes_written": spread(ours, 0), "whole_file_bytes": spread(whole, 0),
                     "stored_bytes": spread(stored, 0), "share_of_stored": spread([o / s for o, s in zip(ours, stored)]),
                     "segments": len(segments.referenced(peek_meta(pool.path("a"))))})
        print(f"context {n}: {rows[-1]['share_of_stored']}", flush=True)
        pool.close()
    return rows


def drop(paths: list[Path]) -> bool:
    ok = True
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            ok = False
        finally:
            os.close(fd)
    return ok


RESTART = """
import sys, time
from pathlib import Path
import mlx_agentcache
import mlx.core as mx
from mlx_agentcache.kvcache import AgentCache, LayerCache
from mlx_agentcache.pool import CachePool
d, layers = Path(sys.argv[1]), int(sys.argv[2])
mx.eval(mx.zeros(1))  # a restarted runtime has run MLX (its model) before it restores an agent
if sys.argv[3:4] == ["allocate"]:  # only what such a restore allocates: argv[4] bytes as fresh arrays of READ_BATCH bytes
    from mlx_agentcache.store.container import READ_BATCH
    t = time.perf_counter()
    arrays = [mx.zeros((READ_BATCH,), mx.uint8) for _ in range(-(-int(sys.argv[4]) // READ_BATCH))]
    mx.eval(arrays)
    print(time.perf_counter() - t)
    sys.exit()
pool = CachePool(d, "f" * 32, lambda: AgentCache([LayerCache("q4c") for _ in range(layers)]), float("inf"), share_prefixes=False)
t = time.perf_counter()
cache, tier = pool.checkout("a")
mx.eval([x for layer in cache.layers for s in layer.segments for x in s.keys + (s.values or ())])
assert tier == "warm"
print(time.perf_counter() - t)
"""


def restore_bandwidth(agent: Agent, d: Path, repeats: int) -> dict:
    layout = Layout(d)
    files = [layout.agent_file("a")] + layout.segment_files("a")
    total = sum(p.stat().st_size for p in files)
    buf = bytearray(4 << 20)

    def read_all() -> float:
        t = time.perf_counter()
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        return time.perf_counter() - t

    def timed_checkout(pool: CachePool) -> tuple[float, AgentCache]:
        t = time.perf_counter()
        cache, tier = pool.checkout("a")
        mx.eval([x for layer in cache.layers for s in layer.segments for x in s.keys + (s.values or ())])
        assert tier == "warm"
        return time.perf_counter() - t, cache

    def restart(*allocate: str) -> float:
        """The first restore after a restart: a new process, whose memory has never been touched;
        with "allocate", only the fresh arrays such a restore fills (its bound on this machine)."""
        out = subprocess.run([sys.executable, "-c", RESTART, str(d), str(agent.shape[0]), *allocate], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    def allocate() -> float:
        return restart("allocate", str(total))

    running = CachePool(d, "f" * 32, agent.new_cache, None, share_prefixes=False)  # the default budget, as the product runs

    def restore_running() -> float:
        """A running pool restoring the agent it evicted before (its buffers freed, as a busy pool frees them)."""
        dt, cache = timed_checkout(running)
        running.checkin("a", cache)
        running.evict("a")
        return dt

    whole = d / "whole.safetensors"  # the same cache as one version 2 file (bytes_per_turn's last save)

    def restore_whole() -> float:
        t = time.perf_counter()
        cache, _ = codec.load(whole, "f" * 32, agent.new_cache().layers)
        mx.eval([x for layer in cache.layers for s in layer.segments for x in s.keys + (s.values or ())])
        return time.perf_counter() - t

    load = [round(x, 2) for x in os.getloadavg()]
    cold = drop(files + [whole])
    restart(), restore_running(), read_all(), restore_whole(), allocate()  # warm-up
    r, p, s, w, a = [], [], [], [], []
    engines = [(r, restart, files, total), (p, restore_running, files, total), (s, read_all, files, total),
               (w, restore_whole, [whole], whole.stat().st_size), (a, allocate, [], total)]
    for i in range(repeats):  # alternating, each repeat starting one engine later: none always follows the same one
        for out, run, paths, size in engines[i % len(engines):] + engines[: i % len(engines)]:
            cold = drop(paths) and cold
            out.append(size / run() / 1e6)
    running.close()
    p_ratio, r_ratio = [a / b for a, b in zip(p, s)], [a / b for a, b in zip(r, s)]  # each against the read of its own repeat
    return {"bytes": total, "files": len(files), "page_cache": "dropped" if cold else "not dropped", "repeats": repeats, "load_average": load,
            "sequential_read_MBps": spread(s, 1),
            "running_pool_restore_MBps": spread(p, 1), "running_pool_ratio": round(statistics.median(p_ratio), 3), "running_pool_ratios": spread(p_ratio, 3),
            "restart_restore_MBps": spread(r, 1), "restart_ratio": round(statistics.median(r_ratio), 3), "restart_ratios": spread(r_ratio, 3),
            "one_file_restore_MBps": spread(w, 1),
            "new_process_allocate_MBps": spread(a, 1), "allocate_ratio": round(statistics.median([x / y for x, y in zip(a, s)]), 3),
            "samples_MBps": {"sequential_read": [round(x, 1) for x in s], "running_pool": [round(x, 1) for x in p],
                             "restart": [round(x, 1) for x in r], "one_file": [round(x, 1) for x in w],
                             "new_process_allocate": [round(x, 1) for x in a]}}


def populate(src: Layout, name: str, d: Path, n: int) -> None:
    """`n` agents in `d` with one agent's files: the manifest and history copied (saves replace
    them), the segments hard-linked (never changed once written)."""
    dst = Layout(d)
    dst.dir.mkdir()
    for i in range(n):
        other = f"agent{i:05d}"
        shutil.copyfile(src.agent_file(name), dst.agent_file(other))
        shutil.copyfile(src.history_file(name), dst.history_file(other))
        dst.segments_dir(other).mkdir(parents=True)
        for seg in src.segment_files(name):
            os.link(seg, dst.segment_file(other, seg.stem))
    old = time.time_ns() - 10**10  # as a directory last changed a while ago
    os.utime(dst.dir, ns=(old, old))


def ls_times(counts: list[int], repeats: int, work: Path) -> list[dict]:
    src = work / "one"
    agent = Agent(2, 1, 64)
    pool = CachePool(src, "f" * 32, agent.new_cache, float("inf"), share_prefixes=False, write_behind=False)
    cache = agent.new_cache()
    agent.append(cache, 300)
    pool.save("a0", cache)
    layout = Layout(src)
    history.write(layout.history_file("a0"), "a0", None, [{"role": "user", "content": "hi"}])
    dirs = {}
    for n in counts:
        dirs[n] = work / f"ls-{n}"
        populate(layout, "a0", dirs[n], n)

    def run(n: int) -> tuple[float, float]:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run([AGENTCACHE, "agents", "ls", "--cache-dir", str(dirs[n])], capture_output=True, text=True)
        wall = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert p.returncode == 0 and p.stdout.count("\n") == n + 1, p.stderr
        return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

    for n in counts:
        run(n)  # warm-up: builds the index
    got = {n: ([], []) for n in counts}
    for _ in range(repeats):
        for n in counts:  # sizes alternate
            w, c = run(n)
            got[n][0].append(w)
            got[n][1].append(c)
    return [{"agents": n, "wall_s": spread(got[n][0], 3), "cpu_s": spread(got[n][1], 3)} for n in counts]


def stored(pool: CachePool, names: list[str]) -> int:
    """Bytes on disk of these agents (manifests and segments) and of every prefix block."""
    return sum(segments.disk_bytes(pool.path(n)) for n in names) + sum(b.stat().st_size for b in pool.layout.block_files())


def first_token(pool: CachePool, runner: ModelRunner, name: str, prompt: list[int], keep: bool = True) -> tuple[float, int]:
    """(seconds to the first token, tokens reused) of one turn of `name`; checked in (saved) if `keep`."""
    t = time.perf_counter()
    cache, tier = pool.checkout(name)
    cache, reused = pool.begin_turn(name, prompt)
    mx.eval(mx.argmax(runner.prefill(prompt[reused:], cache)))
    took = time.perf_counter() - t
    if keep:
        pool.checkin(name, cache)
        pool.flush()
    return took, reused


def sharing(home: Path, work: Path, quick: bool, repeats: int) -> dict:
    started, load = time.time(), [round(x, 2) for x in os.getloadavg()]
    runner = ModelRunner.load(SHARING_MODEL, home, "q4c")
    ids = runner.tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    system, prefix, long = (512, 512, 512) if quick else (1536, 2048, 4096)
    counts = [1, 2, 4] if quick else [1, 2, 4, 8, 16]
    question = lambda i: ids[20000 + 24 * i : 20000 + 24 * (i + 1)]  # noqa: E731  (own tokens of agent i)

    def pool(d: Path, share: bool = True) -> CachePool:
        return CachePool(d, runner.fingerprint, runner.new_cache, float("inf"), share_prefixes=share)

    def agents_on_disk(n_prefix: int, n_agents: int, tag: str) -> tuple[list[int], int]:
        """Bytes on disk after each of `n_agents` agents took a turn with the same prefix; one agent alone."""
        alone = pool(work / f"{tag}-alone", share=False)
        first_token(alone, runner, "a0", ids[:n_prefix] + question(0))
        one = stored(alone, ["a0"])
        p, got = pool(work / tag), []
        for i in range(n_agents):
            _, reused = first_token(p, runner, f"a{i}", ids[:n_prefix] + question(i))
            assert reused == (n_prefix if i else 0), (i, reused)
            got.append(stored(p, [f"a{j}" for j in range(i + 1)]))
        return got, one

    got, one = agents_on_disk(system, 6, "system")
    out = {"model": SHARING_MODEL, "question_tokens": 24, "load_average": load,
           "six_agents": {"system_tokens": system, "one_agent_bytes": one, "bytes": got[-1], "vs_one_agent": round(got[-1] / one, 3)}}
    got, one = agents_on_disk(prefix, counts[-1], "prefix")
    out["n_agents"] = {"prefix_tokens": prefix, "one_agent_bytes": one,
                       "rows": [{"agents": n, "bytes": got[n - 1], "unshared_bytes": n * one, "vs_one_agent": round(got[n - 1] / one, 3)} for n in counts]}

    d = work / "ttft"
    setup = pool(d)
    for name in ("x", "y"):  # y's turn makes x's leading blocks a shared block
        first_token(setup, runner, name, ids[:long] + question(1 if name == "x" else 2))
    assert setup.describe("x")["shared_prefix"]["tokens"] == long
    setup.close()
    ask = ids[:long] + question(1) + question(3)

    def new_agent(i: int) -> tuple[float, float]:
        p = pool(d)
        took, reused = first_token(p, runner, f"new{i}", ids[:long] + question(3), keep=False)
        hot, _ = first_token(p, runner, f"hot{i}", ids[:long] + question(4), keep=False)  # the prefix is in memory now
        assert reused == long
        p.close()
        return took, hot

    def restore() -> float:
        p = pool(d)
        took, reused = first_token(p, runner, "x", ask, keep=False)
        assert reused == long + 24
        p.close()
        return took

    new_agent(-1), restore()  # warm-up
    fresh, hot, warm = [], [], []
    for i in range(repeats):  # alternating
        a, b = new_agent(i)
        fresh.append(a)
        hot.append(b)
        warm.append(restore())
    out["ttft"] = {"prefix_tokens": long, "question_tokens": 24, "new_agent_s": spread(fresh), "new_agent_prefix_in_memory_s": spread(hot),
                   "warm_restore_s": spread(warm), "new_vs_restore": round(statistics.median(fresh) / statistics.median(warm), 3), "page_cache": "warm"}
    out["load_average_end"], out["seconds"] = [round(x, 2) for x in os.getloadavg()], round(time.time() - started, 1)
    print(f"sharing: {out['six_agents']['vs_one_agent']}x for 6 agents, new agent / restore {out['ttft']['new_vs_restore']}", flush=True)
    return out


def sharing_report(sh: dict) -> list[str]:
    six, n, t = sh["six_agents"], sh["n_agents"], sh["ttft"]
    lines = ["", f"## Shared prefixes ({sh['model']}, q4c)", "", f"Load average {sh['load_average']} at the start, {sh['load_average_end']} at the end.", "",
             f"6 agents with the same {six['system_tokens']}-token system prompt and their own {sh['question_tokens']}-token questions store "
             f"{six['bytes'] / 1e6:.2f} MB, {six['vs_one_agent']}x one agent's {six['one_agent_bytes'] / 1e6:.2f} MB (goal <= 1.5x).", "",
             f"N agents sharing a {n['prefix_tokens']}-token prefix:", "", "| agents | MB on disk | unshared MB | vs one agent |", "|---|---|---|---|"]
    lines += [f"| {x['agents']} | {x['bytes'] / 1e6:.2f} | {x['unshared_bytes'] / 1e6:.2f} | {x['vs_one_agent']}x |" for x in n["rows"]]
    f, w, h = t["new_agent_s"], t["warm_restore_s"], t["new_agent_prefix_in_memory_s"]
    lines += ["", f"Time to first token with a {t['prefix_tokens']}-token shared prefix and a {t['question_tokens']}-token question "
              f"(median, min-max, {f['n']} alternating repeats): a new agent reading the block from disk {f['median'] * 1e3:.0f} ms "
              f"({f['min'] * 1e3:.0f}-{f['max'] * 1e3:.0f}), a warm restore of the agent that holds it {w['median'] * 1e3:.0f} ms "
              f"({w['min'] * 1e3:.0f}-{w['max'] * 1e3:.0f}): {t['new_vs_restore']}x (goal <= 1.2x). With the prefix in memory a new agent "
              f"takes {h['median'] * 1e3:.0f} ms ({h['min'] * 1e3:.0f}-{h['max'] * 1e3:.0f})."]
    return lines


def returning_ttft(counts: list[int], context: int, turns: int, work: Path) -> dict:
    """TTFT of agent00000 returning to a directory of n agents, each turn restored from disk."""
    runner = ModelRunner.load(SHARING_MODEL, default_home())
    system = runner.tokenizer.decode(runner.tokenizer.encode(TEXT.read_text()[: 8 * context])[:context])
    src = work / "ttft-one"
    rt = Runtime(cache_dir=src, runner=runner, max_tokens=2, budget_bytes=float("inf"))
    first = rt.agent("agent00000", system=system).chat("Name one function.")
    rt.close()
    runtimes = {}
    for n in counts:
        populate(Layout(src), "agent00000", work / f"ttft-{n}", n)
        runtimes[n] = Runtime(cache_dir=work / f"ttft-{n}", runner=runner, max_tokens=1, budget_bytes=float("inf"))

    def turn(n: int, k: int) -> float:
        rt = runtimes[n]
        rt.evict("agent00000")
        layout = Layout(rt.cache_dir)
        drop([layout.agent_file("agent00000"), layout.history_file("agent00000")] + layout.segment_files("agent00000"))
        reply = rt.agent("agent00000").chat(f"Turn {k}: one word?")
        assert reply.stats.tier == "warm", reply.stats.tier
        return reply.stats.ttft_ms

    got = {n: [] for n in counts}
    for n in counts:
        turn(n, 0)  # warm-up
    for k in range(turns):
        for n in counts:  # alternating
            got[n].append(turn(n, k + 1))
    for rt in runtimes.values():
        rt.close()
    rows = [{"agents": n, "ttft_ms": spread(got[n], 1), "p50_ms": round(statistics.median(got[n]), 1), "p95_ms": round(p95(got[n]), 1),
             "samples_ms": [round(x, 1) for x in got[n]]} for n in counts]
    return {"model": SHARING_MODEL, "context_tokens": first.stats.cache_tokens, "turns": turns, "agents": rows,
            "p95_ratio": round(rows[-1]["p95_ms"] / rows[0]["p95_ms"], 3)}


def report(r: dict) -> str:
    lines = ["# Agent store", "", f"CPU: {r['cpu']} ({r['cores']} cores, load average {r['load_average']} at the start). "
             f"Geometry {r['geometry']['layers']} of {r['geometry'].get('model_layers')} layers x {r['geometry']['kv_heads']} KV heads x {r['geometry']['head_dim']} dims, q4c."
             + (" Quick run: small sizes, numbers not comparable." if r["quick"] else ""), "",
             *([("Commands: " + "; ".join(f"{p}: `{c}`" for p, c in r["commands"].items())), ""] if r.get("commands") else []),
             "## Bytes written per turn (2 tokens cut, 18 prefilled, 4 decoded)", "",
             "| context | ours MB (median, min-max) | whole-file save MB | stored MB | ours / stored | segments |", "|---|---|---|---|---|---|"]
    for x in r["bytes_per_turn"]:
        b, w, s, f = x["bytes_written"], x["whole_file_bytes"], x["stored_bytes"], x["share_of_stored"]
        lines.append(f"| {x['context']} | {b['median'] / 1e6:.3f} ({b['min'] / 1e6:.3f}-{b['max'] / 1e6:.3f}) | {w['median'] / 1e6:.1f} | "
                     f"{s['median'] / 1e6:.1f} | {f['median']:.2%} ({f['min']:.2%}-{f['max']:.2%}) | {x['segments']} |")
    rb = r["restore"]

    def mbps(key: str) -> str:
        x = rb[key]
        return f"{x['median']} MB/s ({x['min']}-{x['max']})"

    lines += ["", "## Restore bandwidth", "",
              f"{rb['bytes'] / 1e6:.1f} MB in {rb['files']} files, page cache {rb['page_cache']}, {rb['repeats']} alternating repeats, "
              f"load average {rb['load_average']} at the start. "
              f"Sequential read of the files: {mbps('sequential_read_MBps')}. A running pool restoring the agent it evicted: "
              f"{mbps('running_pool_restore_MBps')}, ratio {rb['running_pool_ratio']} ({rb['running_pool_ratios']['min']}-{rb['running_pool_ratios']['max']}). "
              f"The first restore after a restart (a new process): {mbps('restart_restore_MBps')}, ratio {rb['restart_ratio']} "
              f"({rb['restart_ratios']['min']}-{rb['restart_ratios']['max']}). Ratios are each repeat's restore over the same repeat's read, median "
              f"(min-max). The same cache as one version 2 file, in the running process: "
              f"{mbps('one_file_restore_MBps')}. A new process only allocating the arrays such a restore fills "
              f"(zero-filled, as MLX allocates): {mbps('new_process_allocate_MBps')}, ratio {rb['allocate_ratio']} to the read.", "",
              "## `agentcache agents ls` (process start included)", "", "| agents | wall s (median, min-max) | CPU s (median) |", "|---|---|---|"]
    for x in r["ls"]:
        lines.append(f"| {x['agents']:,} | {x['wall_s']['median']} ({x['wall_s']['min']}-{x['wall_s']['max']}) | {x['cpu_s']['median']} |")
    if "sharing" in r:
        lines += sharing_report(r["sharing"])
    if "returning_ttft" in r:
        t = r["returning_ttft"]
        lines += ["", "## TTFT of a returning agent, page cache dropped before each turn", "",
                  f"{t['model']}, {t['context_tokens']:,} tokens of context, {t['turns']} turns per directory (alternating, after a warm-up).", "",
                  "| agents on disk | p50 ms | p95 ms | min-max ms |", "|---|---|---|---|"]
        for x in t["agents"]:
            lines.append(f"| {x['agents']:,} | {x['p50_ms']} | {x['p95_ms']} | {x['ttft_ms']['min']}-{x['ttft_ms']['max']} |")
        lines += ["", f"p95 with {t['agents'][-1]['agents']:,} agents / p95 with {t['agents'][0]['agents']:,}: {t['p95_ratio']} (goal <= 1.2)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, help="Of the geometry's layers, this many (bytes scale with it; shares do not).")
    ap.add_argument("--parts", default=",".join(PARTS), help="what to measure; the others are kept from --out's store.json")
    a = ap.parse_args()
    parts = a.parts.split(",")
    if not set(parts) <= set(PARTS) or ("restore" in parts and "turns" not in parts):
        raise SystemExit(f"--parts takes {', '.join(PARTS)} (restore reads what turns wrote)")
    contexts = [1024, 2048] if a.quick else [1024, 2048, 3584, 8192, 16384, 32768]
    counts = [100, 1000] if a.quick else [100, 1000, 10000]
    layers, heads, dim = geometry(default_home())
    full_layers = layers
    layers = 4 if a.quick else (a.layers or layers)  # bytes scale with the layer count, their shares do not
    started = time.time()
    merge = set(parts) != set(PARTS)
    old = json.loads((a.out / "store.json").read_text()) if merge and (a.out / "store.json").exists() else None
    if merge and (old is None or old.get("quick") != a.quick):
        raise SystemExit(f"--parts updates the store.json in {a.out} of a run like this one (--quick or not); there is none")
    r = old or {"quick": a.quick, "cpu": read_cpuinfo().model, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                "geometry": {"model": GEOMETRY, "layers": layers, "model_layers": full_layers, "kv_heads": heads, "head_dim": dim}}
    command = " ".join(["python", "scripts/bench_store.py", *sys.argv[1:]])
    r.setdefault("commands", {}).update({p: command for p in parts})  # what measured each part
    default_home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=default_home(), prefix="bench-store-") as tmp:  # the disk agents live on
        work = Path(tmp)
        agent = Agent(layers, heads, dim)
        if "turns" in parts:
            r["bytes_per_turn"] = bytes_per_turn(agent, contexts, 3 if a.quick else 5, work)
        if "restore" in parts:
            r["restore"] = restore_bandwidth(agent, work / f"turns-{contexts[-1]}", 3 if a.quick else a.repeats)
            r.pop("restore_hugepages", None)  # earlier runs measured glibc's huge pages in a child; no gain stood up
        if "ls" in parts:
            r["ls"] = ls_times(counts, 3 if a.quick else a.repeats, work)
        if "sharing" in parts:
            r["sharing"] = sharing(default_home(), work, a.quick, 3 if a.quick else a.repeats)
        if "ttft" in parts:
            r["returning_ttft"] = returning_ttft([10, 100] if a.quick else [10, 1000], 512 if a.quick else 4096, 3 if a.quick else 20, work)
    if not merge:
        r["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        r["seconds"] = round(time.time() - started, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "store.json").write_text(json.dumps(r, indent=1) + "\n")
    (a.out / "store.md").write_text(report(r))
    print(report(r))


if __name__ == "__main__":
    main()
