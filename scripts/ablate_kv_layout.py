"""Which 4-bit KV layout pays: each ingredient alone and combined, before it becomes a cache format.

Keys and values are quantized and dequantized as they enter the cache (a whole
256-token prefill chunk at a time, the chunk's own keys and values included, as
the product's prefill does), and the model (mlx-lm's own definition, float32
weights) attends to the dequantized values. Against an unquantized cache on the
same windows: perplexity change, mean KL(fp || layout) of the next-token
distributions, top-1 agreement. Every window starts as a real prompt does (BOS
for Gemma). Bits per value count codes, fp16 scales and biases, and the tokens
kept at higher precision, at the window length.

Ingredients (literature names in brackets):
  asym gG      per token, groups of G along the head dim, 4-bit codes, fp16 scale + bias (today's q4)
  sym gG       per token, groups of G, fp16 scale only, codes centred on 8 (llama.cpp's q4_0 layout)
  sym-mse gG   sym, and each group keeps the scale (max/8 x f, f in 1..0.75) with the least squared error
  rot          Hadamard rotation of the head dim before quantizing (today's q4k for keys) [QuaRot]
  chan gG      keys per channel, over groups of G tokens; the tokens of an unfilled group at 8 bits [KIVI]
  N sinks      the first N tokens kept at fp16 [StreamingLLM attention sinks]
  mixed B      per token, each token at 2, 3, 4 or 8 bits (asym g64) from its energy under an
               average of B bits per value (bitalloc.py, the cache cards' allocator) [QKVShare]

    python scripts/ablate_kv_layout.py [--models smollm2-135m,gemma3-270m] [--context 2048] [--windows 2]

Writes bench_results/kv_layout_ablation.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (chooses the BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import dequantize_model
from mlx_lm.utils import load as mlx_lm_load

from mlx_agentcache import bitalloc, blas, quality
from mlx_agentcache.config import default_home
from mlx_agentcache.models.model_store import resolve_model

ROOT = Path(__file__).resolve().parent.parent
CODE_TEXT = ROOT / "tests" / "data" / "python_reference.txt"

# name: (keys, values, options); a part is (kind, group, bits)
LAYOUTS = {
    "q4 (today: K, V asym g64)": (("asym", 64, 4), ("asym", 64, 4), {}),
    "q4k (today: K rot asym g64, V asym g64)": (("asym", 64, 4), ("asym", 64, 4), {"krot": True}),
    "K, V sym g32 (q4_0 layout)": (("sym", 32, 4), ("sym", 32, 4), {}),
    "q4 + 4 sinks": (("asym", 64, 4), ("asym", 64, 4), {"sinks": 4}),
    "K chan g64, V asym g64": (("chan", 64, 4), ("asym", 64, 4), {}),
    "K chan g128, V asym g128": (("chan", 128, 4), ("asym", 128, 4), {}),
    "K chan g64, V asym g64, 4 sinks": (("chan", 64, 4), ("asym", 64, 4), {"sinks": 4}),
    "K chan g64, V sym g32, 4 sinks": (("chan", 64, 4), ("sym", 32, 4), {"sinks": 4}),
    "K chan g64, V sym-mse g32, 4 sinks": (("chan", 64, 4), ("sym-mse", 32, 4), {"sinks": 4}),
    "K chan g64, V rot sym g32, 4 sinks": (("chan", 64, 4), ("sym", 32, 4), {"sinks": 4, "vrot": True}),
    "K chan g64, V sym g64, 4 sinks": (("chan", 64, 4), ("sym", 64, 4), {"sinks": 4}),
    "K chan g128, V sym g32, 4 sinks": (("chan", 128, 4), ("sym", 32, 4), {"sinks": 4}),
    "K chan g128, V rot sym g32, 4 sinks": (("chan", 128, 4), ("sym", 32, 4), {"sinks": 4, "vrot": True}),
    "K chan g128, 4 sinks; V exact": (("chan", 128, 4), ("none", 32, 16), {"sinks": 4}),
    "K exact; V rot sym g32, 4 sinks": (("none", 32, 16), ("sym", 32, 4), {"sinks": 4, "vrot": True}),
    "K chan g64, V rot sym g32, 4 sinks, 8-bit recent 64": (("chan", 64, 4), ("sym", 32, 4), {"sinks": 4, "vrot": True}),
    "K, V mixed 4.5 (token-level mixed precision)": (("mixed", 64, 4.5), ("mixed", 64, 4.5), {}),
    "K, V mixed 4.5, 4 sinks": (("mixed", 64, 4.5), ("mixed", 64, 4.5), {"sinks": 4}),
    "K chan g128, V mixed 4.5, 4 sinks": (("chan", 128, 4), ("mixed", 64, 4.5), {"sinks": 4}),
}
RESIDUAL = ("asym", 64, 8)  # channel-wise keys: tokens of a group that has not filled yet


def hadamard(n: int) -> mx.array:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return mx.array(h / math.sqrt(n), dtype=mx.float32)


def fp16(x: mx.array) -> mx.array:
    return x.astype(mx.float16).astype(mx.float32)


def asym(x: mx.array, g: int, bits: int) -> mx.array:
    """MLX's affine layout along the last axis: codes, fp16 scale and bias per group."""
    w, s, b = mx.quantize(x.reshape(-1, x.shape[-1]), group_size=g, bits=bits)
    return mx.dequantize(w, fp16(s), fp16(b), group_size=g, bits=bits).reshape(x.shape)


def sym(x: mx.array, g: int, bits: int, factors=(1.0,)) -> mx.array:
    """Scale = signed max / -2^(bits-1), codes centred on 2^(bits-1); the best of `factors` per group."""
    flat = x.reshape(-1, g)
    peak = mx.take_along_axis(flat, mx.argmax(mx.abs(flat), axis=1, keepdims=True), axis=1)
    half = 2 ** (bits - 1)
    best = err = None
    for f in factors:
        d = fp16(peak * f / -half)
        q = mx.clip(mx.floor(flat * mx.where(d != 0, 1 / d, 0) + half + 0.5), 0, 2 * half - 1)
        y = (q - half) * d
        e = ((y - flat) ** 2).sum(axis=1, keepdims=True)
        best, err = (y, e) if best is None else (mx.where(e < err, y, best), mx.minimum(e, err))
    return best.reshape(x.shape)


def mixed(x: mx.array, budget: float) -> mx.array:
    """Token-level mixed precision: widths from each token's energy (summed over heads) by the
    cards' allocator, then each width's tokens in asym groups of 64."""
    energy = np.asarray(mx.sum(x * x, axis=(0, 1, 3)))
    widths = bitalloc.allocate(energy, budget, x.shape[-1], protect_first=0, protect_last=0)
    out = mx.zeros_like(x)
    for w in np.unique(widths):
        idx = mx.array(np.nonzero(widths == w)[0])
        part = x[:, :, idx]
        out[:, :, idx] = part if w == 16 else asym(part, min(64, x.shape[-1]), int(w))
    return out


def per_token(x: mx.array, part) -> mx.array:
    kind, g, bits = part
    if kind == "none":
        return x
    if kind == "mixed":
        return mixed(x, bits)
    g = min(g, x.shape[-1])
    if kind == "asym":
        return asym(x, g, bits)
    return sym(x, g, bits, (1.0, 0.95, 0.9, 0.85, 0.8, 0.75) if kind == "sym-mse" else (1.0,))


def bits_per_value(layout, head_dim: int, tokens: int) -> float:
    keys, values, opt = layout

    def per_token_bits(part):
        kind, g, bits = part
        if kind == "mixed":
            return bits  # the allocator's budget, met exactly or under
        g = min(g, head_dim)
        return bits + (32 if kind == "asym" else 16) / g

    if keys[0] == "chan":
        full = (tokens // keys[1]) * keys[1]
        kb = (full * (keys[2] + 32 / keys[1]) + (tokens - full) * per_token_bits(RESIDUAL)) / tokens
    else:
        kb = per_token_bits(keys)
    s = min(opt.get("sinks", 0), tokens)
    return ((kb + per_token_bits(values)) * (tokens - s) + 32 * s) / (2 * tokens)


class FakeQuantCache(KVCache):
    """Holds the dequantized keys and values a layout would give back to attention."""

    def __init__(self, layout):
        super().__init__()
        self.kpart, self.vpart, self.opt = layout
        self.k = self.v = self.pending = None  # pending: exact keys of the unfilled channel group
        self.h = None

    def update_and_fetch(self, keys, values):
        keys, values = keys.astype(mx.float32), values.astype(mx.float32)
        if self.h is None:
            self.h = hadamard(keys.shape[-1])
        if self.opt.get("krot"):
            keys = keys @ self.h
        if self.opt.get("vrot"):
            values = values @ self.h
        n_sink = max(0, min(self.opt.get("sinks", 0) - self.offset, keys.shape[2]))
        v = per_token(values[:, :, n_sink:], self.vpart)
        v = mx.concatenate([values[:, :, :n_sink], v], axis=2)
        if self.kpart[0] == "chan":
            k = self._channel_keys(keys, n_sink)
        else:
            k = mx.concatenate([keys[:, :, :n_sink], per_token(keys[:, :, n_sink:], self.kpart)], axis=2)
            k = k if self.k is None else mx.concatenate([self.k, k], axis=2)
        self.k = k
        self.v = v if self.v is None else mx.concatenate([self.v, v], axis=2)
        self.offset += keys.shape[2]
        mx.eval(self.k, self.v)
        k = self.k @ self.h.T if self.opt.get("krot") else self.k
        v = self.v @ self.h.T if self.opt.get("vrot") else self.v
        return k, v

    def _channel_keys(self, keys: mx.array, n_sink: int) -> mx.array:
        """Groups of g tokens per channel (after the sinks); a group is quantized when it fills."""
        _, g, bits = self.kpart
        pend = keys[:, :, n_sink:] if self.pending is None else mx.concatenate([self.pending, keys[:, :, n_sink:]], axis=2)
        settled = 0 if self.k is None else self.k.shape[2] - (0 if self.pending is None else self.pending.shape[2])
        full = (pend.shape[2] // g) * g
        parts = [self.k[:, :, :settled]] if settled else []
        parts.append(keys[:, :, :n_sink])
        if full:
            parts.append(asym(pend[:, :, :full].swapaxes(2, 3), g, bits).swapaxes(2, 3))
        rest = pend[:, :, full:]
        if rest.shape[2]:
            parts.append(per_token(rest, RESIDUAL))
        self.pending = rest if rest.shape[2] else None
        return mx.concatenate(parts, axis=2)


def score(model, windows, layout, reference=None, chunk=256):
    """(ppl, kl, top1, tokens, log-probs when layout is None) over the windows."""
    nll = kl = agree = n = 0.0
    logps = []
    for window in windows:
        cache = [KVCache() if layout is None else FakeQuantCache(layout) for _ in model.layers]
        for a in range(0, len(window) - 1, chunk):
            targets = window[a + 1 : a + 1 + chunk]
            logits = model(mx.array(window[a : a + chunk])[None], cache=cache)[0, : len(targets)].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll += float(-mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1).sum())
            if reference is None:
                mx.eval(lp)
                logps.append(lp)
            else:
                ref = reference[len(logps)]
                logps.append(None)
                kl += float((mx.exp(ref) * (ref - lp)).sum())
                agree += float((mx.argmax(ref, -1) == mx.argmax(lp, -1)).sum())
            n += len(targets)
    return {"ppl": math.exp(nll / n), "kl": kl / n, "top1_agree": agree / n, "tokens": int(n)}, logps


def texts() -> dict[str, str]:
    """Code (the test suite's Python reference text) and prose (CPython's own documentation topics)."""
    import pydoc_data.topics as topics

    return {"code": CODE_TEXT.read_text(), "prose": "\n\n".join(topics.topics[k] for k in sorted(topics.topics))}


def run_model(name: str, context: int, n_windows: int, layouts: list[str], text_names: list[str], chunk: int = 256) -> dict:
    model, tokenizer = mlx_lm_load(str(resolve_model(name, default_home())))
    dequantize_model(model)
    model.set_dtype(mx.float32)
    head_dim = model.args.head_dim if getattr(model.args, "head_dim", None) else model.args.hidden_size // model.args.num_attention_heads
    bos = quality.prompt_bos(tokenizer)
    out = {"model": name, "head_dim": head_dim, "texts": {}}
    corpus = texts()
    for text in text_names:
        ids = tokenizer.encode(corpus[text], add_special_tokens=False)
        size = context - len(bos)
        windows = [bos + ids[i * size : (i + 1) * size] for i in range(n_windows)]
        t = time.perf_counter()
        ref, ref_logps = score(model, windows, None, chunk=chunk)
        rows = {"fp32 cache": {**ref, "bits": 32.0, "seconds": time.perf_counter() - t}}
        for lname in layouts:
            t = time.perf_counter()
            r, _ = score(model, windows, LAYOUTS[lname], ref_logps, chunk=chunk)
            r.update(bits=bits_per_value(LAYOUTS[lname], head_dim, context), ppl_change=r["ppl"] / ref["ppl"] - 1,
                     seconds=time.perf_counter() - t)
            rows[lname] = r
            print(f"{name} {text}: {lname:45s} {r['bits']:.2f} bits  ppl {r['ppl_change'] * 100:+.2f}%  KL {r['kl']:.4f}  "
                  f"top-1 {r['top1_agree']:.3f}", flush=True)
        out["texts"][text] = rows
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# KV layout ablation (fake-quant; {m['cpu']}, {m['date']})", "",
             f"{res['windows']} windows of {res['context']} tokens per text; ppl change and mean KL against a float32 cache on the same windows.",
             "Bits per value count codes, fp16 scales/biases and high-precision tokens at that window length.", ""]
    for model in res["models"]:
        for text, rows in model["texts"].items():
            lines += [f"## {model['model']}, {text} ({rows['fp32 cache']['tokens']} scored tokens, fp32-cache ppl {rows['fp32 cache']['ppl']:.3f})", "",
                      "| layout | bits/value | ppl change | KL | top-1 agree |", "|---|---|---|---|---|"]
            for name, r in rows.items():
                if name != "fp32 cache":
                    lines.append(f"| {name} | {r['bits']:.2f} | {r['ppl_change'] * 100:+.2f}% | {r['kl']:.4f} | {r['top1_agree']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--texts", default="code,prose")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (the product's is 512)")
    ap.add_argument("--layouts", default=None, help="'|'-separated names from LAYOUTS [all]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    layouts = args.layouts.split("|") if args.layouts else list(LAYOUTS)
    res = {"context": args.context, "windows": args.windows,
           "machine": {"cpu": blas.read_cpuinfo().model, "cores": __import__("os").cpu_count(), "blas": blas.CHOICE.summary(),
                       "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")},
           "chunk": args.chunk, "models": [run_model(m, args.context, args.windows, layouts, args.texts.split(","), args.chunk) for m in args.models.split(",")]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_layout_ablation.json").write_text(json.dumps(res, indent=1))
    (args.out / "kv_layout_ablation.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
