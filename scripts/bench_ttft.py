"""Time to first token: cold (full prefill) vs warm (restore from disk) vs hot.

For each model and context length, an agent holds `ctx` tokens of context
and receives a short new message. We time (--repeats, at least 5 by
default; --long-repeats beyond 4K tokens):

  cold   full prefill of context + message, then the first token; the
         prefill rate is (context + message tokens) / cold time
  warm   read our Q4 cache file from disk (page cache dropped for the file),
         prefill the message, first token
  hot    cache already in memory: prefill the message, first token

Peers in the same run, same machine, same thread count:
  mlx-lm    its own prompt cache (fp KVCache) saved with save_prompt_cache,
            restored with load_prompt_cache
  llama.cpp llama-cpp-python on the same GGUF (when installed and the model
            has one), flash attention on as in every llama.cpp peer of the
            benchmarks: cold time and prefill rate measured the same way,
            and state save/load through a file

Every engine and tier runs once untimed, then all of them take turns within
each repeat (the order rotates from repeat to repeat), so a busy minute of
the machine falls on all alike. Every sample is kept (`samples_ms`); the
report gives medians with min-max. The warm speedup is the median of
per-repeat ratios, against our own cold prefill and against llama.cpp's.

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


def alternated(fns: dict, repeats: int) -> dict:
    """Each fn once untimed, then `repeats` rounds running every fn in turn, the order rotated
    by one each round: {name: [ms, ...]}.

    The engines compared share the machine's noise this way instead of one of them
    getting a quiet minute and the other a busy one."""
    for fn in fns.values():
        fn()
    names = list(fns)
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(once(fns[name]))
    return out


def spread(xs: list[float]) -> dict:
    """Median with min and max."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratios(num: list[float], den: list[float]) -> dict:
    """Spread of the per-repeat ratios num[i] / den[i] (both timed in the same repeat)."""
    return spread([a / b for a, b in zip(num, den)])


def our_cold(runner: ModelRunner, ctx: list[int], msg: list[int]):
    def cold():
        cache = runner.new_cache()
        runner.prefill(ctx + msg, cache).argmax().item()

    return cold


def ours(runner: ModelRunner, ctx: list[int], msg: list[int], workdir: Path) -> tuple[dict, dict]:
    """({tier: fn} for warm and hot, facts about our cache file)."""
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

    return {"ours_warm": warm, "ours_hot": hot}, {"cache_file_bytes": file_bytes, "cache_bytes_per_token": file_bytes / len(ctx)}


def mlx_lm_peer(runner: ModelRunner, ctx: list[int], msg: list[int], workdir: Path) -> tuple[dict, dict]:
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

    return {"mlx_lm_warm": warm}, {"cache_file_bytes": path.stat().st_size}


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
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, verbose=False)


def llama_cpp_cold(llm, ctx: list[int], msg: list[int]):
    def cold():  # same token ids: both sides use the GGUF's vocabulary
        llm.reset()
        llm.eval(ctx + msg)
        last_logits(llm).argmax()

    return cold


def llama_cpp_peer(llm, ctx: list[int], msg: list[int], workdir: Path) -> tuple[dict, dict]:
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

    return {"llama_cpp_warm": warm}, {"state_file_bytes": path.stat().st_size}


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
        with tempfile.TemporaryDirectory(dir=home) as d:
            fns, o = ours(runner, ctx, msg, Path(d))
            fns = {"ours_cold": our_cold(runner, ctx, msg), **fns}
            peer_fns, m = mlx_lm_peer(runner, ctx, msg, Path(d))
            fns |= peer_fns
            ll = None
            if llm is not None:
                peer_fns, ll = llama_cpp_peer(llm, ctx, msg, Path(d))
                fns |= {"llama_cpp_cold": llama_cpp_cold(llm, ctx, msg), **peer_fns}
            samples = alternated(fns, r)
        del llm
        med = {k: statistics.median(v) for k, v in samples.items()}
        tokens = len(ctx) + len(msg)
        o |= {"cold_ttft_ms": med["ours_cold"], "warm_ttft_ms": med["ours_warm"], "hot_ttft_ms": med["ours_hot"],
              "prefill_tok_s": tokens / med["ours_cold"] * 1000}
        m |= {"warm_ttft_ms": med["mlx_lm_warm"]}
        if ll is not None:
            ll |= {"cold_ttft_ms": med["llama_cpp_cold"], "warm_ttft_ms": med["llama_cpp_warm"],
                   "prefill_tok_s": tokens / med["llama_cpp_cold"] * 1000}
        row = {"ours": o, "mlx_lm": m, "llama_cpp": ll, "repeats": r, "samples_ms": samples,
               "spread_ms": {k: spread(v) for k, v in samples.items()},
               "cold_ms_samples": {"ours": samples["ours_cold"], **({"llama_cpp": samples["llama_cpp_cold"]} if ll else {})},
               "speedup_warm_spread": ratios(samples["ours_cold"], samples["ours_warm"]),
               "speedup_hot_spread": ratios(samples["ours_cold"], samples["ours_hot"])}
        row["speedup_warm"] = row["speedup_warm_spread"]["median"]
        row["speedup_hot"] = row["speedup_hot_spread"]["median"]
        if ll is not None:  # our warm start against llama.cpp's full prefill, and the two prefill rates
            row["speedup_warm_vs_llamacpp_cold_spread"] = ratios(samples["llama_cpp_cold"], samples["ours_warm"])
            row["speedup_warm_vs_llamacpp_cold"] = row["speedup_warm_vs_llamacpp_cold_spread"]["median"]
            row["prefill_ratio_vs_llamacpp_spread"] = ratios(samples["llama_cpp_cold"], samples["ours_cold"])
            row["prefill_ratio_vs_llamacpp"] = row["prefill_ratio_vs_llamacpp_spread"]["median"]
        rows[n] = row
        print(f"{name} ctx {n}: cold {o['cold_ttft_ms']:.0f} ms, warm {o['warm_ttft_ms']:.0f} ms, hot {o['hot_ttft_ms']:.0f} ms, "
              f"prefill {o['prefill_tok_s']:.0f} tok/s" + (f" (llama.cpp {ll['prefill_tok_s']:.0f})" if ll else ""), flush=True)
    ref = 2048 if 2048 in rows else contexts[-1]
    key = f"_{ref // 1024}k" if ref >= 1024 else ""
    headline = {"context": ref, f"speedup_warm{key}": rows[ref]["speedup_warm"],
                f"speedup_warm_vs_llamacpp_cold{key}": rows[ref].get("speedup_warm_vs_llamacpp_cold"),
                f"prefill_ratio_vs_llamacpp{key}": rows[ref].get("prefill_ratio_vs_llamacpp")}
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
    m = res["machine"]
    lines = [
        f"# TTFT, {res['model']} ({m['cpu']}, {m['cpus']} cores, {m['device']}, {m['blas']}, {m['date']})",
        "",
        "Median (min-max) of the repeats in ms; all engines and tiers take turns within each repeat. Warm speedup: median "
        "(min-max) of per-repeat ratios, our cold prefill / our warm start and llama.cpp's cold prefill / our warm start. "
        "Every sample is in the JSON (`samples_ms`).",
        "",
        "| context | repeats | cold | warm | hot | warm speedup vs our cold | vs llama.cpp's cold | mlx-lm warm | llama.cpp cold | llama.cpp warm | "
        "our prefill tok/s | llama.cpp prefill tok/s | ours / llama.cpp | our file KiB | mlx-lm file KiB | llama.cpp state KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in res["contexts"].items():
        o, mm, ll, sp = r["ours"], r["mlx_lm"], r["llama_cpp"] or {}, r["spread_ms"]
        t = lambda k: f"{sp[k]['median']:.0f} ({sp[k]['min']:.0f}-{sp[k]['max']:.0f})" if k in sp else "n/a"  # noqa: E731
        x = lambda k: f"{r[k]['median']:.1f}x ({r[k]['min']:.1f}-{r[k]['max']:.1f})" if k in r else "n/a"  # noqa: E731
        f = lambda v, fmt="{:.0f}": fmt.format(v) if v is not None else "n/a"  # noqa: E731
        lines.append(
            f"| {n} | {r['repeats']} | {t('ours_cold')} | {t('ours_warm')} | {t('ours_hot')} | {x('speedup_warm_spread')} | "
            f"{x('speedup_warm_vs_llamacpp_cold_spread')} | {t('mlx_lm_warm')} | {t('llama_cpp_cold')} | {t('llama_cpp_warm')} | "
            f"{f(o['prefill_tok_s'])} | {f(ll.get('prefill_tok_s'))} | {f(r.get('prefill_ratio_vs_llamacpp'), '{:.2f}')} | "
            f"{o['cache_file_bytes'] / 1024:.0f} | {mm['cache_file_bytes'] / 1024:.0f} | {f(ll.get('state_file_bytes') and ll['state_file_bytes'] / 1024)} |"
        )
    lines += ["", "Warm reads drop the file from the page cache first (posix_fadvise DONTNEED). Prefill tok/s = (context + message "
              "tokens) / median cold time; ours / llama.cpp is the median of per-repeat ratios of the two prefill rates. "
              "llama.cpp runs with flash attention, as in the decode and quality benchmarks.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,deepseek-v2-tiny-random", help="comma separated")
    ap.add_argument("--contexts", default=None, help="comma separated [default: 512-4K; Gemma 3 512-8K]")
    ap.add_argument("--long", action="store_true", help="Gemma 3 also at 16K and 32K tokens (slow on a CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--long-repeats", type=int, default=5, help="repeats beyond 4K tokens")
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
