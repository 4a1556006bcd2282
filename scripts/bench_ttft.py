"""Time to first token: cold (full prefill) vs warm (restore from disk) vs hot.

For each model and context length, an agent holds `ctx` tokens of context
and receives a short new message. We time, median of --repeats runs:

  cold   full prefill of context + message, then the first token
  warm   read our Q4 cache file from disk (page cache dropped for the file),
         prefill the message, first token
  hot    cache already in memory: prefill the message, first token

Peers in the same run, same machine, same thread count:
  mlx-lm    its own prompt cache (fp KVCache) saved with save_prompt_cache,
            restored with load_prompt_cache
  llama.cpp llama-cpp-python on the same GGUF (when installed and the model
            has one): prefill rate, and state save/load through a file

Writes bench_results/ttft_<model>.json (+ .md) per model, each with a
top-level `headline`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx_agentcache
import mlx.core as mx

from mlx_agentcache import _blas, cachefile
from mlx_agentcache.model_store import gguf_file, resolve_model
from mlx_agentcache.runner import ModelRunner
from mlx_agentcache.runtime import default_home

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "python_reference.txt"
MESSAGE = "\nQuestion: in two sentences, what is the main point of the text above?\n"
THREADS = int(os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count() or 1))  # same count for llama.cpp


def drop_from_page_cache(path: Path) -> None:
    """Make the next read of `path` come from the disk, not from memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() in ms."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def ours(runner: ModelRunner, ctx: list[int], msg: list[int], repeats: int, workdir: Path) -> dict:
    def cold():
        cache = runner.new_cache()
        runner.prefill(ctx + msg, cache).argmax().item()

    def prefill_only():
        cache = runner.new_cache()
        mx.eval(runner.prefill(ctx, cache))

    base = runner.new_cache()
    runner.prefill(ctx, base)
    path = workdir / "agent.safetensors"
    file_bytes = cachefile.save(path, base, runner.fingerprint)
    template = runner.new_cache().layers

    def warm():
        drop_from_page_cache(path)
        cache, _ = cachefile.load(path, runner.fingerprint, template)
        runner.prefill(msg, cache).argmax().item()

    def hot():
        runner.prefill(msg, base).argmax().item()
        base.trim_to(len(ctx))

    cold()  # warm up kernels and allocator once
    prefill_ms = timed(prefill_only, repeats)
    return {
        "cold_ttft_ms": timed(cold, repeats),
        "warm_ttft_ms": timed(warm, repeats),
        "hot_ttft_ms": timed(hot, repeats),
        "prefill_ms": prefill_ms,
        "prefill_tok_s": len(ctx) / prefill_ms * 1000,
        "cache_file_bytes": file_bytes,
        "cache_bytes_per_token": file_bytes / len(ctx),
    }


def mlx_lm_peer(runner: ModelRunner, ctx: list[int], msg: list[int], repeats: int, workdir: Path) -> dict:
    """mlx-lm's own prompt cache: full-precision KVCache saved and loaded by mlx-lm."""
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    model = runner.model
    cache = make_prompt_cache(model)
    for a in range(0, len(ctx), 512):
        mx.eval(model(mx.array(ctx[a : a + 512])[None], cache=cache))
    path = workdir / "mlx_lm_cache.safetensors"
    save_prompt_cache(str(path), cache)

    def warm():
        drop_from_page_cache(path)
        c = load_prompt_cache(str(path))
        model(mx.array(msg)[None], cache=c)[0, -1].argmax().item()

    return {"warm_ttft_ms": timed(warm, repeats), "cache_file_bytes": path.stat().st_size}


def last_logits(llm):
    """llama.cpp keeps only the last position's logits unless logits_all is set."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def llama_cpp_peer(gguf: Path, ctx: list[int], msg: list[int], repeats: int, workdir: Path) -> dict | None:
    try:
        from llama_cpp import Llama, LlamaState
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=len(ctx) + len(msg) + 16, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    text_ctx = ctx  # same token ids: both sides use the GGUF's vocabulary

    def prefill():
        llm.reset()
        llm.eval(text_ctx)

    prefill()
    prefill_ms = timed(prefill, repeats)
    state = llm.save_state()
    path = workdir / "llama_state.bin"
    with open(path, "wb") as f:
        f.write(state.llama_state)
        f.flush()
        os.fsync(f.fileno())

    def warm():
        drop_from_page_cache(path)
        blob = path.read_bytes()
        llm.load_state(LlamaState(state.input_ids, state.scores, state.n_tokens, blob, len(blob), state.seed))
        llm.eval(msg)
        last_logits(llm).argmax()

    def cold():
        llm.reset()
        llm.eval(text_ctx + msg)
        last_logits(llm).argmax()

    out = {
        "prefill_ms": prefill_ms,
        "prefill_tok_s": len(ctx) / prefill_ms * 1000,
        "cold_ttft_ms": timed(cold, repeats),
        "warm_ttft_ms": timed(warm, repeats),
        "state_file_bytes": path.stat().st_size,
    }
    del llm
    return out


def bench_model(name: str, contexts: list[int], repeats: int, home: Path) -> dict:
    runner = ModelRunner.load(name, home)
    ids = runner.tokenizer.encode(TEXT.read_text())
    msg = runner.tokenizer.encode(MESSAGE, add_special_tokens=False)
    gguf = gguf_file(name, home)
    rows = {}
    for n in contexts:
        if n > len(ids):
            ids = (ids * (n // len(ids) + 1))
        ctx = ids[:n]
        with tempfile.TemporaryDirectory(dir=home) as d:
            row = {"ours": ours(runner, ctx, msg, repeats, Path(d))}
            row["mlx_lm"] = mlx_lm_peer(runner, ctx, msg, repeats, Path(d))
            row["llama_cpp"] = llama_cpp_peer(gguf, ctx, msg, repeats, Path(d)) if gguf else None
        o = row["ours"]
        row["speedup_warm"] = o["cold_ttft_ms"] / o["warm_ttft_ms"]
        row["speedup_hot"] = o["cold_ttft_ms"] / o["hot_ttft_ms"]
        if row["llama_cpp"]:
            row["prefill_ratio_vs_llamacpp"] = o["prefill_tok_s"] / row["llama_cpp"]["prefill_tok_s"]
        rows[n] = row
        print(f"{name} ctx {n}: cold {o['cold_ttft_ms']:.0f} ms, warm {o['warm_ttft_ms']:.0f} ms, hot {o['hot_ttft_ms']:.0f} ms, "
              f"prefill {o['prefill_tok_s']:.0f} tok/s" + (f" (llama.cpp {row['llama_cpp']['prefill_tok_s']:.0f})" if row["llama_cpp"] else ""), flush=True)
    ref = 2048 if 2048 in rows else contexts[-1]
    headline = {
        "context": ref,
        f"speedup_warm_{ref // 1024}k" if ref >= 1024 else "speedup_warm": rows[ref]["speedup_warm"],
        f"prefill_ratio_vs_llamacpp_{ref // 1024}k" if ref >= 1024 else "prefill_ratio_vs_llamacpp": rows[ref].get("prefill_ratio_vs_llamacpp"),
    }
    return {"model": name, "model_path": str(runner.path), "headline": headline, "contexts": rows}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": _blas.STATE["blas"],
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(res: dict) -> str:
    lines = [
        f"# TTFT, {res['model']} ({res['machine']['device']}, {res['machine']['blas']}, {res['machine']['cpus']} CPUs, {res['machine']['date']})",
        "",
        "| context | cold ms | warm ms | hot ms | warm speedup | mlx-lm warm ms | llama.cpp cold ms | llama.cpp warm ms | our prefill tok/s | llama.cpp prefill tok/s | ratio | our file KiB | mlx-lm file KiB | llama.cpp state KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in res["contexts"].items():
        o, m, l = r["ours"], r["mlx_lm"], r["llama_cpp"] or {}
        f = lambda x, fmt="{:.0f}": fmt.format(x) if x is not None else "n/a"  # noqa: E731
        lines.append(
            f"| {n} | {f(o['cold_ttft_ms'])} | {f(o['warm_ttft_ms'])} | {f(o['hot_ttft_ms'])} | {r['speedup_warm']:.1f}x | {f(m['warm_ttft_ms'])} | "
            f"{f(l.get('cold_ttft_ms'))} | {f(l.get('warm_ttft_ms'))} | {f(o['prefill_tok_s'])} | {f(l.get('prefill_tok_s'))} | "
            f"{f(r.get('prefill_ratio_vs_llamacpp'), '{:.2f}')} | {o['cache_file_bytes'] / 1024:.0f} | {m['cache_file_bytes'] / 1024:.0f} | {f(l.get('state_file_bytes') and l['state_file_bytes'] / 1024)} |"
        )
    lines += ["", "Median of repeated runs; warm reads drop the file from the page cache first (posix_fadvise DONTNEED).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma separated")
    ap.add_argument("--contexts", default="512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench_results"))
    args = ap.parse_args()
    home = default_home()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        res = bench_model(name, [int(c) for c in args.contexts.split(",")], args.repeats, home)
        res["machine"] = machine()
        stem = "ttft_" + name.split("-")[0].replace("/", "_")
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (out / f"{stem}.md").write_text(markdown(res))
        print(json.dumps(res["headline"]))


if __name__ == "__main__":
    main()
