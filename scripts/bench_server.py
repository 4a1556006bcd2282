"""Load test of `agentcache serve` on loopback: many clients, many agents, one small machine.

Starts the server (real SmolLM2-135M) in a subprocess with a cache budget
smaller than the agents' caches together, so agents move between memory and
disk during the run. `--clients` concurrent clients (the official `openai`
SDK, streaming) share `--agents` agents, two or more clients per agent taking
turns on its conversation, until `--requests` requests have been answered.

Checked, not just timed:
* nothing lost: every request gets a complete streamed reply with usage;
* no cross-agent leakage: each agent's system prompt holds a codeword; no
  reply of an agent contains another agent's codeword, and the history the
  server stored for each agent is exactly the conversation its clients sent
  and received, in order;
* every turn after an agent's first reuses its cache (cached_tokens > 0)
  and prompt = cached + prefilled;
* memory: hot cache bytes sampled from /metrics, and the pool's own
  high-water mark (`agentcache_hot_bytes_peak`, every change counted, not
  only sampled ones), against the budget (a run over it fails); the
  server's peak RSS.

Measured: throughput (requests/s, generated tokens/s) and TTFT p50/p95 as the
client sees it, by the tier that served the turn (hot: cache in memory; warm:
restored from disk). Writes server.json and server.md into --out (bench_results/).

    python scripts/bench_server.py --clients 16 --agents 8 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

MODEL = "smollm2-135m"
KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def codeword(i: int) -> str:
    return f"QX{i:02d}{'ZKVWJP'[i % 6]}{(i * 7919) % 9973:04d}"


class Agent:
    def __init__(self, i: int):
        self.name = f"bench-agent-{i}"
        self.word = codeword(i)
        self.messages = [{"role": "system", "content": f"You are assistant number {i}. Your secret codeword is {self.word}."}]
        self.lock = asyncio.Lock()
        self.turns = 0


async def client_loop(cid: int, agent: Agent, client: openai.AsyncOpenAI, budget: dict, results: list, max_tokens: int) -> None:
    while True:
        async with agent.lock:
            if budget["left"] <= 0:
                return
            budget["left"] -= 1
            n = budget["total"] - budget["left"]
            msgs = agent.messages + [{"role": "user", "content": f"Client {cid}, request {n}: tell me one short fact about the number {n}."}]
            t0 = time.perf_counter()
            first, text, final = None, [], None
            stream = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, stream=True,
                                                          stream_options={"include_usage": True}, extra_headers={"X-Agent-Id": agent.name})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    final = chunk
            t1 = time.perf_counter()
            reply = "".join(text)
            agent.messages = msgs + [{"role": "assistant", "content": reply}]
            info = final.model_extra["x_agentcache"] if final is not None else {}
            results.append({
                "agent": agent.name, "turn": agent.turns, "client": cid, "ok": final is not None,
                "ttft_s": (first or t1) - t0, "total_s": t1 - t0, "reply": reply,
                "prompt_tokens": final.usage.prompt_tokens if final else None,
                "cached_tokens": final.usage.prompt_tokens_details.cached_tokens if final else None,
                "completion_tokens": final.usage.completion_tokens if final else 0,
                "tier": info.get("tier"), "prefilled": info.get("prefilled_tokens"), "restore_ms": info.get("restore_ms"),
                "server_ttft_ms": info.get("ttft_ms"),
            })
            agent.turns += 1


async def sample_memory(url: str, pid: int, samples: list, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(headers={"x-api-key": KEY}) as c:
        while not stop.is_set():
            text = (await c.get(url + "/metrics")).text
            hot = re.search(r"^agentcache_hot_bytes (\S+)$", text, re.M)
            rss = 0
            try:
                rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024
            except (OSError, AttributeError):
                pass
            samples.append((float(hot.group(1)) if hot else 0.0, rss))
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass


async def run(args, url: str, pid: int) -> dict:
    agents = [Agent(i) for i in range(args.agents)]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    budget = {"left": args.requests, "total": args.requests}
    results, samples, stop = [], [], asyncio.Event()
    sampler = asyncio.create_task(sample_memory(url, pid, samples, stop))
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c, agents[c % args.agents], client, budget, results, args.max_tokens) for c in range(args.clients)))
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    async with httpx.AsyncClient(headers={"x-api-key": KEY}) as c:
        stored = {a.name: (await c.get(f"{url}/v1/agents/{a.name}")).json() for a in agents}
        metrics = (await c.get(url + "/metrics")).text
    return {"agents": agents, "results": results, "samples": samples, "wall_s": wall, "stored": stored, "metrics": metrics}


def check(args, out: dict) -> dict:
    agents, results = out["agents"], out["results"]
    words = {a.name: a.word for a in agents}
    leaks = [(r["agent"], other) for r in results for other, w in words.items() if other != r["agent"] and w in r["reply"]]
    history_ok = {}
    for a in agents:
        s = out["stored"][a.name]
        history_ok[a.name] = s.get("system") == a.messages[0]["content"] and s.get("messages") == a.messages[1:]
    later = [r for r in results if r["turn"] > 0]
    return {
        "requests_answered": sum(r["ok"] for r in results),
        "requests_sent": len(results),
        "lost": args.requests - sum(r["ok"] for r in results),
        "cross_agent_leaks": leaks,
        "stored_history_matches": all(history_ok.values()),
        "histories_mismatched": [n for n, ok in history_ok.items() if not ok],
        "later_turns_all_cached": all((r["cached_tokens"] or 0) > 0 for r in later),
        "usage_adds_up": all(r["prompt_tokens"] == r["cached_tokens"] + r["prefilled"] for r in results if r["ok"]),
    }


def summarize(args, out: dict, checks: dict) -> dict:
    results = out["results"]
    by_tier = {}
    for tier in ("hot", "warm", "cold"):
        t = [r["ttft_s"] * 1000 for r in results if r["tier"] == tier]
        by_tier[tier] = {"n": len(t), "ttft_p50_ms": pct(t, 0.5), "ttft_p95_ms": pct(t, 0.95)}
    restores = [r["restore_ms"] for r in results if r["tier"] == "warm"]
    hot = [h for h, _ in out["samples"]]
    rss = [m for _, m in out["samples"] if m]
    gen = sum(r["completion_tokens"] for r in results)
    m = out["metrics"]
    hidden = re.search(r"^agentcache_restore_hidden_seconds_total (\S+)$", m, re.M)
    peak = re.search(r"^agentcache_hot_bytes_peak (\S+)$", m, re.M)
    over = re.search(r"^agentcache_over_budget_total (\S+)$", m, re.M)
    total_restore = re.search(r"^agentcache_restore_seconds_total (\S+)$", m, re.M)
    return {
        "benchmark": "server",
        "model": MODEL,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
                    "note": args.note},
        "config": {"clients": args.clients, "agents": args.agents, "requests": args.requests, "max_tokens": args.max_tokens,
                   "cache_budget_bytes": args.budget, "kv": "q4"},
        "checks": checks,
        "throughput": {"wall_s": round(out["wall_s"], 2), "requests_per_s": round(len(results) / out["wall_s"], 3),
                       "generated_tokens_per_s": round(gen / out["wall_s"], 2), "generated_tokens": gen},
        "ttft_ms_by_tier": {k: {kk: (round(vv, 1) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in by_tier.items()},
        "restore_ms": {"p50": pct(restores, 0.5), "p95": pct(restores, 0.95)},
        "restore_seconds_total": float(total_restore.group(1)) if total_restore else None,
        "restore_hidden_seconds_total": float(hidden.group(1)) if hidden else None,
        "memory": {"budget_bytes": args.budget, "hot_bytes_max": max(hot) if hot else None,
                   "hot_bytes_over_budget_samples": sum(h > args.budget for h in hot), "samples": len(hot),
                   "hot_bytes_peak": float(peak.group(1)) if peak else None, "over_budget_episodes": float(over.group(1)) if over else None,
                   "server_rss_max_bytes": max(rss) if rss else None},
    }


def markdown(s: dict) -> str:
    c, t, ch, mem = s["config"], s["throughput"], s["checks"], s["memory"]
    rows = "\n".join(f"| {tier} | {v['n']} | {v['ttft_p50_ms']} | {v['ttft_p95_ms']} |" for tier, v in s["ttft_ms_by_tier"].items() if v["n"])
    restores = (f"Warm restores: p50 {s['restore_ms']['p50']} ms, p95 {s['restore_ms']['p95']} ms; {s['restore_hidden_seconds_total']} s of\n"
                f"{s['restore_seconds_total']} s restore time ran while other turns were decoding."
                if s["restore_ms"]["p50"] is not None else "No warm restores in this run.")
    fit = ("(less than the agents' caches together, so agents are written to disk and restored during the run)"
           if s["ttft_ms_by_tier"]["warm"]["n"] else "(the agents' caches all fit: none was restored from disk in this run)")
    return f"""# agentcache serve: load test on loopback, cache budget {c['cache_budget_bytes'] / 2**20:.0f} MiB

{c['clients']} concurrent clients (official `openai` SDK, streaming) over {c['agents']} agents, {c['requests']} requests of
{c['max_tokens']} tokens each, SmolLM2-135M, Q4 cache, cache budget {c['cache_budget_bytes'] / 2**20:.1f} MiB
{fit}.

Machine: {s['machine']['cpu']}, {s['machine']['cores']} cores, {s['machine']['system']}, MLX CPU backend. {s['machine']['note']}

## Checks

| check | result |
|---|---|
| requests answered / sent | {ch['requests_answered']} / {c['requests']} (lost: {ch['lost']}) |
| cross-agent leaks (another agent's codeword in a reply) | {len(ch['cross_agent_leaks'])} |
| server's stored history equals each agent's conversation | {ch['stored_history_matches']} |
| every later turn reused its agent's cache | {ch['later_turns_all_cached']} |
| prompt tokens = cached + prefilled, every turn | {ch['usage_adds_up']} |
| hot cache bytes, max sampled vs budget | {mem['hot_bytes_max'] / 2**20:.2f} MiB vs {mem['budget_bytes'] / 2**20:.2f} MiB ({mem['hot_bytes_over_budget_samples']} of {mem['samples']} samples over) |
| hot cache bytes, the pool's own peak (every change) | {mem['hot_bytes_peak'] / 2**20:.2f} MiB; times over budget: {mem['over_budget_episodes']:.0f} |
| server peak RSS | {(mem['server_rss_max_bytes'] or 0) / 2**20:.0f} MiB (model weights in float32 included) |

## Throughput and TTFT

{t['requests_per_s']} requests/s, {t['generated_tokens_per_s']} generated tokens/s ({t['generated_tokens']} tokens in {t['wall_s']} s).

TTFT as the client sees it (request sent to first streamed text), by the tier the agent's cache came from:

| tier | turns | p50 ms | p95 ms |
|---|---|---|---|
{rows}

{restores}

TTFT here includes queueing behind the other clients: with {c['clients']} clients on {s['machine']['cores']} cores each request
waits for the batch in progress, so these figures measure the server under load, not a lone request. It also
includes the wait at the server's memory gate: turns whose caches would not fit the budget together wait for
others to finish (docs/server.md), which is what a tight budget costs. Hot bytes count every cache in memory,
including those in a turn and those whose save is still being written; room is made before a turn takes memory.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--budget", type=int, nargs="+", default=[4 << 20, 16 << 20],
                    help="hot cache budgets in bytes, one run each (default 4 MiB: far less than the agents' caches, 16 MiB: most of them)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results", help="folder for server.json and server.md")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    runs, failed = [], False
    for budget in args.budget:
        s, checks = one_run(args, budget)
        runs.append(s)
        mem = s["memory"]
        failed |= bool(checks["lost"] or checks["cross_agent_leaks"] or not checks["stored_history_matches"]
                       or not checks["later_turns_all_cached"] or not checks["usage_adds_up"]
                       or mem["hot_bytes_over_budget_samples"] or (mem["hot_bytes_peak"] or 0) > budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps({"benchmark": "server", "runs": runs}, indent=1) + "\n")
    md = "\n".join(markdown(s) for s in runs)
    (args.out / "server.md").write_text(md)
    print(md)
    sys.exit(1 if failed else 0)


def one_run(args, budget: int) -> tuple[dict, dict]:
    """Start a server with `budget`, run the clients, check and summarize."""
    args.budget = budget
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="agentcache-bench-") as d:
        log = open(Path(d) / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "mlx_agentcache", "serve", "--port", str(port), "--cache-dir", str(Path(d) / "cache"),
                                 "--cache-budget", str(budget), "--api-key", KEY, "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit(f"server did not start: {(Path(d) / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
            out = asyncio.run(run(args, url, proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    checks = check(args, out)
    return summarize(args, out, checks), checks


if __name__ == "__main__":
    main()
