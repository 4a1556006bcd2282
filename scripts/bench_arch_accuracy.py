"""Next-token distributions with each quantized KV mode against a 16-bit cache, per architecture.

Why: docs/architectures.md states how far each 4-bit layout moves each supported
model's predictions; this measures it, in the setting of tests/test_architectures.py
(the same text, prompt lengths and 17 positions), so the doc's table has a JSON.

For every model: prefill the prompt, then teacher-force the 16 tokens that follow,
and compare the 17 next-token distributions (after the prompt and after each
forced token) with those of the same model on a 16-bit cache: mean and max
KL(16-bit || mode) and top-1 agreement. mlx-lm's own 4-bit `QuantizedKVCache`
(groups of 64) runs beside, against mlx-lm's own unquantized cache, on the models
whose attention mlx-lm runs (not DeepSeek's latent cache). Random models' top-1
is recorded but means little: their distributions are flat. For DeepSeek-V2 the
latent (absorbed) attention is also compared with mlx-lm's full K/V path, both on
16-bit caches: the largest logit difference.

Writes arch_accuracy.json and arch_accuracy.md into --out (bench_results/).

    python scripts/bench_arch_accuracy.py [--models NAME ...] [--tokens N] [--out DIR]
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import argparse
import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from mlx_agentcache import blas
from mlx_agentcache.config import default_home
from mlx_agentcache.models.runner import PREFILL_CHUNK, ModelRunner

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench_results"
TEXT = ROOT / "tests" / "data" / "python_reference.txt"
GEN = 16
N_TOKENS = {"smollm2-135m": 700, "gemma3-270m": 1100, "llama3-tiny-random": 700, "deepseek-v2-tiny-random": 700}
MODES = ("q4c", "q4", "q8")


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def ours(runner: ModelRunner, prompt: list[int], cont: list[int], mode: str) -> mx.array:
    cache = runner.new_cache(mode)
    first = runner.prefill(prompt, cache)
    return mx.concatenate([first[None], runner.logits(cont, cache)], axis=0)


def mlx_lm(runner: ModelRunner, prompt: list[int], cont: list[int], bits: int | None) -> mx.array:
    """mlx-lm's model call and caches (global layers quantized when `bits`), chunked as prefill is."""
    cache = [QuantizedKVCache(group_size=64, bits=bits) if bits and type(c) is KVCache else c
             for c in make_prompt_cache(runner.model)]
    outs = []
    for part in [prompt[a : a + PREFILL_CHUNK] for a in range(0, len(prompt), PREFILL_CHUNK)] + [cont]:
        outs.append(runner.model(mx.array(part)[None], cache=cache)[0].astype(mx.float32))
        mx.eval(outs[-1])
    return mx.concatenate(outs, axis=0)[len(prompt) - 1 :]


def compare(ref: mx.array, got: mx.array) -> dict:
    ref, got = log_softmax(ref), log_softmax(got)
    kl = (mx.exp(ref) * (ref - got)).sum(axis=-1)
    agree = int((mx.argmax(ref, axis=-1) == mx.argmax(got, axis=-1)).sum().item())
    return {"mean_kl": kl.mean().item(), "max_kl": kl.max().item(), "top1": agree, "positions": kl.shape[0]}


def measure(name: str, home: Path, tokens: int | None = None) -> dict:
    n = tokens or N_TOKENS[name]
    runner = ModelRunner.load(name, home)
    ids = runner.tokenizer.encode(TEXT.read_text()[:20000])[: n + GEN]
    prompt, cont = ids[:n], ids[n:]
    ref = ours(runner, prompt, cont, "fp16")
    out = {"prompt_tokens": len(prompt), "modes": {m: compare(ref, ours(runner, prompt, cont, m)) for m in MODES}}
    if runner.config["model_type"] != "deepseek_v2":
        out["mlx_lm_4bit"] = compare(mlx_lm(runner, prompt, cont, None), mlx_lm(runner, prompt, cont, 4))
    else:  # the absorbed latent attention against mlx-lm's full K/V path, both on 16-bit caches
        full = ours(ModelRunner.load(name, home, mla_mode="full"), prompt, cont, "fp16")
        out["mla_latent_vs_full_fp16"] = {"max_abs_logit_diff": mx.abs(ref - full).max().item(),
                                          "logit_std": mx.std(ref, axis=-1).mean().item()}
    return out


def table(results: dict) -> str:
    def cell(r):
        return f"{r['mean_kl']:.3g} / {r['max_kl']:.3g} / {r['top1']}/{r['positions']}"

    rows = ["| model | " + " | ".join(MODES) + " | mlx-lm 4-bit |", "|---|" + "---|" * (len(MODES) + 1)]
    for name, r in results.items():
        peer = cell(r["mlx_lm_4bit"]) if "mlx_lm_4bit" in r else ""
        rows.append(f"| {name} | " + " | ".join(cell(r["modes"][m]) for m in MODES) + f" | {peer} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(N_TOKENS), choices=list(N_TOKENS))
    ap.add_argument("--tokens", type=int, default=None, help="prompt tokens for every model [the tests' own lengths]")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    t0 = time.time()
    results = {name: measure(name, default_home(), args.tokens) for name in args.models}
    data = {
        "command": "python scripts/bench_arch_accuracy.py" + (f" --models {' '.join(args.models)}" if args.models != list(N_TOKENS) else "")
        + (f" --tokens {args.tokens}" if args.tokens else ""),
        "machine": {"cpu": blas.read_cpuinfo().model, "cores": os.cpu_count(), "os": platform.platform(),
                    "blas": blas.CHOICE.summary(), "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")},
        "text": str(TEXT.relative_to(ROOT)), "gen": GEN, "seconds": round(time.time() - t0, 1),
        "models": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arch_accuracy.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "arch_accuracy.md").write_text(
        "# Next-token KL against a 16-bit cache, per architecture\n\n"
        f"`{data['command']}` on {TEXT.name}. Each cell: mean KL / max KL / top-1 agreement over the "
        "distributions after the prompt and after each of the 16 teacher-forced tokens. mlx-lm 4-bit: its own "
        "QuantizedKVCache (groups of 64) against its own unquantized cache.\n\n" + table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
