"""Decode attention over a Q4 cache on an Apple GPU: the fused kernel against MLX's own routes.

For each model shape and context length, one decode step (one query token per
sequence) over a random Q4 cache, timed four ways:

- fused: kernels/decode_attention.metal + decode_combine.metal (`metal_kernels`),
- quantized_matmul: scores and values with `mx.quantized_matmul` (the portable path),
- dequantize + sdpa: `mx.dequantize` of keys and values, then
  `mx.fast.scaled_dot_product_attention`,
- fp16 sdpa: `mx.fast.scaled_dot_product_attention` over an fp16 cache (no Q4 at all),
  for scale.

Each route's output is compared with the portable path first (max error
relative to the largest output value; for fp16 sdpa that is the Q4
quantization error itself, not a kernel error). The time is the median over repeats of
`--calls` evaluated calls; "GB/s" is the Q4 cache bytes (fp16 bytes for the
fp16 route) divided by that time, and "bound" the time to read the Q4 cache
once at the M4 Pro's 273 GB/s (see kernels/README.md).

    python scripts/bench_metal.py [--contexts 1024,4096,16384,32768] [--batch 1] [--calls 20]

Needs a Mac with Metal; elsewhere it says so and exits with status 2.
Writes bench_results/metal.json and metal.md.
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (before mlx.core: loads the optimized BLAS)

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
M4_PRO_BANDWIDTH = 273e9  # bytes/s, Apple's published M4 Pro memory bandwidth
SHAPES = {
    # name: (query heads, kv heads, head dim)
    "smollm2-135m": (9, 3, 64),
    "gemma3-270m": (4, 1, 256),
    "llama3-8b": (32, 8, 128),
}


def timed(fn, calls: int, repeats: int) -> float:
    """Median seconds per evaluated call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            mx.eval(fn())
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def bench_one(shape: str, n: int, batch: int, calls: int, repeats: int) -> dict:
    from mlx_agentcache import metal_kernels, q4_format

    h, n_kv, d = SHAPES[shape]
    key = mx.random.key(n)
    kk, kv, kq_ = mx.random.split(key, 3)
    k16 = (mx.random.normal((batch, n_kv, n, d), key=kk) * 2).astype(mx.float16)
    v16 = mx.random.normal((batch, n_kv, n, d), key=kv).astype(mx.float16)
    queries = mx.random.normal((batch, h, 1, d), key=kq_).astype(mx.float16)
    kq, vq = q4_format.quantize(k16), q4_format.quantize(v16)
    mx.eval(k16, v16, queries, *kq, *vq)
    scale = d**-0.5

    def dequant_sdpa():
        k = mx.dequantize(*kq, group_size=64, bits=4)
        v = mx.dequantize(*vq, group_size=64, bits=4)
        return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale)

    routes = {
        "fused": lambda: metal_kernels.decode_attention(queries, kq, vq, scale),
        "quantized_matmul": lambda: q4_format.decode_attention_q4(queries, kq, vq, scale),
        "dequantize + sdpa": dequant_sdpa,
        "fp16 sdpa": lambda: mx.fast.scaled_dot_product_attention(queries, k16, v16, scale=scale),
    }
    reference = q4_format.decode_attention_q4(queries, kq, vq, scale).astype(mx.float32)
    top = mx.max(mx.abs(reference)).item()
    q4_bytes = batch * n * q4_format.bytes_per_token(n_kv, d, d)
    fp16_bytes = batch * n * n_kv * d * 2 * 2
    row = {"shape": shape, "heads": h, "kv_heads": n_kv, "head_dim": d, "context": n, "batch": batch,
           "q4_cache_bytes": q4_bytes, "bound_ms_m4_pro": 1e3 * q4_bytes / M4_PRO_BANDWIDTH, "routes": {}}
    plan = metal_kernels.decode_plan(mx.float16, d, d, h // n_kv)
    row["fused_plan"] = plan._asdict() if plan else None
    row["fused_splits"] = metal_kernels.split_count(n_kv * plan.tiles * batch, n) if plan else None
    for name, fn in routes.items():
        try:
            err = mx.max(mx.abs(fn().astype(mx.float32) - reference)).item() / top
            seconds = timed(fn, calls, repeats)
        except Exception as e:  # a route that fails is reported, the others still run
            row["routes"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        nbytes = fp16_bytes if name == "fp16 sdpa" else q4_bytes
        row["routes"][name] = {"ms": 1e3 * seconds, "gb_per_s": nbytes / seconds / 1e9, "rel_error": err}
    return row


def markdown(result: dict) -> str:
    lines = [
        "# Q4 decode attention on Apple GPU",
        "",
        (f"Device: {result['device']}; MLX {result['mlx']}; {result['platform']}; batch {result['batch']}. "
         "Times are the median per evaluated call; GB/s counts the Q4 cache bytes (fp16 bytes for fp16 sdpa); "
         "bound is the Q4 cache read once at the M4 Pro's 273 GB/s."),
        "",
        ("| shape | context | bound ms | fused ms | quantized_matmul ms | dequantize + sdpa ms | fp16 sdpa ms "
         "| fused GB/s | fused rel. error |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def ms(r: dict, name: str) -> str:
        return f"{r[name]['ms']:.3f}" if "ms" in r.get(name, {}) else r.get(name, {}).get("error", "-")

    for row in result["rows"]:
        r = row["routes"]
        fused = r.get("fused", {})
        lines.append(
            f"| {row['shape']} (H={row['heads']}, kv={row['kv_heads']}, D={row['head_dim']}) | {row['context']} "
            f"| {row['bound_ms_m4_pro']:.3f} | {ms(r, 'fused')} | {ms(r, 'quantized_matmul')} | {ms(r, 'dequantize + sdpa')} "
            f"| {ms(r, 'fp16 sdpa')} | {fused.get('gb_per_s', float('nan')):.0f} | {fused.get('rel_error', float('nan')):.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench_results"))
    args = ap.parse_args(argv)
    if not mx.metal.is_available():
        print("bench_metal.py measures the Metal kernels and needs a Mac with an Apple GPU; "
              "mx.metal.is_available() is False on this machine, so nothing was measured.", file=sys.stderr)
        return 2
    mx.set_default_device(mx.gpu)
    rows = []
    for shape in args.shapes.split(","):
        for n in map(int, args.contexts.split(",")):
            row = bench_one(shape, n, args.batch, args.calls, args.repeats)
            print(json.dumps({k: row[k] for k in ("shape", "context")} | {
                name: round(v["ms"], 3) if "ms" in v else v["error"] for name, v in row["routes"].items()}))
            rows.append(row)
    info = mx.metal.device_info()
    result = {"device": str(info.get("device_name", info.get("architecture", "Apple GPU"))),
              "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()},
              "mlx": mx.__version__, "platform": platform.platform(), "batch": args.batch,
              "m4_pro_bandwidth_bytes_per_s": M4_PRO_BANDWIDTH, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metal.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "metal.md").write_text(markdown(result))
    print(f"wrote {out / 'metal.json'} and {out / 'metal.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
