"""How many agents fit in memory, and what persistence and shared prefixes buy.

    python scripts/bench_capacity.py [--home DIR] [--rounds 2] [--max-tokens 2]

On SmolLM2-135M (real weights), this measures:

1. bytes per token of real agent caches in fp16, q4 and the default mode
   (prefilled, then nbytes);
2. how many agents fit at 1K/4K/8K context in the budget scaled from the
   published 10.2 GB of a 24 GB M4 Pro to this machine's memory: fp16, Q4,
   and Q4 with a 2K-token system prompt shared by all agents. These counts
   are COMPUTED (budget / bytes per agent, in 256-token blocks) and checked
   by one real run: agents checked into a real pool under a small budget,
   counting how many stay hot in each mode;
3. a 10-agent workflow whose agents share a ~2K-token system prompt: memory
   and disk bytes with shared prefix blocks vs one copy per agent (real run);
4. a 10-agent round robin with room for 3 hot agents: persistence (evicted
   agents restore from disk) vs re-prefill on eviction (real runs, the two
   alternating within each of --repeats repeats).

Restore bandwidth against the disk's is the store benchmark's
(scripts/bench_store.py, store.json). MB is 10^6 bytes, MiB 2^20.

Writes bench_results/capacity.json and bench_results/capacity.md.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx.core)

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_agentcache import kvcache
from mlx_agentcache.kvcache import AgentCache
from mlx_agentcache.pool import CachePool
from mlx_agentcache.q4 import BLOCK_TOKENS
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.scheduler import Scheduler

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "tests" / "data" / "python_reference.txt").read_text()
REFERENCE = {"budget_gb": 10.2, "memory_gb": 24, "machine": "M4 Pro, 24 GB"}
CONTEXTS = (1024, 4096, 8192)
SHARED_PROMPT = 2048


def load_runner(model: str, home: Path) -> ModelRunner:
    try:
        return ModelRunner.load(model, home)
    except ImportError:  # a model store without load_model: mlx-lm's loader, made fast for this backend
        from mlx_lm.utils import load

        from mlx_agentcache.models.model_store import resolve_model

        path = resolve_model(model, home)
        m, tok, cfg = load(str(path), return_config=True)
        try:
            from mlx_agentcache.models.model_loader import prepare_for_backend

            m = prepare_for_backend(m)
        except ImportError:
            pass
        return ModelRunner(m, tok, cfg, path)


def mem_total() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def blocks(n: int) -> int:
    return -(-n // BLOCK_TOKENS) * BLOCK_TOKENS


# -- 1, 2: bytes per token and capacity ---------------------------------------


def modes() -> list[str]:
    """fp16, q4, and the default mode when it is another one."""
    return list(dict.fromkeys(["q4", "fp16", getattr(kvcache, "DEFAULT_KV", "q4")]))


def bytes_per_token(runner: ModelRunner, n: int = 256) -> dict:
    ids = runner.tokenizer.encode(TEXT)[:n]
    out = {}
    for name in modes():
        cache = runner.new_cache(name)
        runner.prefill(ids, cache)
        out[name] = cache.nbytes / n
    return out


def copies(runner: ModelRunner, src: AgentCache, n: int):
    """`n` caches holding what `src` holds, each with its own arrays (separate agents own
    separate storage): saved once, read back n times, which works in every mode."""
    from mlx_agentcache.store import codec

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "src.safetensors"
        codec.save(path, src, runner.fingerprint)
        for _ in range(n):
            yield codec.load(path, runner.fingerprint)[0]


def pool_check(runner: ModelRunner, bpt: dict, context: int, fit_q4: int = 12) -> dict:
    """The computed counts checked once for real: agents of `context` tokens are checked
    into a memory-only pool whose budget holds `fit_q4` Q4 agents by the arithmetic; how
    many stay hot in each mode?"""
    ids = runner.tokenizer.encode(TEXT)[:context]
    budget = int(fit_q4 * blocks(context) * bpt["q4"] + bpt["q4"] * BLOCK_TOKENS / 2)
    out = {"context": context, "budget_bytes": budget, "modes": {}}
    for mode in modes():
        base = runner.new_cache(mode)
        runner.prefill(ids, base)
        with tempfile.TemporaryDirectory() as d:
            pool = CachePool(d, runner.fingerprint, lambda: runner.new_cache(mode), budget, share_prefixes=False, persist=False)
            for i, c in enumerate(copies(runner, base, int(budget // base.nbytes) + 3)):
                pool.checkin(f"a{i}", c, persist=False)
            hot = len(pool.hot)
            pool.close()
        out["modes"][mode] = {"hot_agents": hot, "computed_agents": int(budget // (blocks(context) * bpt[mode])), "agent_bytes": base.nbytes}
    return out


def capacity(bpt: dict, budget: int) -> list[dict]:
    rows = []
    for ctx in CONTEXTS:
        shared = min(SHARED_PROMPT, ctx // 2)
        row = {"context": ctx, "shared_prompt_tokens": shared}
        for name, b in bpt.items():
            per_agent = blocks(ctx) * b
            prefix = shared * b
            row[f"{name}_bytes_per_agent"] = int(per_agent)
            row[f"{name}_agents"] = int(budget // per_agent)
            row[f"{name}_shared_agents"] = int((budget - prefix) // (per_agent - prefix))
        rows.append(row)
    return rows


# -- 3: shared system prompt ---------------------------------------------------


def shared_prompt_workflow(runner: ModelRunner, max_tokens: int, agents: int = 10, prompt_tokens: int = SHARED_PROMPT) -> dict:
    ids = runner.tokenizer.encode(TEXT)
    system = runner.tokenizer.decode(ids[2000 : 2000 + prompt_tokens + 40])
    system_tokens = len(runner.tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=True))
    with tempfile.TemporaryDirectory() as d:
        rt = Runtime(cache_dir=d, runner=runner, max_tokens=max_tokens, budget_bytes=float("inf"))
        turns = []
        for i in range(agents):
            r = rt.agent(f"worker{i}", system=system).chat(f"Task {i}: name one function you would test first.")
            turns.append({"agent": i, "ttft_ms": round(r.stats.ttft_ms), "prefilled": r.stats.prefilled_tokens, "reused": r.stats.restored_tokens, "cache_tokens": r.stats.cache_tokens})
        rt.flush()
        s = rt.pool.summary()
        caches = list(rt.pool.hot.values())
        prefix = caches[0].layers[0].segments[0].length
        bpt = caches[0].nbytes / caches[0].offset
        alone = sum(blocks(c.offset) * bpt for c in caches)  # each agent with its own copy
        files = sorted(Path(d).glob("*.safetensors"))
        block_files = sorted((Path(d) / "blocks").glob("*.safetensors"))
        disk_shared = sum(p.stat().st_size for p in files + block_files)
        disk_alone = sum(p.stat().st_size for p in files) + len(files) * prefix * bpt
        rt.close()
    return {
        "agents": agents,
        "system_prompt_tokens": system_tokens,
        "shared_prefix_tokens": prefix,
        "memory_bytes_shared": s["hot_bytes"],
        "memory_bytes_one_copy_each": int(alone),
        "memory_bytes_saved": int(alone - s["hot_bytes"]),
        "disk_bytes_shared": disk_shared,
        "disk_bytes_one_copy_each": int(disk_alone),
        "disk_bytes_saved": int(disk_alone - disk_shared),
        "prefix_block_files": len(block_files),
        "turns": turns,
    }


# -- 4: round robin under a small budget -----------------------------------------


def round_robin(runner: ModelRunner, q4_bytes_per_token: float, persist: bool, rounds: int, max_tokens: int, agents: int, ctx_tokens: int) -> dict:
    ids = runner.tokenizer.encode(TEXT)
    systems = [f"You are agent {i}. Notes:\n" + runner.tokenizer.decode(ids[i * ctx_tokens : (i + 1) * ctx_tokens]) for i in range(agents)]
    per_agent = blocks(ctx_tokens + 64) * q4_bytes_per_token
    with tempfile.TemporaryDirectory() as d:
        rt = Runtime(cache_dir=d, runner=runner, max_tokens=max_tokens, budget_bytes=int(3.5 * per_agent))
        if not persist:  # the scheduler must use the memory-only pool too, or turns still save
            rt.scheduler.close()
            rt.pool = CachePool(d, runner.fingerprint, runner.new_cache, int(3.5 * per_agent), warn=print, persist=False)
            rt.scheduler = Scheduler(runner, rt.pool)
        per_round, tiers = [], {}
        t_all = time.perf_counter()
        for r in range(rounds):
            t = time.perf_counter()
            ttfts = []
            for i in range(agents):
                reply = rt.agent(f"a{i}", system=systems[i]).chat(f"Round {r}: one word?")
                tiers[reply.stats.tier] = tiers.get(reply.stats.tier, 0) + 1
                ttfts.append(reply.stats.ttft_ms)
            per_round.append({"seconds": round(time.perf_counter() - t, 2), "mean_ttft_ms": round(sum(ttfts) / len(ttfts))})
        total = time.perf_counter() - t_all
        summary = rt.pool.summary()
        rt.close()
    return {"persist": persist, "total_seconds": round(total, 2), "rounds": per_round, "tiers": tiers, "evictions": summary["evictions"], "bytes_written": summary["bytes_written"], "bytes_read": summary["bytes_read"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the round robin (the modes alternate)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    ap.add_argument("--quick", action="store_true", help="Small sizes, to check the script (results are not comparable).")
    ap.add_argument("--report", type=Path, help="Only rewrite capacity.md from this capacity.json.")
    args = ap.parse_args()
    if args.report:
        (args.out / "capacity.md").write_text(report(json.loads(args.report.read_text())))
        return
    q = args.quick
    from mlx_agentcache.config import default_home

    runner = load_runner(args.model, args.home or default_home())
    res = {"model": args.model, "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {mem_total() / 2**30:.1f} GiB", "mlx": mx.__version__, "device": str(mx.default_device())}
    budget = int(mem_total() * REFERENCE["budget_gb"] / REFERENCE["memory_gb"])
    res["budget"] = {"bytes": budget, "rule": f"{REFERENCE['budget_gb']} GB of {REFERENCE['memory_gb']} GB ({REFERENCE['machine']}) scaled to this machine's memory"}

    t = time.perf_counter()
    bpt = bytes_per_token(runner, 32 if q else 256)
    res["bytes_per_token"] = {k: round(v, 1) for k, v in bpt.items()}
    res["capacity"] = capacity(bpt, budget)
    res["capacity_computed"] = True  # arithmetic from measured bytes per token; pool_check is the real run
    print("bytes/token", res["bytes_per_token"], f"({time.perf_counter() - t:.0f} s)", flush=True)
    res["pool_check"] = pool_check(runner, bpt, 256 if q else 1024, 4 if q else 12)
    print("pool check", res["pool_check"], flush=True)

    res["shared_prompt_workflow"] = shared_prompt_workflow(runner, args.max_tokens, 3 if q else 10, 256 if q else SHARED_PROMPT)
    print("shared prompt", {k: v for k, v in res["shared_prompt_workflow"].items() if k != "turns"}, flush=True)

    agents, ctx = (4, 60) if q else (10, 300)
    repeats = 1 if q else args.repeats
    runs = {"persistence": [], "re_prefill": []}
    for r in range(repeats):  # the two alternate, so a busy minute hits both
        for label in (("persistence", "re_prefill") if r % 2 == 0 else ("re_prefill", "persistence")):
            runs[label].append(round_robin(runner, bpt[modes()[-1]], label == "persistence", args.rounds, args.max_tokens, agents, ctx))
            print(f"round robin {r + 1}/{repeats} {label}: {runs[label][-1]['total_seconds']} s", flush=True)
    res["round_robin"] = {"agents": agents, "hot_room": 3, "context_tokens": ctx, "max_tokens": args.max_tokens, "repeats": repeats}
    for label, xs in runs.items():
        totals = [x["total_seconds"] for x in xs]
        res["round_robin"][label] = xs[len(xs) // 2] | {"total_seconds": statistics.median(totals), "total_seconds_all": totals}
    res["round_robin"]["persistence_vs_re_prefill"] = round(
        statistics.median(a["total_seconds"] / b["total_seconds"] for a, b in zip(runs["persistence"], runs["re_prefill"])), 3)
    print("round robin", {k: v for k, v in res["round_robin"].items() if not isinstance(v, dict)}, flush=True)

    c4 = next(r for r in res["capacity"] if r["context"] == 4096)
    res["headline"] = {
        "q4_vs_fp16_agents_4k": round(c4["q4_agents"] / c4["fp16_agents"], 2),
        "round_robin_persistence_vs_re_prefill": res["round_robin"]["persistence_vs_re_prefill"],
        "pool_check_q4_vs_fp16_hot_agents": round(res["pool_check"]["modes"]["q4"]["hot_agents"] / max(1, res["pool_check"]["modes"]["fp16"]["hot_agents"]), 2),
    }
    res["quick"] = q
    res.setdefault("load_average", [round(x, 1) for x in os.getloadavg()])
    args.out.mkdir(exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(res, indent=1))
    (args.out / "capacity.md").write_text(report(res))
    print(json.dumps(res["headline"]))


def report(r: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    lines = [
        "# Capacity: agents per memory budget, persistence, shared prefixes",
        "",
        f"Model {r['model']}; {r['machine']}; MLX {r['mlx']} ({r['device']}). Produced by `scripts/bench_capacity.py`. "
        f"The machine was shared with other jobs (load average {r.get('load_average')} on {os.cpu_count()} cores): "
        "byte counts are exact, timings are noisy and CPU-bound parts are slower than on an idle machine.",
        "",
        f"**Headline:** at 4K context, Q4 caches fit **{r['headline']['q4_vs_fp16_agents_4k']}x** as many agents as fp16. "
        "Restore bandwidth against the disk's: store.md (scripts/bench_store.py).",
        "",
        "## Bytes per token (measured on real SmolLM2 caches, all 30 layers)",
        "",
        f"Q4: {r['bytes_per_token']['q4']} B/token; fp16: {r['bytes_per_token']['fp16']} B/token "
        f"({r['bytes_per_token']['fp16'] / r['bytes_per_token']['q4']:.2f}x).",
        "",
        f"## Agents that fit in {r['budget']['bytes'] / 1e9:.2f} GB (computed)",
        "",
        f"Budget: {r['budget']['rule']}. **Computed**, not run: per-agent bytes are measured bytes/token times the context rounded up to 256-token blocks; "
        "'shared' keeps one copy of a common system prompt (2K tokens, or half the context at 1K) for all agents. Model weights are outside the budget.",
        "",
        "| context | fp16 agents | Q4 agents | Q4 vs fp16 | fp16 + shared | Q4 + shared |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["capacity"]:
        lines.append(f"| {c['context']} | {c['fp16_agents']:,} | {c['q4_agents']:,} | {c['q4_agents'] / c['fp16_agents']:.2f}x | {c['fp16_shared_agents']:,} | {c['q4_shared_agents']:,} |")
    pc = r.get("pool_check")
    if pc:
        lines += ["", f"Checked by a real run: agents of {pc['context']} tokens (real prefill, each its own copy) checked into a memory-only pool "
                  f"with a {pc['budget_bytes'] / 2**20:.1f} MiB budget until it evicts: "
                  + ", ".join(f"{m} {x['hot_agents']} hot (computed {x['computed_agents']}, {x['agent_bytes'] / 2**20:.2f} MiB each)" for m, x in pc["modes"].items()) + "."]
    s = r["shared_prompt_workflow"]
    lines += [
        "",
        f"## {s['agents']} agents with a shared {s['system_prompt_tokens']}-token system prompt (real run)",
        "",
        f"{s['shared_prefix_tokens']} leading tokens (whole 256-token blocks) are stored once, in memory and in one block file.",
        "",
        "| | one copy per agent | shared prefix | saved |",
        "|---|---:|---:|---:|",
        f"| memory | {mib(s['memory_bytes_one_copy_each'])} | {mib(s['memory_bytes_shared'])} | {mib(s['memory_bytes_saved'])} |",
        f"| disk | {mib(s['disk_bytes_one_copy_each'])} | {mib(s['disk_bytes_shared'])} | {mib(s['disk_bytes_saved'])} |",
        "",
        "Prefill per agent (the first computes the prompt; the others attach the shared blocks): "
        + ", ".join(f"{t['prefilled']}" for t in s["turns"])
        + " tokens; TTFT " + ", ".join(f"{t['ttft_ms'] / 1000:.1f}" for t in s["turns"]) + " s.",
    ]
    rr = r["round_robin"]
    lines += [
        "",
        f"## Round robin: {rr['agents']} agents, room for {rr['hot_room']} hot, ~{rr['context_tokens']}-token contexts, {rr['max_tokens']} tokens per reply",
        "",
        "| | total s | per round s | mean TTFT per round ms | tiers | evictions |",
        "|---|---:|---|---|---|---:|",
    ]
    for label in ("persistence", "re_prefill"):
        x = rr[label]
        totals = x.get("total_seconds_all")
        lines.append(
            f"| {label.replace('_', '-')} | {x['total_seconds']}{f' ({min(totals)}-{max(totals)})' if totals else ''} | {', '.join(str(p['seconds']) for p in x['rounds'])} | "
            f"{', '.join(str(p['mean_ttft_ms']) for p in x['rounds'])} | {x['tiers']} | {x['evictions']} |"
        )
    lines += ["", f"Median total of {rr.get('repeats', 1)} alternating runs each (min-max); per-round columns are from the median run; "
              f"persistence / re-prefill = {rr.get('persistence_vs_re_prefill')} (median of per-repeat ratios). "
              "The first round is cold in both runs; later rounds restore evicted agents from disk (persistence) or prefill them again (re-prefill).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
