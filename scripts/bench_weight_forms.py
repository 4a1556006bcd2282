"""Matmul, prefill and decode speed of a model's weights in each form it can run in on MLX's CPU.

Why: `models/model_loader.py` dequantizes the converted 4-bit weights to float32 on CPU;
this measures what each form costs (docs/models.md).

Forms: "quantized" (the converted weights through `quantized_matmul`, scales cast to
float32; "fp16 scales" keeps them as stored), "float32 linear" (Linear layers
dequantized, the embedding and tied head left 8-bit) and "float32" (everything
dequantized: the CPU default).

- layer: the seven projections of layer 0 (q, k, v, o, gate, up, down) on random
  inputs of M = 512 rows (a prefill chunk) and M = 1 (a decode step);
- head: the vocabulary head on one row;
- model: `model.model` over 512 and 2048 random tokens into a fresh mlx-lm KVCache
  (prefill), and the full model one token at a time after a 512-token prefill
  (decode), for the two float32 forms (the quantized form's prefill takes minutes
  per run on CPU; the layer figures show why).

Forms alternate within each repeat; medians with min-max and every sample are kept.
Writes weight_forms.json and weight_forms.md into --out (bench_results/). --quick
measures 64 rows and prefills of 64 and 128 tokens instead (a smoke run: its
numbers are not the figures above).

    python scripts/bench_weight_forms.py [--models NAME ...] [--repeats N] [--quick] [--out DIR]
"""

import mlx_agentcache  # noqa: F401  (loads OpenBLAS before mlx.core)

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

from mlx_agentcache import blas
from mlx_agentcache.models.model_loader import dequantize_layers, to_float32
from mlx_agentcache.models.model_store import resolve_model

OUT = Path(__file__).resolve().parent.parent / "bench_results"
FORMS = {
    "quantized fp16 scales": lambda m: m,
    "quantized": to_float32,
    "float32 linear": lambda m: dequantize_layers(to_float32(m), embeddings=False),
    "float32": lambda m: dequantize_layers(to_float32(m)),
}
LAYER_FORMS = {512: ("quantized", "float32"), 1: ("quantized fp16 scales", "quantized", "float32")}
HEAD_FORMS = ("float32 linear", "float32")  # 8-bit tied head vs float32
MODEL_FORMS = ("float32 linear", "float32")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def in_features(linear) -> int:
    w = linear.weight
    return w.shape[1] * 32 // linear.bits if hasattr(linear, "bits") else w.shape[1]


def timed(fn, inner: int = 1) -> float:
    """Milliseconds per call of fn (its result evaluated), averaged over `inner` calls."""
    t = time.perf_counter()
    for _ in range(inner):
        mx.eval(fn())
    return (time.perf_counter() - t) * 1000 / inner


def layer_ms(model, rows: int) -> float:
    layer = dict(model.model.layers[0].named_modules())
    mods = [layer[p] for p in PROJECTIONS]
    xs = [mx.random.normal((1, rows, in_features(m))) for m in mods]
    mx.eval(xs)
    run = lambda: [m(x) for m, x in zip(mods, xs)]  # noqa: E731
    run()  # warm up
    return timed(run, 1 if rows > 1 else 10)


def head_ms(model) -> float:
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    x = mx.random.normal((1, 1, model.args.hidden_size))
    mx.eval(x)
    head(x)
    return timed(lambda: head(x), 3)


def prefill_tok_s(model, n: int) -> float:
    cache = make_prompt_cache(model)
    x = mx.random.randint(0, 1000, (1, n))
    mx.eval(x)
    ms = timed(lambda: (model.model(x, cache=cache), [c.state for c in cache]))
    return n * 1000 / ms


def decode_tok_s(model, steps: int = 16, context: int = 512) -> float:
    cache = make_prompt_cache(model)
    mx.eval(model.model(mx.random.randint(0, 1000, (1, context)), cache=cache), [c.state for c in cache])
    y = mx.array([[5]])
    mx.eval(model(y, cache=cache))
    t = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(model(y, cache=cache)[:, -1], -1, keepdims=True)
        mx.eval(y)
    return steps / (time.perf_counter() - t)


def spread(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def measure(name: str, repeats: int, rows: int = 512, prefills: tuple[int, ...] = (512, 2048)) -> dict:
    path = resolve_model(name)
    models = {}
    for form, prepare in FORMS.items():
        model, _ = load(str(path))
        prepare(model)
        mx.eval(model.parameters())
        models[form] = model
    tests = [(f"layer_ms/{r}/{form}", lambda m=models[form], r=r: layer_ms(m, r))
             for r, forms in ((rows, LAYER_FORMS[512]), (1, LAYER_FORMS[1])) for form in forms]
    tests += [(f"head_ms/{form}", lambda m=models[form]: head_ms(m)) for form in HEAD_FORMS]
    for form in MODEL_FORMS:
        m = models[form]
        prefill_tok_s(m, 64)  # warm up
        tests += [(f"prefill_tok_s/{n}/{form}", lambda m=m, n=n: prefill_tok_s(m, n)) for n in prefills]
        tests += [(f"decode_tok_s/{form}", lambda m=m: decode_tok_s(m, context=prefills[0]))]
    samples = {key: [] for key, _ in tests}
    for _ in range(repeats):  # every measurement once per repeat, forms side by side
        for key, fn in tests:
            samples[key].append(fn())
    out = {}
    for key, s in samples.items():
        *path_, leaf = key.split("/")
        node = out
        for part in path_:
            node = node.setdefault(part, {})
        node[leaf] = spread(s)
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# Weight forms on MLX's CPU backend ({m['cpu']}, {m['blas']}, {m['date']})", "",
             f"`{data['command']}`: median [min-max] over {data['repeats']} repeats, forms alternating within each.", ""]
    for name, r in data["models"].items():
        lines += [f"## {name}", "", "| measure | form | median | min-max |", "|---|---|---:|---:|"]

        def walk(node, label):
            if "median" in node:
                lines.append(f"| {label.rsplit('/', 1)[0]} | {label.rsplit('/', 1)[1]} | {node['median']:.3g} | "
                             f"{node['min']:.3g}-{node['max']:.3g} |")
                return
            for k, v in node.items():
                walk(v, f"{label}/{k}" if label else k)

        walk(r, "")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="64 rows, prefills of 64 and 128 tokens: checks that it runs")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows, prefills = (64, (64, 128)) if args.quick else (512, (512, 2048))
    t0 = time.time()
    data = {"command": f"python scripts/bench_weight_forms.py --models {' '.join(args.models)} --repeats {args.repeats}" + (" --quick" if args.quick else ""),
            "quick": args.quick,
            "machine": {"cpu": blas.read_cpuinfo().model, "cores": os.cpu_count(), "os": platform.platform(),
                        "blas": blas.CHOICE.summary(), "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")},
            "repeats": args.repeats, "models": {}}
    for name in args.models:
        data["models"][name] = measure(name, args.repeats, rows, prefills)
        print(f"{name} done after {time.time() - t0:.0f} s", flush=True)
    data["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_forms.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "weight_forms.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
