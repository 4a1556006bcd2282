"""Time to first token: cold (full prefill) vs warm (restore from disk) vs hot.

For each model and context length, an agent holds `ctx` tokens of context
and receives a short new message. We time, median of --repeats runs
(--long-repeats beyond 4K tokens):

  cold   full prefill of context + message, then the first token; the
         prefill rate is (context + message tokens) / cold time
  warm   read our Q4 cache file from disk (page cache dropped for the file),
         prefill the message, first token
  hot    cache already in memory: prefill the message, first token

Peers in the same run, same machine, same thread count:
  mlx-lm    its own prompt cache (fp KVCache) saved with save_prompt_cache,
            restored with load_prompt_cache
  llama.cpp llama-cpp-python on the same GGUF (when installed and the model
            has one): cold time and prefill rate measured the same way, and
            state save/load through a file. Its cold runs alternate with ours
            within each repeat, after one untimed warm-up of each engine.

Contexts: 512 to 4K; Gemma 3 up to 8K, and 16K and 32K with --long (slow on
a CPU). DeepSeek-V2 is the random tiny model: its times show the cache path,
not a real model's speed.

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

from mlx_agentcache import blas
from mlx_agentcache.store import codec
from mlx_agentcache.models.model_store import gguf_file
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.config import default_home

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


def once(fn) -> float:
    """Wall time of fn() in ms."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() in ms, after one untimed call (every engine gets a warm-up)."""
    fn()
    return statistics.median(once(fn) for _ in range(repeats))


def alternated(fns: dict, repeats: int) -> dict:
    """Each fn once untimed, then `repeats` rounds running every fn in turn: {name: [ms, ...]}.

    The engines compared share the machine's noise this way instead of one of them
    getting a quiet minute and the other a busy one."""
    for fn in fns.values():
        fn()
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(once(fn))
    return out


def our_cold(runner: ModelRunner, ctx: list[int], msg: list[int]):
    def cold():
        cache = runner.new_cache()
        runner.prefill(ctx + msg, cache).argmax().item()

    return cold


def ours(runner: ModelRunner, ctx: list[int], msg: list[int], repeats: int, workdir: Path, cold_ms: float) -> dict:
    base = runner.new_cache()
    runner.prefill(ctx, base)
    path = workdir / "agent.safetensors"
    file_bytes = codec.save(path, base, runner.fingerprint)
    template = runner.new_cache().layers

    def warm():
        drop_from_page_cache(path)
        cache, _ = codec.load(path, runner.fingerprint, template)
        runner.prefill(msg, cache).argmax().item()

    def hot():
        runner.prefill(msg, base).argmax().item()
        base.trim_to(len(ctx))

    return {
        "cold_ttft_ms": cold_ms,
        "warm_ttft_ms": timed(warm, repeats),
        "hot_ttft_ms": timed(hot, repeats),
        "prefill_tok_s": (len(ctx) + len(msg)) / cold_ms * 1000,
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


def llama_cpp_model(gguf: Path | None, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    if gguf is None:
        return None
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)


def llama_cpp_cold(llm, ctx: list[int], msg: list[int]):
    def cold():  # same token ids: both sides use the GGUF's vocabulary
        llm.reset()
        llm.eval(ctx + msg)
        last_logits(llm).argmax()

    return cold


def llama_cpp_peer(llm, ctx: list[int], msg: list[int], repeats: int, workdir: Path, cold_ms: float) -> dict:
    from llama_cpp import LlamaState

    text_ctx = ctx
    llm.reset()
    llm.eval(text_ctx)
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

    return {
        "prefill_tok_s": (len(ctx) + len(msg)) / cold_ms * 1000,
        "cold_ttft_ms": cold_ms,
        "warm_ttft_ms": timed(warm, repeats),
        "state_file_bytes": path.stat().st_size,
    }


def contexts_for(name: str, long: bool) -> list[int]:
    if name.startswith("gemma3"):
        return [512, 1024, 2048, 4096, 8192] + ([16384, 32768] if long else [])
    return [512, 1024, 2048, 4096]


def bench_model(name: str, contexts: list[int], repeats: int, long_repeats: int, home: Path) -> dict:
    runner = ModelRunner.load(name, home)
    ids = runner.tokenizer.encode(TEXT.read_text())
    msg = runner.tokenizer.encode(MESSAGE, add_special_tokens=False)
    gguf = gguf_file(name, home)
    runner.prefill(ids[:512], runner.new_cache())  # warm up kernels and allocator once
    rows = {}
    for n in contexts:
        if n > len(ids):
            ids = (ids * (n // len(ids) + 1))
        ctx = ids[:n]
        r = repeats if n <= 4096 else long_repeats
        llm = llama_cpp_model(gguf, len(ctx) + len(msg) + 16)
        colds = {"ours": our_cold(runner, ctx, msg)}
        if llm is not None:
            colds["llama_cpp"] = llama_cpp_cold(llm, ctx, msg)
        cold = alternated(colds, r)
        with tempfile.TemporaryDirectory(dir=home) as d:
            row = {"ours": ours(runner, ctx, msg, r, Path(d), statistics.median(cold["ours"]))}
            row["mlx_lm"] = mlx_lm_peer(runner, ctx, msg, r, Path(d))
            row["llama_cpp"] = llama_cpp_peer(llm, ctx, msg, r, Path(d), statistics.median(cold["llama_cpp"])) if llm else None
        del llm
        row["cold_ms_samples"] = cold
        row["repeats"] = r
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
        "cpu": blas.read_cpuinfo().model,
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": blas.CHOICE.summary(),
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(res: dict) -> str:
    lines = [
        f"# TTFT, {res['model']} ({res['machine']['cpu']}, {res['machine']['cpus']} cores, {res['machine']['device']}, {res['machine']['blas']}, {res['machine']['date']})",
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
    lines += ["", "Median of repeated runs (3 up to 4K tokens, else 2 unless set otherwise: see `repeats` in the JSON); warm reads drop",
              "the file from the page cache first (posix_fadvise DONTNEED). Prefill tok/s = (context + message tokens) / cold time.",
              "Cold prefills of ours and llama.cpp alternate within each repeat after one untimed run of each; every sample is",
              "in the JSON (`cold_ms_samples`).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,deepseek-v2-tiny-random", help="comma separated")
    ap.add_argument("--contexts", default=None, help="comma separated [default: 512-4K; Gemma 3 512-8K]")
    ap.add_argument("--long", action="store_true", help="Gemma 3 also at 16K and 32K tokens (slow on a CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-repeats", type=int, default=2, help="repeats beyond 4K tokens")
    ap.add_argument("--out", default=str(ROOT / "bench_results"))
    args = ap.parse_args()
    home = default_home()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else contexts_for(name, args.long)
        res = bench_model(name, contexts, args.repeats, args.long_repeats, home)
        res["machine"] = machine()
        stem = "ttft_" + name.split("-")[0].replace("/", "_")
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (out / f"{stem}.md").write_text(markdown(res))
        print(json.dumps(res["headline"]))


if __name__ == "__main__":
    main()
