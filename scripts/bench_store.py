"""The agent store at agent scale: bytes a turn writes, restore bandwidth, listing time.

* Bytes written per turn against context length: an agent of the 8B
  geometry's stored shapes (from the model's config: layers, KV heads, head
  dim; keys and values are seeded random, since bytes depend on shapes only)
  in the default KV mode takes short turns (the last 2 tokens cut, as a chat
  template's end of turn does, 18 prefilled, 4 decoded one by one), saved
  through the pool as segments; beside it, the bytes a whole-file save (the
  version 2 store) writes for the same cache after the same turn.
* Restore bandwidth: a fresh pool restores that agent (manifest and every
  segment) with the page cache dropped for its files (posix_fadvise), against
  a plain sequential read of the same files and a restore of the same cache
  saved as one version 2 file, alternating, after a warm-up.
* `agentcache agents ls` over 100, 1,000 and 10,000 agents (copies of one
  small agent's files): wall time of the whole command, process start
  included, and its CPU time; sizes alternate, after a warm-up run that
  builds the index.

Medians with min-max over the repeats. Writes store.json and store.md.

    python scripts/bench_store.py [--quick] [--out bench_results]
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
from mlx_agentcache.pool import CachePool
from mlx_agentcache.store import codec, history, segments
from mlx_agentcache.store.container import peek_meta
from mlx_agentcache.store.layout import Layout

GEOMETRY = "llama3-8b-geometry-random"
AGENTCACHE = str(Path(sys.executable).parent / "agentcache")


def spread(xs: list[float], nd: int = 4) -> dict:
    return {"median": round(statistics.median(xs), nd), "min": round(min(xs), nd), "max": round(max(xs), nd), "n": len(xs)}


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

    def restore() -> float:
        pool = CachePool(d, "f" * 32, agent.new_cache, float("inf"), share_prefixes=False)
        t = time.perf_counter()
        cache, tier = pool.checkout("a")
        mx.eval([x for layer in cache.layers for s in layer.segments for x in s.keys + (s.values or ())])
        assert tier == "warm"
        return time.perf_counter() - t

    whole = d / "whole.safetensors"  # the same cache as one version 2 file (bytes_per_turn's last save)

    def restore_whole() -> float:
        t = time.perf_counter()
        cache, _ = codec.load(whole, "f" * 32, agent.new_cache().layers)
        mx.eval([x for layer in cache.layers for s in layer.segments for x in s.keys + (s.values or ())])
        return time.perf_counter() - t

    cold = drop(files + [whole])
    restore(), read_all(), restore_whole()  # warm-up
    r, s, w = [], [], []
    for _ in range(repeats):  # alternating
        cold = drop(files) and cold
        r.append(total / restore() / 1e6)
        drop(files)
        s.append(total / read_all() / 1e6)
        drop([whole])
        w.append(whole.stat().st_size / restore_whole() / 1e6)
    return {"bytes": total, "files": len(files), "page_cache": "dropped" if cold else "not dropped",
            "restore_MBps": spread(r, 1), "sequential_read_MBps": spread(s, 1), "ratio": round(statistics.median(r) / statistics.median(s), 3),
            "one_file_restore_MBps": spread(w, 1)}


def ls_times(counts: list[int], repeats: int, work: Path) -> list[dict]:
    src = work / "one"
    agent = Agent(2, 1, 64)
    pool = CachePool(src, "f" * 32, agent.new_cache, float("inf"), share_prefixes=False, write_behind=False)
    cache = agent.new_cache()
    agent.append(cache, 300)
    pool.save("a0", cache)
    layout = Layout(src)
    history.write(layout.history_file("a0"), "a0", None, [{"role": "user", "content": "hi"}])
    man, hist, seg = layout.agent_file("a0"), layout.history_file("a0"), layout.segment_files("a0")[0]
    dirs = {}
    for n in counts:
        d = Layout(work / f"ls-{n}")
        d.dir.mkdir()
        for i in range(n):
            name = f"agent{i:05d}"
            shutil.copyfile(man, d.agent_file(name))
            shutil.copyfile(hist, d.history_file(name))
            d.segments_dir(name).mkdir(parents=True)
            os.link(seg, d.segment_file(name, seg.stem))
        old = time.time_ns() - 10**10  # as a directory last changed a while ago
        os.utime(d.dir, ns=(old, old))
        dirs[n] = d.dir

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


def report(r: dict) -> str:
    lines = ["# Agent store", "", f"CPU: {r['cpu']} ({r['cores']} cores, load average {r['load_average']} at the start). "
             f"Geometry {r['geometry']['layers']} of {r['geometry'].get('model_layers')} layers x {r['geometry']['kv_heads']} KV heads x {r['geometry']['head_dim']} dims, q4c."
             + (" Quick run: small sizes, numbers not comparable." if r["quick"] else ""), "",
             "## Bytes written per turn (2 tokens cut, 18 prefilled, 4 decoded)", "",
             "| context | ours MB (median, min-max) | whole-file save MB | stored MB | ours / stored | segments |", "|---|---|---|---|---|---|"]
    for x in r["bytes_per_turn"]:
        b, w, s, f = x["bytes_written"], x["whole_file_bytes"], x["stored_bytes"], x["share_of_stored"]
        lines.append(f"| {x['context']} | {b['median'] / 1e6:.3f} ({b['min'] / 1e6:.3f}-{b['max'] / 1e6:.3f}) | {w['median'] / 1e6:.1f} | "
                     f"{s['median'] / 1e6:.1f} | {f['median']:.2%} ({f['min']:.2%}-{f['max']:.2%}) | {x['segments']} |")
    rb = r["restore"]
    lines += ["", "## Restore bandwidth", "",
              f"{rb['bytes'] / 1e6:.1f} MB in {rb['files']} files, page cache {rb['page_cache']}: restore {rb['restore_MBps']['median']} MB/s "
              f"({rb['restore_MBps']['min']}-{rb['restore_MBps']['max']}), sequential read {rb['sequential_read_MBps']['median']} MB/s "
              f"({rb['sequential_read_MBps']['min']}-{rb['sequential_read_MBps']['max']}): ratio {rb['ratio']}."
              + (f" The same cache as one version 2 file restores at {rb['one_file_restore_MBps']['median']} MB/s "
                 f"({rb['one_file_restore_MBps']['min']}-{rb['one_file_restore_MBps']['max']})." if "one_file_restore_MBps" in rb else ""), "",
              "## `agentcache agents ls` (process start included)", "", "| agents | wall s (median, min-max) | CPU s (median) |", "|---|---|---|"]
    for x in r["ls"]:
        lines.append(f"| {x['agents']:,} | {x['wall_s']['median']} ({x['wall_s']['min']}-{x['wall_s']['max']}) | {x['cpu_s']['median']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, help="Of the geometry's layers, this many (bytes scale with it; shares do not).")
    a = ap.parse_args()
    contexts = [1024, 2048] if a.quick else [1024, 2048, 3584, 8192, 16384, 32768]
    counts = [100, 1000] if a.quick else [100, 1000, 10000]
    layers, heads, dim = geometry(default_home())
    full_layers = layers
    layers = 4 if a.quick else (a.layers or layers)  # bytes scale with the layer count, their shares do not
    started = time.time()
    r = {"quick": a.quick, "cpu": read_cpuinfo().model, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
         "geometry": {"model": GEOMETRY, "layers": layers, "model_layers": full_layers, "kv_heads": heads, "head_dim": dim}}
    default_home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=default_home(), prefix="bench-store-") as tmp:  # the disk agents live on
        work = Path(tmp)
        agent = Agent(layers, heads, dim)
        r["bytes_per_turn"] = bytes_per_turn(agent, contexts, 3 if a.quick else 5, work)
        r["restore"] = restore_bandwidth(agent, work / f"turns-{contexts[-1]}", 3 if a.quick else a.repeats)
        r["ls"] = ls_times(counts, 3 if a.quick else a.repeats, work)
    r["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    r["seconds"] = round(time.time() - started, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "store.json").write_text(json.dumps(r, indent=1) + "\n")
    (a.out / "store.md").write_text(report(r))
    print(report(r))


if __name__ == "__main__":
    main()
