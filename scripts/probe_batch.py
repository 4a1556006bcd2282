"""What limits batched decode: step times at batch 1 and 4, at a long and at a very short context.

    python scripts/probe_batch.py [--models llama3-8b-width-random,llama3-8b-geometry-random]
        [--context 4096] [--short 16] [--repeats 5] [--steps 8] [--quick] [--out DIR]

For each model, agents hold caches of --context tokens and of --short tokens
(random keys and values of the model's shapes, in the runtime's KV mode, each
row its own cache as separate agents have) and decode at batch 1 and batch 4.
The four (context, batch) cells alternate within each repeat, the order
rotating, after an untimed step of each; every step is timed and kept.

At the short context a step costs the weights alone: batching turns the
matrix-vector products into matrix-matrix ones that read each weight once for
all rows. The difference between the two contexts is what the cache costs:
attention reads each row's own cache, nothing is shared. So, per model:

  weights_ms[b]  = step(b, short)
  cache_ms[b]    = step(b, long) - step(b, short)
  speedup        = 4 * step(1, c) / step(4, c) at each context c
  cache_share_b1 = cache_ms[1] / step(1, long)

Models (seeded RANDOM weights; tiny_models.py):
  llama3-8b-width-random     two of Llama 3.1 8B's layers at their true width
                             (hidden 4096, MLP 14336, 32/8 heads of 128): per
                             layer the real model's weights and cache, so its
                             shares and speedups are the real model's on this
                             backend
  llama3-8b-geometry-random  the interleave benchmark's model: the 8B's 32
                             layers of cache on a hidden size of 256

Writes <out>/batch_probe.json and batch_probe.md.
"""

import mlx_agentcache  # noqa: F401  (loads OpenBLAS before mlx.core)

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_agentcache import blas
from mlx_agentcache.config import DEFAULT_KV, default_home
from mlx_agentcache.models.runner import ModelRunner
from bench_interleave import release, spread, synthetic_cache  # scripts/

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 4)


def probe(runner: ModelRunner, context: int, short: int, repeats: int, steps: int) -> dict:
    cells = [(c, b) for c in (context, short) for b in BATCHES]
    rows = {(c, b): [synthetic_cache(runner, [5] * c, seed=i) for i in range(b)] for c, b in cells}
    for cell, caches in rows.items():  # untimed warm-up of each cell
        mx.eval(runner.decode([5] * cell[1], caches))
    release()
    samples = {cell: [] for cell in cells}
    for r in range(repeats):
        for c, b in cells[r % len(cells):] + cells[: r % len(cells)]:
            for cache in rows[(c, b)]:
                cache.trim_to(c)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                mx.eval(runner.decode([5] * b, rows[(c, b)]))
                times.append((time.perf_counter() - t0) * 1000)
            samples[(c, b)].append(times)
    mean = {cell: [statistics.fmean(t) for t in s] for cell, s in samples.items()}  # per repeat
    per_repeat = {  # every derived figure per repeat (one repeat's cells saw the same minute of the machine), then its spread
        "speedup_long": [4 * a / b for a, b in zip(mean[(context, 1)], mean[(context, 4)])],
        "speedup_short": [4 * a / b for a, b in zip(mean[(short, 1)], mean[(short, 4)])],
        "weights_ms_b1": mean[(short, 1)],
        "weights_ms_b4": mean[(short, 4)],
        "cache_ms_b1": [a - b for a, b in zip(mean[(context, 1)], mean[(short, 1)])],
        "cache_ms_b4": [a - b for a, b in zip(mean[(context, 4)], mean[(short, 4)])],
        "cache_share_b1": [(a - b) / a for a, b in zip(mean[(context, 1)], mean[(short, 1)])],
        "cache_share_b4": [(a - b) / a for a, b in zip(mean[(context, 4)], mean[(short, 4)])],
    }
    return {"context": context, "short_context": short,
            "cells": {f"{c}x{b}": {"context": c, "batch": b, "step_ms": spread(mean[(c, b)]),
                                   "step_ms_per_repeat": [[round(x, 3) for x in t] for t in samples[(c, b)]]} for c, b in cells},
            "derived": {k: spread(v) for k, v in per_repeat.items()},
            "derived_per_repeat": {k: [round(x, 4) for x in v] for k, v in per_repeat.items()}}


def limit(d: dict) -> str:
    """Which part of a step keeps batch 4 from 4x at the long context, in words from the medians."""
    x = d["cache_share_b4"]
    share = min(max(x["median"], 0.0), 1.0)
    text = (f"the cache: {share:.0%} of a batch-4 step reads the four rows' caches (attention, nothing shared)"
            if share >= 0.5 else f"the weights: {1 - share:.0%} of a batch-4 step is the weights' matrix products")
    return text + (f" (inside the noise: the repeats' cache shares run from {x['min']:.0%} to {x['max']:.0%})" if x["min"] < 0.5 < x["max"] else "")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# What limits batched decode (scripts/probe_batch.py)", "",
             f"{m['cpu']}, {m['cpus']} cores, MLX {m['mlx']} on {m['device']}, {m['blas']}, load average {m['load_average']} at the start, {m['date']}. "
             f"`{res['command']}`", "",
             f"KV mode {res['kv']}; {res['repeats']} repeats of {res['steps']} timed steps per cell, cells alternating within each repeat; "
             "median (min-max) over the repeats of each repeat's mean step, derived figures computed per repeat. Random weights.", "",
             "| model | context | batch 1 step ms | batch 4 step ms | batch 4 vs 1 tokens/s |", "|---|---|---|---|---|"]
    s = lambda x, k=1: f"{x['median']:.{k}f} ({x['min']:.{k}f}-{x['max']:.{k}f})"  # noqa: E731
    for name, r in res["models"].items():
        for c, key in ((r["context"], "long"), (r["short_context"], "short")):
            lines.append(f"| {name} | {c} | {s(r['cells'][f'{c}x1']['step_ms'])} | {s(r['cells'][f'{c}x4']['step_ms'])} | {s(r['derived'][f'speedup_{key}'], 2)}x |")
    lines += ["", "| model | weights ms, batch 1 / 4 | cache ms at the long context, batch 1 / 4 | cache share of the step, batch 1 / 4 | what limits batch 4 |",
              "|---|---|---|---|---|"]
    for name, r in res["models"].items():
        d = r["derived"]
        lines.append(f"| {name} | {s(d['weights_ms_b1'])} / {s(d['weights_ms_b4'])} | {s(d['cache_ms_b1'])} / {s(d['cache_ms_b4'])} | "
                     f"{s(d['cache_share_b1'], 2)} / {s(d['cache_share_b4'], 2)} | {r['limit']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama3-8b-width-random,llama3-8b-geometry-random")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kv", default=DEFAULT_KV)
    ap.add_argument("--quick", action="store_true", help="small sizes to check the script (numbers not comparable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    if args.quick:
        args.context, args.short, args.repeats, args.steps = 512, 16, 2, 2
    if args.repeats < 1 or args.steps < 1 or not 0 < args.short < args.context:
        ap.error("need --repeats >= 1, --steps >= 1 and 0 < --short < --context")
    home = default_home()
    res = {"command": " ".join(["python", "scripts/probe_batch.py", *sys.argv[1:]]), "quick": args.quick, "kv": args.kv,
           "repeats": args.repeats, "steps": args.steps,
           "machine": {"cpu": blas.read_cpuinfo().model, "cpus": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device()),
                       "blas": blas.CHOICE.summary(), "load_average": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d")},
           "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        runner = ModelRunner.load(name, home, kv_bits=args.kv)
        r = {"random_weights": True, "hidden_size": runner.model.args.hidden_size, "layers": len(runner.model.layers),
             **probe(runner, args.context, args.short, args.repeats, args.steps)}
        r["limit"] = limit(r["derived"])
        res["models"][name] = r
        print(f"{name}: batch 4 vs 1 at {args.context}: {r['derived']['speedup_long']['median']:.2f}x, at {args.short}: "
              f"{r['derived']['speedup_short']['median']:.2f}x; limit: {r['limit']}", flush=True)
        del runner
        release()
        (args.out / "batch_probe.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "batch_probe.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
