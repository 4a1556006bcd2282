"""Prefill and decode speed of a model folder with quantized vs float32 weights.

    python scripts/bench_weight_forms.py [model-name-or-path] [--repeats N]

Prefill runs the transformer without the vocab head (`model.model`) over
512 and 2048 random tokens into a fresh mlx-lm KVCache; decode runs the full
model one token at a time after a 512-token prefill. The best of N runs is
reported, which filters out noise from other processes on a shared machine.
"""

import mlx_agentcache  # noqa: F401  (loads OpenBLAS before mlx.core)

import argparse
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

from mlx_agentcache.models.model_loader import dequantize_layers, to_float32
from mlx_agentcache.models.model_store import resolve_model


def prefill(model, n):
    cache = make_prompt_cache(model)
    x = mx.random.randint(0, 1000, (1, n))
    mx.eval(x)
    t = time.perf_counter()
    mx.eval(model.model(x, cache=cache), [c.state for c in cache])
    return n / (time.perf_counter() - t), cache


def decode(model, steps=16):
    _, cache = prefill(model, 512)
    y = mx.array([[5]])
    mx.eval(model(y, cache=cache))
    t = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(model(y, cache=cache)[:, -1], -1, keepdims=True)
        mx.eval(y)
    return steps / (time.perf_counter() - t)


FORMS = {
    "quantized fp32-scales": lambda m: to_float32(m),
    "dequantized linear": lambda m: dequantize_layers(to_float32(m), embeddings=False),
    "dequantized linear+embed": lambda m: dequantize_layers(to_float32(m)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--form", choices=list(FORMS), action="append", help="default: all")
    args = ap.parse_args()
    path = resolve_model(args.model)
    for form in args.form or FORMS:
        prepare = FORMS[form]
        model, _ = load(str(path))
        prepare(model)
        mx.eval(model.parameters())
        prefill(model, 64)  # warm up
        best = {n: max(prefill(model, n)[0] for _ in range(args.repeats)) for n in (512, 2048)}
        dec = max(decode(model) for _ in range(args.repeats))
        print(
            f"{form:26s} prefill512 {best[512]:7.0f} tok/s  prefill2048 {best[2048]:7.0f} tok/s"
            f"  decode {dec:6.1f} tok/s",
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
