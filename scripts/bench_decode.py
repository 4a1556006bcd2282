"""Decode speed with Q4 (and q4k) KV caches against the fp16 cache, at several context lengths.

For each context length the reference text is prefilled once with an fp16
cache; the Q4 caches get the same keys and values re-encoded (decode cost does
not depend on what the cache holds, and one prefill instead of three keeps the
run short). Then the modes decode greedily in turn, one token each per round,
so a busy machine slows them alike; we report the median time per token.

    python scripts/bench_decode.py [--model smollm2-135m] [--contexts 1024,4096] [--steps 64]

Writes bench_results/decode.json and decode.md.
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (before mlx.core: loads the optimized BLAS)

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_agentcache.kvcache import AgentCache, LayerCache
from mlx_agentcache.config import default_home
from mlx_agentcache.models.runner import ModelRunner

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "python_reference.txt"
MODES = ["fp16", "q4", "q4k"]


def reencode(cache: AgentCache, mode: str, chunk: int = 512) -> AgentCache:
    """A copy of an fp16 cache in another mode, appended chunk by chunk as a prefill would."""
    layers = []
    for src in cache.layers:
        dst = LayerCache(mode, src.window)
        dst.offset = dst.start = src.start
        k, v = src.contiguous()
        n = k[0].shape[-2]
        for a in range(0, n, chunk):
            dst.update_and_fetch(k[0][None, :, a : a + chunk].astype(mx.float32), v[0][None, :, a : a + chunk].astype(mx.float32))
        mx.eval([(s.keys, s.values) for s in dst.segments])
        layers.append(dst)
    return AgentCache(layers, list(cache.tokens))


def bench_context(runner: ModelRunner, tokens: list[int], ctx: int, steps: int, warmup: int) -> dict:
    base = runner.new_cache("fp16")
    logits = runner.prefill(tokens[:ctx], base)
    first = int(mx.argmax(logits).item())
    caches = {m: (base if m == "fp16" else reencode(base, m)) for m in MODES}
    nxt = {m: first for m in MODES}
    times = {m: [] for m in MODES}
    for step in range(warmup + steps):
        for m in MODES:
            t0 = time.perf_counter()
            out = runner.decode([nxt[m]], [caches[m]])[0]
            nxt[m] = int(mx.argmax(out).item())
            if step >= warmup:
                times[m].append(time.perf_counter() - t0)
    res = {"context": ctx, "steps": steps}
    for m in MODES:
        med = statistics.median(times[m])
        res[m] = {"ms_per_token": med * 1e3, "tokens_per_s": 1.0 / med, "cache_bytes": caches[m].nbytes}
    for m in MODES[1:]:
        res[m]["time_vs_fp16"] = res[m]["ms_per_token"] / res["fp16"]["ms_per_token"]
    return res


def markdown(data: dict) -> str:
    lines = [
        "# Decode speed: Q4 vs fp16 KV cache",
        "",
        f"`{data['command']}` on {data['machine']} (MLX {data['mlx']}, CPU, OPENBLAS_NUM_THREADS={data['openblas_threads']}).",
        f"Model {data['model']}, batch 1, greedy.",
        "Median over the steps; the modes take turns token by token. time vs fp16 > 1 means slower.",
        "Timings on a shared or virtual machine are noisy: compare the modes within a row, not across runs.",
        "",
        "| context | mode | ms/token | tokens/s | time vs fp16 | KV cache |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        for m in MODES:
            x = r[m]
            ratio = f"{x['time_vs_fp16']:.3f}" if "time_vs_fp16" in x else "1"
            lines.append(f"| {r['context']} | {m} | {x['ms_per_token']:.2f} | {x['tokens_per_s']:.1f} | {ratio} | {x['cache_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    runner = ModelRunner.load(args.model, args.home or default_home())
    tokens = runner.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    results = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        r = bench_context(runner, tokens, ctx, args.steps, args.warmup)
        results.append(r)
        print(f"ctx {ctx}: " + " | ".join(f"{m} {r[m]['ms_per_token']:.2f} ms" for m in MODES), flush=True)
    data = {
        "command": " ".join(["python", "scripts/bench_decode.py", *sys.argv[1:]]),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "mlx": mx.__version__,
        "model": args.model,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "decode.md").write_text(markdown(data))


if __name__ == "__main__":
    main()
