"""Decode time per token with and without a grammar (server/grammar.py), and
the cost of one grammar mask, on SmolLM2-135M and Gemma 3 270M.

Each round decodes a batch of 4 agents together for the same number of
tokens: once with no grammar, once with every agent held to a JSON schema
(a list of 40 integers, so the output is long enough to time). The mask
alone is timed on its own too. Writes grammar.json and grammar.md into --out
(bench_results/).

    python scripts/bench_grammar.py [--out DIR] [--rounds 3] [--models smollm2-135m,gemma3-270m]
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from mlx_agentcache.runtime import Runtime
from mlx_agentcache.server import grammar as gr

SCHEMA = {"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 40, "maxItems": 40}},
          "required": ["numbers"]}
TOKENS = 48
BATCH = 4


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def decode_ms(rt, grammar: str | None, tag: str) -> float:
    """Mean decode ms per token over a batch of BATCH agents."""
    msgs = [{"role": "user", "content": "Write forty numbers as JSON."}]
    prompt = rt.render(msgs)
    handles = []
    for i in range(BATCH):
        c = gr.Constraint(rt.runner, grammar) if grammar else None
        handles.append(rt.agent(f"{tag}-{i}").submit_prompt(prompt, None, max_tokens=TOKENS, temperature=0.0, constraint=c))
    for h in handles:
        h.wait()
    per_token = []
    for h in handles:
        t = h.token_times
        per_token += [(b - a) * 1000 for a, b in zip(t, t[1:])]
    for i in range(BATCH):
        rt.delete(f"{tag}-{i}")
    return statistics.mean(per_token)


def mask_us(rt, grammar: str, n: int = 200) -> float:
    c = gr.Constraint(rt.runner, grammar)
    size = c.n_vocab
    t0 = time.perf_counter()
    for _ in range(n):
        c.allowed(size)
    return (time.perf_counter() - t0) / n * 1e6


def markdown(out: dict) -> str:
    lines = ["# Grammar-constrained decode", "", f"CPU: {out['cpu']} ({out['cores']} cores). A batch of {BATCH} agents decodes {TOKENS} tokens, "
             "free and held to a JSON schema (40 integers), alternating; medians over the rounds.", "",
             "| model | rounds | ms/token free | ms/token grammar | ratio | one mask (us) | vocab |", "|---|---|---|---|---|---|---|"]
    for model, r in out["models"].items():
        lines.append(f"| {model} | {r['rounds']} | {r['decode_ms_per_token_free']:.1f} | {r['decode_ms_per_token_grammar']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['mask_us']:.0f} | {r['vocab']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench_results")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    grammar = gr.json_schema_grammar(SCHEMA, "schema")
    results = {}
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as d, Runtime(model=model, cache_dir=d) as rt:
            t0 = time.perf_counter()
            gr.tokenizer(rt.runner)
            build_s = time.perf_counter() - t0
            decode_ms(rt, None, "warmup")
            free, held = [], []
            for r in range(args.rounds):  # alternated, so drifts in machine load hit both
                free.append(decode_ms(rt, None, f"free{r}"))
                held.append(decode_ms(rt, grammar, f"held{r}"))
            results[model] = {
                "batch": BATCH, "tokens": TOKENS, "rounds": args.rounds,
                "decode_ms_per_token_free": statistics.median(free), "decode_ms_per_token_grammar": statistics.median(held),
                "ratio": statistics.median(h / f for h, f in zip(held, free)),
                "mask_us": mask_us(rt, grammar), "tokenizer_build_s": build_s, "vocab": gr.tokenizer(rt.runner).vocab_size,
                "free_runs": free, "grammar_runs": held,
            }
            print(model, json.dumps({k: v for k, v in results[model].items() if not k.endswith("_runs")}))
            out = {"cpu": cpu(), "cores": os.cpu_count(), "models": results, "schema": SCHEMA}
            (args.out / "grammar.json").write_text(json.dumps(out, indent=2) + "\n")  # after each model: a partial run still counts
            (args.out / "grammar.md").write_text(markdown(out))


if __name__ == "__main__":
    main()
