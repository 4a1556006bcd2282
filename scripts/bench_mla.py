"""DeepSeek-V2 MLA: latent Q4 cache vs mlx-lm's full per-head K/V in Q4.

On the random tiny DeepSeek-V2 (mlx_agentcache.models.tiny_models) we measure, for
both cache layouts: bytes per token held in memory (checked against the
formula) and single-agent greedy decode speed with 1K and 4K tokens of
context (median of --repeats runs of --steps steps each, the two layouts
alternating so that both see the same load on a shared machine). The ratio for
DeepSeek-Coder-V2-Lite's real dimensions is computed from the same formula.

Writes mla.json and mla.md into --out (bench_results/).

    python scripts/bench_mla.py [--contexts 1024 4096] [--steps 32] [--repeats 5] [--out DIR]
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

from mlx_agentcache.models import mla, tiny_models
from mlx_agentcache.models.runner import ModelRunner

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "python_reference.txt"
CODER_V2_LITE = {  # DeepSeek-Coder-V2-Lite attention dimensions (public config.json)
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
}


def load(path: Path, mode: str) -> ModelRunner:
    from mlx_lm.utils import load as mlx_load

    model, tokenizer, config = mlx_load(str(path), return_config=True)
    return ModelRunner(model, tokenizer, config, path, mla_mode=mode)


def decode_rates(runners: dict, ids: list[int], steps: int, repeats: int) -> dict:
    """Per mode: (bytes per token, median decode tokens/s) after prefilling `ids`.

    Modes alternate within each repeat so that both see the same machine load.
    """
    state = {}
    for mode, runner in runners.items():
        cache = runner.new_cache("q4")  # the layout mla.bytes_per_token counts, whatever the default mode
        logits = runner.prefill(ids, cache)
        state[mode] = (cache, int(mx.argmax(logits)), [])
    for _ in range(repeats):
        for mode, runner in runners.items():
            cache, tok, rates = state[mode]
            cache.trim_to(len(ids))
            mx.eval(runner.decode([tok], [cache]))  # warm-up step
            t = time.perf_counter()
            for _ in range(steps):
                tok = int(mx.argmax(runner.decode([tok], [cache])[0]))
            rates.append(steps / (time.perf_counter() - t))
            cache.trim_to(len(ids))
    return {mode: (cache.nbytes / len(ids), statistics.median(rates)) for mode, (cache, _, rates) in state.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_models.build("deepseek-v2-tiny-random", Path(tmp) / "m")
        runners = {mode: load(path, mode) for mode in mla.MODES}
        config = runners["latent"].config
        ids = runners["latent"].tokenizer.encode(TEXT.read_text())
        rows = []
        for ctx in args.contexts:
            for mode, (per_token, rate) in decode_rates(runners, ids[:ctx], args.steps, args.repeats).items():
                assert per_token == mla.bytes_per_token(config, mode)
                rows.append({"context": ctx, "mode": mode, "bytes_per_token": per_token, "decode_tokens_per_s": round(rate, 1)})
                print(rows[-1], flush=True)

    tiny = {m: mla.bytes_per_token(config, m) for m in mla.MODES}
    real = {m: mla.bytes_per_token(CODER_V2_LITE, m) for m in mla.MODES}
    result = {
        "model": "deepseek-v2-tiny-random (RANDOM weights)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device())},
        "steps": args.steps,
        "repeats": args.repeats,
        "tiny_bytes_per_token": tiny,
        "tiny_ratio": tiny["full"] / tiny["latent"],
        "coder_v2_lite_bytes_per_token": real,
        "coder_v2_lite_ratio": round(real["full"] / real["latent"], 2),
        "decode": rows,
    }
    args.out.mkdir(exist_ok=True)
    (args.out / "mla.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# DeepSeek-V2 MLA: latent vs full K/V (Q4 cache)",
        "",
        f"Model: {result['model']}; {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
        f"MLX {result['machine']['mlx']} ({result['machine']['device']}). Decode: median of {args.repeats} runs of {args.steps} steps, one agent; "
        "the layouts alternate run by run, so on a shared machine the columns compare fairly even when absolute rates vary with load.",
        "",
        "| | latent | full | ratio |",
        "|---|---:|---:|---:|",
        f"| tiny random, bytes/token (all layers) | {tiny['latent']} | {tiny['full']} | {result['tiny_ratio']:.2f}x |",
        f"| DeepSeek-Coder-V2-Lite dims, bytes/token | {real['latent']} | {real['full']} | {result['coder_v2_lite_ratio']:.2f}x |",
        "",
        "| context | latent tok/s | full tok/s |",
        "|---:|---:|---:|",
    ]
    for ctx in args.contexts:
        r = {row["mode"]: row["decode_tokens_per_s"] for row in rows if row["context"] == ctx}
        md.append(f"| {ctx} | {r['latent']} | {r['full']} |")
    (args.out / "mla.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
