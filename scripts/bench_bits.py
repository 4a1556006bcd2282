"""Bits per value of each KV mode at every cache length, from the bytes real caches hold.

    python scripts/bench_bits.py [--models smollm2-135m,gemma3-270m] [--contexts 2048,4096,8192] [--quick]

A cache's bits per value at n tokens is the bytes one layer holds (`LayerCache.nbytes`:
every code, scale, bias, 8-bit tail row and exact sink) over the bytes of the same n
tokens at fp16, times 16. q4c's changes with n: the first tokens are kept exactly
(fp16 sinks), whole 128-token key groups are 4-bit, and the group still filling
waits at 8 bits. So this script grows one real layer cache per mode, a token at a
time as decode does, on each model's key/value geometry (kv heads, head dims, read
from the converted model's config; a full-attention layer), records its bytes after
every token, and averages the bits over every length 1..context. Stored bytes do not
depend on the values (fixed-size codes), so the keys and values are seeded random
numbers. A cache filled by prefill chunks instead (512 tokens) is checked to hold the
same bytes at sampled lengths.

llama.cpp's q4_0 K/V cache: its block size and bytes per block from the gguf
package's table of ggml types (GGML_QUANT_SIZES), the same at every length.

Writes bench_results/bits.json and bench_results/bits.md.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx.core)

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_agentcache import blas
from mlx_agentcache.config import default_home
from mlx_agentcache.kvcache import LayerCache
from mlx_agentcache.models.model_store import resolve_model

ROOT = Path(__file__).resolve().parent.parent
MODES = ("q4c", "q4", "q4k", "q8", "fp16")
PREFILL_CHUNK = 512


def geometry(model: str, home: Path) -> dict:
    """kv heads and key/value head dims of a full-attention layer, from the model's config.json."""
    cfg = json.loads((resolve_model(model, home) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"kv_heads": heads, "key_dim": d, "value_dim": d}


def q4_0_bits() -> dict:
    """llama.cpp's q4_0 block: values per block and bytes per block, as ggml defines them."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    per_block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    return {"values_per_block": per_block, "bytes_per_block": nbytes, "bits_per_value": nbytes * 8 / per_block}


def grown_bytes(mode: str, k: mx.array, v: mx.array) -> list[int]:
    """Bytes of one layer cache after each of the len(k) tokens, appended one at a time."""
    cache, out = LayerCache(mode), []
    for i in range(k.shape[-2]):
        cache.append_dense(k[:, i : i + 1], v[:, i : i + 1])
        out.append(cache.nbytes)
    mx.eval([x for s in cache.segments for x in (*s.keys, *(s.values or ()))])  # the arrays are real, not only shapes
    return out


def prefilled_bytes(mode: str, k: mx.array, v: mx.array, n: int) -> int:
    """Bytes of a layer cache filled with n tokens in prefill chunks."""
    cache = LayerCache(mode)
    for a in range(0, n, PREFILL_CHUNK):
        cache.append_dense(k[:, a : min(n, a + PREFILL_CHUNK)], v[:, a : min(n, a + PREFILL_CHUNK)])
    return cache.nbytes


def summary(bits: list[float], q4_0: float) -> dict:
    above = [n + 1 for n, b in enumerate(bits) if b > q4_0 + 1e-9]
    return {"mean_bits": statistics.fmean(bits), "min_bits": min(bits), "max_bits": max(bits), "bits_at_context": bits[-1],
            "mean_bits_from_128": statistics.fmean(bits[127:]) if len(bits) >= 128 else None,
            "mean_bits_last_128": statistics.fmean(bits[-128:]),  # a cache of about the context's length, wherever it stops
            "lengths_above_q4_0": len(above), "share_of_lengths_above_q4_0": len(above) / len(bits),
            "longest_length_above_q4_0": max(above) if above else None}


def measure(model: str, home: Path, contexts: list[int], q4_0: float) -> dict:
    g = geometry(model, home)
    longest = max(contexts)
    keys = mx.random.split(mx.random.key(0), 2)
    k = mx.random.normal((g["kv_heads"], longest, g["key_dim"]), key=keys[0]).astype(mx.float16)
    v = mx.random.normal((g["kv_heads"], longest, g["value_dim"]), key=keys[1]).astype(mx.float16)
    fp16_token = g["kv_heads"] * (g["key_dim"] + g["value_dim"]) * 2
    res = {"geometry": g, "layer": "one full-attention layer", "modes": {}}
    for mode in MODES:
        t0 = time.perf_counter()
        nbytes = grown_bytes(mode, k, v)
        bits = [16 * b / (fp16_token * (n + 1)) for n, b in enumerate(nbytes)]
        checks = sorted({1, 3, 4, 5, 127, 128, 129, 300, 512, 700, longest} & set(range(1, longest + 1)))
        mismatch = {n: (nbytes[n - 1], prefilled_bytes(mode, k, v, n)) for n in checks}
        mismatch = {n: x for n, x in mismatch.items() if x[0] != x[1]}
        if mismatch:
            raise SystemExit(f"{model} {mode}: a prefilled cache holds other bytes than a grown one at {mismatch}")
        res["modes"][mode] = {"contexts": {str(c): summary(bits[:c], q4_0) for c in contexts},
                              "bytes_at_lengths_checked_by_prefill": checks, "seconds": round(time.perf_counter() - t0, 1)}
        if mode == "q4c":
            res["modes"][mode]["bytes_per_length"] = nbytes  # lengths 1..longest, this layer
        print(f"{model} {mode}: mean {res['modes'][mode]['contexts'][str(longest)]['mean_bits']:.3f} bits over 1..{longest}", flush=True)
    return res


def markdown(data: dict) -> str:
    q = data["llama_cpp_q4_0"]["bits_per_value"]
    lines = ["# Bits per value at every cache length", "",
             f"`{data['command']}` ({data['cpu']}, MLX {data['mlx']}, {data['date']}). The bytes one real layer cache holds after each token "
             "(grown a token at a time; caches filled by prefill chunks checked to hold the same bytes), over fp16's, times 16. "
             "\"1..context\": the mean over every length from 1 to the context; \"last 128\": over the lengths context-127..context "
             "(a cache of about that size, wherever a turn stopped). llama.cpp q4_0: "
             f"{data['llama_cpp_q4_0']['bytes_per_block']} bytes per {data['llama_cpp_q4_0']['values_per_block']} values "
             f"(gguf's table of ggml types), {q:.2f} bits at every length.", "",
             "| model (kv heads x dim) | mode | context | mean, 1..context | mean, 128..context | mean, last 128 | min-max | at the context | lengths above q4_0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, r in data["models"].items():
        g = r["geometry"]
        for mode, m in r["modes"].items():
            ctx = m["contexts"] if mode == "q4c" else {max(m["contexts"], key=int): m["contexts"][max(m["contexts"], key=int)]}
            for c, s in ctx.items():
                lines.append(f"| {model} ({g['kv_heads']} x {g['key_dim']}) | {mode} | {c} | {s['mean_bits']:.3f} | {_f(s['mean_bits_from_128'])} | "
                             f"{s['mean_bits_last_128']:.3f} | {s['min_bits']:.3f}-{s['max_bits']:.3f} | {s['bits_at_context']:.3f} | "
                             f"{s['lengths_above_q4_0']} of {c} |")
    lines += ["", "The other modes store the same bits at every length (one row each). Where q4c spends more than q4_0:", ""]
    lines += [f"- {x}" for x in spends_more(data)]
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def spends_more(data: dict) -> list[str]:
    """Plain statements of q4c's average against q4_0's, per model and context."""
    q, out = data["llama_cpp_q4_0"]["bits_per_value"], []
    for model, r in data["models"].items():
        for c, s in r["modes"]["q4c"]["contexts"].items():
            longest = s["longest_length_above_q4_0"]
            out.append(f"{model}, context {c}: q4c averages {s['mean_bits']:.3f} bits over lengths 1..{c} and {s['mean_bits_last_128']:.3f} over the last 128 "
                       f"(q4_0: {q:.2f} at every length); {s['lengths_above_q4_0']} of the {c} lengths store more than q4_0"
                       + (f", none from {longest + 1} tokens on" if longest and longest < int(c) - 128 else ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="one short context (checks the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    contexts = [512] if args.quick else [int(c) for c in args.contexts.split(",")]
    q4_0 = q4_0_bits()
    data = {"command": " ".join(["python", "scripts/bench_bits.py", *sys.argv[1:]]),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "cpu": blas.read_cpuinfo().model,
            "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "llama_cpp_q4_0": q4_0,
            "models": {m: measure(m, args.home or default_home(), contexts, q4_0["bits_per_value"]) for m in args.models.split(",")}}
    data["headline"] = {m: {c: round(s["mean_bits"], 3) for c, s in r["modes"]["q4c"]["contexts"].items()} for m, r in data["models"].items()}
    data["spends_more"] = spends_more(data)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)  # lists of numbers on one line each: the per-length bytes are long
    (args.out / "bits.json").write_text(re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + ",".join(re.split(r"[,\s]+", m.group(1))) + "]", text) + "\n")
    (args.out / "bits.md").write_text(markdown(data))


if __name__ == "__main__":
    main()
