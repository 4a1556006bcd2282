"""Decode speed with our KV cache modes against mlx-lm's own cache and llama.cpp, at several context lengths.

The baseline is mlx-lm's plain `KVCache` (its own attention, the model's
dtype: float32 on the CPU backend), filled by mlx-lm's own prefill.
llama.cpp (llama-cpp-python, when installed) runs the same GGUF with its K/V
cache in f16 and in q4_0 (flash attention, which quantized V needs), the
same thread count, after its own prefill of the same token ids. For our
modes the reference text is prefilled once with an fp16 agent cache and the
other modes get the same keys and values re-encoded (decode cost does not
depend on what the cache holds). Then every engine decodes greedily in turn,
one token each per round after untimed warm-up steps, so a busy machine slows
them alike; each step is one sample: median time per token with the
interquartile range and min-max, every sample kept in the JSON
(`samples_ms`).

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

from mlx_agentcache import blas
from mlx_agentcache.kvcache import KV_MODES, AgentCache, LayerCache
from mlx_agentcache.config import default_home
from mlx_agentcache.models.model_store import gguf_file
from mlx_agentcache.models.runner import ModelRunner
from bench_ttft import last_logits  # scripts/: llama.cpp's logits of the last position

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "python_reference.txt"
OURS = [m for m in ("fp16", "q4c", "q4", "q4k") if m in KV_MODES]
MODES = ["mlx_lm", *OURS]  # mlx_lm: mlx-lm's own KVCache, the baseline
LLAMA_CPP = ("llama_cpp_f16", "llama_cpp_q4_0")
Q4_0_PER_F16 = 18 / 64  # a q4_0 block: 32 values in 18 bytes (16 of codes, an fp16 scale); f16: 64 bytes


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


def mlx_lm_cache(runner: ModelRunner, tokens: list[int]):
    """mlx-lm's own prompt cache after its own chunked prefill of `tokens`."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(runner.model)
    for a in range(0, len(tokens), 512):
        mx.eval(runner.model(mx.array(tokens[a : a + 512])[None], cache=cache))
    return cache


def mlx_lm_step(runner: ModelRunner, cache, token: int) -> mx.array:
    return runner.model(mx.array([[token]]), cache=cache)[0, -1]


class LlamaCppDecoder:
    """llama.cpp on the model's GGUF: its own prefill of the context, then one greedy token per step."""

    def __init__(self, gguf: Path, tokens: list[int], kv: str, n_ctx: int):
        import llama_cpp

        t = {"f16": llama_cpp.GGML_TYPE_F16, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[kv]
        threads = blas.CHOICE.threads or 1
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   type_k=t, type_v=t, flash_attn=True, verbose=False)
        self.llm.eval(tokens)

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return int(last_logits(self.llm).argmax())

    def close(self) -> None:
        self.llm.close()


def llama_cpp_decoders(model: str, tokens: list[int], n_ctx: int) -> dict:
    """{engine: decoder} for llama.cpp's f16 and q4_0 caches; empty without llama-cpp-python or a GGUF."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {}
    gguf = gguf_file(model)
    if gguf is None:
        return {}
    return {f"llama_cpp_{kv}": LlamaCppDecoder(gguf, tokens, kv, n_ctx) for kv in ("f16", "q4_0")}


def bench_context(runner: ModelRunner, model: str, tokens: list[int], ctx: int, steps: int, warmup: int) -> dict:
    base = runner.new_cache("fp16")
    logits = runner.prefill(tokens[:ctx], base)
    first = int(mx.argmax(logits).item())
    caches = {m: (base if m == "fp16" else reencode(base, m)) for m in OURS}
    caches["mlx_lm"] = mlx_lm_cache(runner, tokens[:ctx])
    peers = llama_cpp_decoders(model, tokens[:ctx], ctx + warmup + steps + 8)
    engines = MODES + list(peers)
    nxt = {m: first for m in engines}
    times = {m: [] for m in engines}
    for step in range(warmup + steps):
        for m in engines:
            t0 = time.perf_counter()
            if m in peers:
                nxt[m] = peers[m].step(nxt[m])
            else:
                out = mlx_lm_step(runner, caches[m], nxt[m]) if m == "mlx_lm" else runner.decode([nxt[m]], [caches[m]])[0]
                nxt[m] = int(mx.argmax(out).item())
            if step >= warmup:
                times[m].append(time.perf_counter() - t0)
    res = {"context": ctx, "steps": steps, "warmup_steps": warmup}
    for m in engines:
        q = statistics.quantiles(times[m], n=4)
        med = statistics.median(times[m])
        if m in peers:  # computed from our fp16 cache: the same K/V values at f16 (64 bytes per 32) or q4_0 (18 bytes per 32)
            nbytes, computed = base.nbytes * (1.0 if m.endswith("f16") else Q4_0_PER_F16), True
        else:
            nbytes, computed = (sum(c.nbytes for c in caches[m]) if m == "mlx_lm" else caches[m].nbytes), False
        res[m] = {"ms_per_token": med * 1e3, "iqr_ms": [q[0] * 1e3, q[2] * 1e3], "min_max_ms": [min(times[m]) * 1e3, max(times[m]) * 1e3],
                  "samples_ms": [round(t * 1e3, 3) for t in times[m]], "tokens_per_s": 1.0 / med, "cache_bytes": nbytes,
                  **({"cache_bytes_computed": True} if computed else {})}
    for m in engines[1:]:
        res[m]["time_vs_mlx_lm"] = res[m]["ms_per_token"] / res["mlx_lm"]["ms_per_token"]
        if m != "fp16" and m in OURS:
            res[m]["time_vs_fp16"] = res[m]["ms_per_token"] / res["fp16"]["ms_per_token"]
    if "llama_cpp_q4_0" in peers:
        for m in OURS:
            res[m]["time_vs_llama_cpp_q4_0"] = res[m]["ms_per_token"] / res["llama_cpp_q4_0"]["ms_per_token"]
    for d in peers.values():
        d.close()
    return res


def markdown(data: dict) -> str:
    lines = [
        "# Decode speed: our KV cache modes vs mlx-lm's own KVCache and llama.cpp",
        "",
        f"`{data['command']}` on {data['machine']} ({data['cpu']}, MLX {data['mlx']}, {data['device']}, {data['blas']}).",
        f"Model {data['model']}, batch 1, greedy. Baseline `mlx_lm`: mlx-lm's own KVCache and attention (float32 on this backend).",
        "`llama_cpp_f16` / `llama_cpp_q4_0`: llama.cpp on the same GGUF with that K/V cache type, flash attention, the same threads.",
        "Median over the steps with the interquartile range and min-max (every step in `samples_ms`); the engines take turns token by token after untimed warm-up steps.",
        "time vs > 1 means slower. Timings on a shared or virtual machine are noisy: compare within a row, not across runs.",
        "llama.cpp's cache sizes are computed (the same values at f16, or q4_0's 18 bytes per 32 values: 18/64 of f16), not read from it.",
        "",
        "| context | cache | ms/token (IQR) | min-max ms | tokens/s | time vs mlx-lm | time vs our fp16 | time vs llama.cpp q4_0 | KV cache MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        for m in [m for m in (*MODES, *LLAMA_CPP) if m in r]:
            x = r[m]
            vs_lm = f"{x['time_vs_mlx_lm']:.3f}" if "time_vs_mlx_lm" in x else "1"
            vs16 = f"{x['time_vs_fp16']:.3f}" if "time_vs_fp16" in x else ""
            vsq = f"{x['time_vs_llama_cpp_q4_0']:.3f}" if "time_vs_llama_cpp_q4_0" in x else ""
            lines.append(f"| {r['context']} | {m} | {x['ms_per_token']:.2f} ({x['iqr_ms'][0]:.2f}-{x['iqr_ms'][1]:.2f}) | "
                         f"{x['min_max_ms'][0]:.2f}-{x['min_max_ms'][1]:.2f} | {x['tokens_per_s']:.1f} | "
                         f"{vs_lm} | {vs16} | {vsq} | {x['cache_bytes'] / 2**20:.2f}{' (computed)' if x.get('cache_bytes_computed') else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="one short context, few steps (checks the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.steps, args.warmup = "256", 8, 2
    runner = ModelRunner.load(args.model, args.home or default_home())
    tokens = runner.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    results = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        r = bench_context(runner, args.model, tokens, ctx, args.steps, args.warmup)
        results.append(r)
        print(f"ctx {ctx}: " + " | ".join(f"{m} {r[m]['ms_per_token']:.2f} ms" for m in (*MODES, *LLAMA_CPP) if m in r), flush=True)
    data = {
        "command": " ".join(["python", "scripts/bench_decode.py", *sys.argv[1:]]),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "mlx": mx.__version__,
        "cpu": blas.read_cpuinfo().model,
        "device": str(mx.default_device()),
        "blas": blas.CHOICE.summary(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "results": results,
    }
    last = results[-1]
    data["headline"] = {"context": last["context"], **{f"{m}_time_vs_mlx_lm": round(last[m]["time_vs_mlx_lm"], 3) for m in OURS}}
    if "llama_cpp_q4_0" in last:
        data["headline"] |= {f"{m}_time_vs_llama_cpp_q4_0": round(last[m]["time_vs_llama_cpp_q4_0"], 3) for m in OURS}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "decode.md").write_text(markdown(data))


if __name__ == "__main__":
    main()
