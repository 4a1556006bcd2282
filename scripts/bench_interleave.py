"""Do reloads from disk hide behind other agents' decoding? And what does batching buy?

    python scripts/bench_interleave.py [--runs llama3-8b-geometry-random:4096,smollm2-135m:1024]
        [--agents 10] [--fit 3] [--repeats 5] [--max-tokens 4] [--batch-sizes 1,2,4,8] [--quick] [--out DIR]

For each model:context in --runs, N agents each hold C tokens of context and
take turns round-robin under a memory budget that fits `--fit` of them:

  hot        no budget: every agent in memory (the reference)
  overlap    budget; the next agent's cache is read (prefetch hint) while the
             current one decodes
  reload     budget; a warm agent's cache is read when its turn starts, on
             the engine thread (everything waits)
  reprefill  COMPUTED, not run: hot makespan + one prefill of C tokens per
             miss, the prefill timed once for real at C tokens

The modes alternate within each repeat (the order rotates from repeat to
repeat), after one untimed warm-up run of each; medians of the repeats with
min-max. Before each timed run every agent file is dropped from the page
cache, so a reload reads the disk.

`llama3-8b-geometry-random` is a seeded RANDOM model with Llama 3.1 8B's KV
geometry (32 layers, 8 KV heads, head_dim 128; tiny_models.py): its Q4 cache
is about 150 MB at 4K tokens, as large as the real model's, so a reload costs
what it would on an 8B model. Caches are filled with random keys and values
(the timings depend on sizes, not contents).

Then batched decode: aggregate tokens/s at each batch size, sizes alternating
within each repeat after an untimed step of each; every step is timed and
kept (`step_ms_per_repeat`), the step time of a repeat is the mean of its
steps; median with min-max, and the speedup over batch 1 as the median of
per-repeat ratios (`speedup_per_repeat`) with their min-max. What limits
batching at a real model's width: scripts/probe_batch.py.

Writes <out>/interleave.json (headline: overlap_vs_hot and batch4_speedup for
the last run, no_overlap_vs_hot_8b_geometry and overlap_vs_hot_8b_geometry)
and interleave.md. The CPU may be shared: compare within one run.
"""

import mlx_agentcache  # noqa: F401  (loads OpenBLAS before mlx.core)

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_agentcache import blas
from mlx_agentcache.config import DEFAULT_KV, default_home
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.pool import CachePool
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.scheduler import Scheduler
from mlx_agentcache.store import codec, segments

ROOT = Path(__file__).resolve().parent.parent
GEOMETRY_8B = "llama3-8b-geometry-random"
MODES = ("hot", "overlap", "reload")
SYSTEM = "You are one of several analysts. Answer in one short sentence."
DOC = " ".join(f"Record {i}: shipment {i * 37 % 101} left depot {'north' if i % 3 else 'south'} on day {i % 28 + 1}." for i in range(3000))


def spread(xs: list[float]) -> dict:
    """Median with min and max, rounded for the report."""
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4), "n": len(xs)}


def kv_shapes(runner: ModelRunner) -> list[tuple[int, int, int]]:
    """(kv heads, key dim, value dim) per layer, read from a 16-bit cache after two tokens."""
    probe = runner.new_cache("fp16")
    runner.prefill([1, 2], probe)
    out = []
    for layer in probe.layers:
        k, v = layer.contiguous()
        out.append((k[0].shape[0], k[0].shape[-1], 0 if v is None else v[0].shape[-1]))
    return out


def synthetic_cache(runner: ModelRunner, tokens: list[int], seed: int = 0):
    """A cache of len(tokens) positions with random keys/values of the model's shapes,
    appended in 512-token chunks as a prefill would (works for every KV mode)."""
    mx.random.seed(seed)
    cache = runner.new_cache()
    for layer, (heads, kdim, vdim) in zip(cache.layers, kv_shapes(runner)):
        for a in range(0, len(tokens), 512):
            n = min(512, len(tokens) - a)
            keys = mx.random.normal((1, heads, n, kdim))
            values = mx.random.normal((1, heads, n, vdim)) if vdim else None
            layer.update_and_fetch(keys, values)
        mx.eval([s.keys for s in layer.segments])
    cache.tokens = list(tokens)
    return cache


def make_agents(runner: ModelRunner, root: Path, n_agents: int, context: int) -> tuple[Path, int]:
    """Agent files + histories for one context size: (directory, bytes of one agent's file)."""
    src = root / f"agents-{context}"
    rt = Runtime(cache_dir=src, runner=runner, budget_bytes=float("inf"))
    first = rt.agent("agent0", system=SYSTEM)
    ids = runner.tokenizer.encode(DOC)
    while len(ids) < context:
        ids = ids + ids
    doc = runner.tokenizer.decode(ids[: max(context - 40, 8)])
    first.messages = [{"role": "user", "content": doc}, {"role": "assistant", "content": "Noted."}]
    cache = synthetic_cache(runner, first.prompt_tokens(None, generation=False))
    for i in range(n_agents):
        a = rt.agent(f"agent{i}", system=SYSTEM)
        a.messages = list(first.messages)
        a._save_history()
        rt.pool.save(a.name, cache)
    rt.close()
    return src, segments.disk_bytes(src / "agent0.safetensors")  # the manifest and its segments


def release() -> None:
    """Give back the memory of finished runs (MLX keeps freed buffers for reuse): ten agents
    of 150 MB per run would otherwise pile up across runs."""
    gc.collect()
    mx.clear_cache()
    if sys.platform.startswith("linux"):  # glibc keeps freed memory in per-thread arenas; each run starts new threads
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def drop_page_cache(directory: Path) -> None:
    """Make the next read of every file under `directory` come from the disk."""
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_mode(runner, src: Path, root: Path, mode: str, n_agents: int, fit: int, max_tokens: int, budget: float) -> dict:
    """One round-robin workflow in a hard-linked copy of the agents (saves replace files
    atomically, so the originals stay as built); returns makespan and per-turn stats."""
    d = root / f"run-{mode}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d, copy_function=os.link)
    rt = Runtime(cache_dir=d, runner=runner, max_tokens=max_tokens)
    rt.scheduler.close()
    rt.pool = CachePool(d, runner.fingerprint, runner.new_cache, budget, share_prefixes=False)
    rt.scheduler = Scheduler(runner, rt.pool, overlap=mode != "reload")
    names = [f"agent{i}" for i in range(n_agents)]
    for name in names if mode == "hot" else names[:fit]:  # untimed: what fits starts in memory
        cache, _ = rt.pool.checkout(name)
        rt.pool.checkin(name, cache, persist=False)
        rt.pool.unsaved.discard(name)
    drop_page_cache(d)
    turns = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        h = rt.submit(name, f"Which depot sent shipment {i * 13 % 101}?")
        if mode == "overlap" and i + 1 < len(names):
            rt.prefetch(names[i + 1])
        h.wait()
        s = h.stats
        turns.append({"tier": s.tier, "ttft_ms": round(s.ttft_ms, 1), "load_ms": round(s.load_ms, 1), "queue_ms": round(s.queue_ms, 1), "prefetched": s.prefetched})
    makespan = time.perf_counter() - t0
    steps = [(t1 - t0) * 1000 for kind, _, t0, t1 in rt.scheduler.timeline if kind == "decode"]
    loads = [(t1 - t0) * 1000 for kind, _, t0, t1 in rt.scheduler.timeline if kind == "load"]
    rt.close()
    del rt
    release()
    shutil.rmtree(d, ignore_errors=True)
    return {"makespan_s": makespan, "misses": sum(t["tier"] != "hot" for t in turns), "waited_ms": sum(t["queue_ms"] for t in turns),
            "decode_step_ms": statistics.median(steps) if steps else None, "load_ms": statistics.median(loads) if loads else None, "turns": turns}


def bench_interleave(runner, src: Path, root: Path, agent_bytes: int, args) -> dict:
    budget = (args.fit + 0.5) * agent_bytes  # `fit` agents (they grow a little per turn), never one more
    run = lambda mode: run_mode(runner, src, root, mode, args.agents, args.fit, args.max_tokens, float("inf") if mode == "hot" else budget)  # noqa: E731
    for mode in MODES:  # untimed warm-up of each mode
        run(mode)
    samples = {m: [] for m in MODES}
    for r in range(args.repeats):
        order = MODES[r % 3 :] + MODES[: r % 3]  # rotate, so no mode always runs first
        for mode in order:
            got = run(mode)
            samples[mode].append(got)
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30 if Path("/proc/self/statm").exists() else 0
            print(f"  repeat {r + 1}/{args.repeats} {mode:8s} makespan {got['makespan_s']:.2f} s, {got['misses']} reloads (process memory {rss:.1f} GiB)", flush=True)
    out = {"budget_bytes": int(budget), "agent_file_bytes": agent_bytes}
    for mode in MODES:
        runs = samples[mode]
        out[mode] = {"makespan_s": spread([x["makespan_s"] for x in runs]), "misses": runs[0]["misses"],
                     "waited_ms": spread([x["waited_ms"] for x in runs]),
                     "decode_step_ms": spread([x["decode_step_ms"] for x in runs if x["decode_step_ms"] is not None]),
                     "load_ms": spread([x["load_ms"] for x in runs]) if all(x["load_ms"] is not None for x in runs) else None,
                     "makespans_s": [round(x["makespan_s"], 3) for x in runs], "turns_last_run": runs[-1]["turns"]}
    for mode in ("overlap", "reload"):  # per-repeat ratios: both runs of a repeat saw the same minute of the machine
        ratios = [a["makespan_s"] / h["makespan_s"] for a, h in zip(samples[mode], samples["hot"])]
        out[mode]["vs_hot"] = spread(ratios)
    return out


def measured_prefill(runner: ModelRunner, context: int) -> float:
    """Seconds for one real prefill of `context` tokens (after a short untimed one)."""
    ids = runner.tokenizer.encode(DOC)
    while len(ids) < context:
        ids = ids + ids
    runner.prefill(ids[:64], runner.new_cache())
    t0 = time.perf_counter()
    mx.eval(runner.prefill(ids[:context], runner.new_cache()))
    return time.perf_counter() - t0


def batch_scaling(runner, agent_file: Path, sizes: list[int], steps: int, repeats: int) -> dict:
    """Aggregate decode tokens/s per batch size: sizes alternate within each repeat (the order
    rotating), each step timed on its own. Every row is the agent file read back (its own
    storage, as separate agents have). Keeps every step's time and every repeat's ratio."""
    rows = {}
    for b in sizes:
        caches = [codec.load(agent_file, runner.fingerprint)[0] for _ in range(b)]
        context = len(caches[0].tokens)
        mx.eval(runner.decode([5] * b, caches))  # untimed warm-up of this size
        rows[b] = caches
    release()
    samples = {b: [] for b in sizes}  # per repeat: the step times in ms
    for r in range(repeats):
        for b in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
            for c in rows[b]:
                c.trim_to(context)  # every repeat decodes at the same context length
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                mx.eval(runner.decode([5] * b, rows[b]))
                times.append((time.perf_counter() - t0) * 1000)
            samples[b].append(times)
    out = {}
    mean = {b: [statistics.fmean(t) for t in samples[b]] for b in sizes}  # per repeat
    for b in sizes:
        step = spread(mean[b])
        # per-repeat ratios: the sizes of one repeat saw the same minute of the machine
        per_repeat = [b / sizes[0] * one / t for one, t in zip(mean[sizes[0]], mean[b])]
        ratios = spread(per_repeat)
        out[b] = {"step_ms": step, "tokens_per_s": round(b / step["median"] * 1000, 2), "speedup_vs_1": round(ratios["median"], 3),
                  "speedup_spread": ratios, "speedup_per_repeat": [round(x, 4) for x in per_repeat],
                  "step_ms_per_repeat": [[round(x, 3) for x in t] for t in samples[b]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=f"{GEOMETRY_8B}:4096,smollm2-135m:1024", help="model:context, comma separated")
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--fit", type=int, default=3, help="agents the budget holds")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens per turn")
    ap.add_argument("--kv", default=DEFAULT_KV, help=f"KV cache mode (default {DEFAULT_KV}, the runtime's default)")
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--batch-steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="small sizes to check the script (numbers not comparable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    if args.quick:
        # small sizes, but the 5 repeats of a real run: the other half of a loaded 2-core machine moves single steps 2x
        args.runs, args.agents, args.repeats, args.batch_sizes, args.batch_steps = f"{GEOMETRY_8B}:512", 5, 5, "1,2,4", 3
    if args.repeats < 1 or args.agents <= args.fit:
        ap.error("need --repeats >= 1 and more --agents than --fit")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    mx.set_cache_limit(0)  # freed buffers go back at once: runs of 1.5 GB of caches follow each other
    home = default_home()
    root = Path(tempfile.mkdtemp(prefix="bench-interleave-", dir=home))
    results = {"command": " ".join(["python", "scripts/bench_interleave.py", *sys.argv[1:]]), "quick": args.quick,
               "agents": args.agents, "fit": args.fit, "kv": args.kv, "max_tokens": args.max_tokens, "repeats": args.repeats, "batch_steps": args.batch_steps,
               "machine": {"cpu": blas.read_cpuinfo().model, "cpus": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device()),
                           "blas": blas.CHOICE.summary(), "date": time.strftime("%Y-%m-%d")},
               "runs": {}}
    try:
        for spec in args.runs.split(","):
            model, context = spec.rsplit(":", 1)
            context = int(context)
            runner = ModelRunner.load(model, home, kv_bits=args.kv)
            print(f"{model} at {context} tokens: building {args.agents} agents", flush=True)
            src, agent_bytes = make_agents(runner, root, args.agents, context)
            r = {"model": model, "random_weights": model.endswith("-random"), "context_tokens": context}
            r |= bench_interleave(runner, src, root, agent_bytes, args)
            prefill_s = measured_prefill(runner, context)
            hot = r["hot"]["makespan_s"]["median"]
            r["reprefill"] = {"computed": True, "prefill_s_measured": round(prefill_s, 3), "misses": r["reload"]["misses"],
                              "makespan_s": round(hot + r["reload"]["misses"] * prefill_s, 3),
                              "vs_hot": round((hot + r["reload"]["misses"] * prefill_s) / hot, 3)}
            r["batch"] = batch_scaling(runner, src / "agent0.safetensors", sizes, args.batch_steps, args.repeats)
            print(f"  batch: {json.dumps({b: x['tokens_per_s'] for b, x in r['batch'].items()})}", flush=True)
            results["runs"][spec] = r
            shutil.rmtree(src, ignore_errors=True)
            del runner
            release()
            write(results, args.out)  # after each model, so a long run keeps what it finished
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results["headline"]))


def write(results: dict, out: Path) -> None:
    results["headline"] = headline(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interleave.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "interleave.md").write_text(markdown(results))


def headline(results: dict) -> dict:
    """Medians of per-repeat ratios; the plain keys describe the real model's run when there is one."""
    runs = list(results["runs"].values())
    out = {}
    last = next((r for r in runs if r["model"] != GEOMETRY_8B), runs[-1])
    out["overlap_vs_hot"] = last["overlap"]["vs_hot"]["median"]
    out["no_overlap_vs_hot"] = last["reload"]["vs_hot"]["median"]
    four = last["batch"].get(4) or last["batch"].get("4")
    out["batch4_speedup"] = four["speedup_vs_1"] if four else None
    out["model"] = last["model"]
    for r in runs:
        if r["model"] == GEOMETRY_8B:
            out["no_overlap_vs_hot_8b_geometry"] = r["reload"]["vs_hot"]["median"]
            out["overlap_vs_hot_8b_geometry"] = r["overlap"]["vs_hot"]["median"]
            four = r["batch"].get(4) or r["batch"].get("4")
            out["batch4_speedup_8b_geometry"] = four["speedup_vs_1"] if four else None
            out["context_8b_geometry"] = r["context_tokens"]
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Reloads overlapped with decoding (scripts/bench_interleave.py)",
        "",
        f"{m['cpu']}, {m['cpus']} cores, MLX {m['mlx']} on {m['device']}, {m['blas']}, {m['date']}. `{res['command']}`",
        "",
        f"{res['agents']} agents round-robin, budget for {res['fit']}, {res['max_tokens']} tokens per turn, KV mode {res['kv']}; modes alternate within each of "
        f"{res['repeats']} repeats after an untimed warm-up; median (min-max). vs hot is the median of per-repeat ratios. "
        "Page cache dropped before each run. Models marked random have seeded random weights.",
        "",
        "| model | context | agent file MiB | mode | makespan s | vs hot | reloads | waited for reads ms | reload ms | decode step ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda s, k=1: "n/a" if not s else f"{s['median']:.{k}f} ({s['min']:.{k}f}-{s['max']:.{k}f})"  # noqa: E731
    for r in res["runs"].values():
        name = r["model"] + (" (random)" if r["random_weights"] else "")
        mib = r["agent_file_bytes"] / 2**20
        for mode, label in (("hot", "all hot"), ("overlap", "reload overlapped"), ("reload", "reload, no overlap")):
            x = r[mode]
            vs = "1" if mode == "hot" else f(x["vs_hot"], 3)
            lines.append(f"| {name} | {r['context_tokens']} | {mib:.1f} | {label} | {f(x['makespan_s'], 2)} | {vs} | {x['misses']} | {f(x['waited_ms'], 0)} | {f(x['load_ms'], 0)} | {f(x['decode_step_ms'], 0)} |")
        p = r["reprefill"]
        lines.append(f"| {name} | {r['context_tokens']} | {mib:.1f} | re-prefill (**computed**: hot + {p['misses']} x one measured prefill of {p['prefill_s_measured']:.2f} s) | {p['makespan_s']:.2f} | {p['vs_hot']:.3f} | | | | |")
    lines += ["", "Batched decode, aggregate tokens/s (sizes alternate within each repeat; step time median (min-max); "
              "vs batch 1: median (min-max) of per-repeat ratios):", "",
              "| model | context | batch | step ms | tokens/s | vs batch 1 |", "|---|---|---|---|---|---|"]
    for r in res["runs"].values():
        for b, x in r["batch"].items():
            lines.append(f"| {r['model']} | {r['context_tokens']} | {b} | {f(x['step_ms'], 0)} | {x['tokens_per_s']} | {f(x['speedup_spread'], 3)} |")
    h = res["headline"]
    lines += ["", "Headline: " + ", ".join(f"{k} = {v}" for k, v in h.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
