"""Quality of the KV cache modes and of their peers: perplexity, KL and greedy agreement against fp16.

Two texts of different kinds, code (tests/data/python_reference.txt) and
prose (CPython's documentation topics, `pydoc_data.topics`), are cut into
disjoint windows (by default two of 2K, one of 4K, one of 8K: 16K scored
tokens per text, no window a prefix of another), each starting as a real
prompt does (Gemma's BOS; SmolLM2 has none). Every window is fed
in 512-token chunks through a fresh cache, so later tokens attend to the
quantized keys and values of earlier ones, exactly as the product runs.

Engines, all on the same token ids of the same GGUF weights:
  ours      fp16 (the reference), q4c (the default), and, at the first
            context only, q4, q4k, q8
  mlx-lm    its own model with QuantizedKVCache (4 and 8 bits, groups of
            64) against our fp16, first context only. mlx-lm cannot quantize
            a sliding-window cache (RotatingKVCache), so on Gemma 3 only the
            global layers are quantized: it is favoured there.
  llama.cpp llama-cpp-python with f16 (its own reference), q4_0 and q8_0
            K and V (flash attention, which quantized V needs); q8_0 at the
            first context only
Each quantized engine is compared with the fp16 of its own family. Bits per
value are measured: the stored bytes of each cache over its fp16 bytes.
Greedy agreement: fp16 generates from prompts taken from each text, the
other engine of the family is forced along the same tokens.

    python scripts/bench_quality.py              # the committed results
    python scripts/bench_quality.py --quick      # checks the script: one 512-token window per text

Writes quality.json (with a `headline` per model) and quality.md to --out.
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (before mlx.core: loads the optimized BLAS)

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_agentcache import blas
from mlx_agentcache.config import DEFAULT_KV, default_home
from mlx_agentcache.models.model_store import gguf_file
from mlx_agentcache.models.runner import PREFILL_CHUNK, ModelRunner

ROOT = Path(__file__).resolve().parents[1]
CODE_TEXT = ROOT / "tests" / "data" / "python_reference.txt"
FIRST_ONLY = ["q4", "q4k", "q8", "mlx-lm q4", "mlx-lm q8", "llama.cpp q8_0"]
# Published Q4 KV-cache perplexity changes on much larger models (README's sources).
PUBLISHED = {"llama-3.1-8b": 2.8, "gemma-3-12b": -0.7}


def texts() -> dict[str, str]:
    import pydoc_data.topics as topics

    return {"code": CODE_TEXT.read_text(encoding="utf-8"),
            "prose": "\n\n".join(topics.topics[k] for k in sorted(topics.topics))}


def windows(ids: list[int], context: int, count: int, bos: list[int]) -> list[list[int]]:
    """`count` disjoint windows of `context` tokens, each starting with `bos`."""
    size = context - len(bos)
    if len(ids) < count * size:
        raise ValueError(f"text has {len(ids)} tokens, {count} windows of {context} need {count * size}")
    return [bos + ids[i * size : (i + 1) * size] for i in range(count)]


# -- engines: new_window() then logits(chunk) -> (n, vocab) float32 numpy, in order -------------

class Ours:
    def __init__(self, runner: ModelRunner, mode: str):
        self.runner, self.mode, self.cache = runner, mode, None

    def new_window(self):
        self.cache = self.runner.new_cache(self.mode)

    def logits(self, part: list[int]) -> np.ndarray:
        return np.array(self.runner.logits(part, self.cache, PREFILL_CHUNK).astype(mx.float32))

    def nbytes(self) -> int:
        return self.cache.nbytes


class MlxLm:
    """mlx-lm's own model call and caches; global layers as QuantizedKVCache of `bits`."""

    def __init__(self, runner: ModelRunner, bits: int):
        self.model, self.bits, self.cache = runner.model, bits, None

    def new_window(self):
        from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

        self.cache = [QuantizedKVCache(group_size=64, bits=self.bits) if type(c) is KVCache else c
                      for c in make_prompt_cache(self.model)]

    def logits(self, part: list[int]) -> np.ndarray:
        out = self.model(mx.array(part)[None], cache=self.cache)[0].astype(mx.float32)
        return np.array(out)


class LlamaCpp:
    """llama.cpp through llama-cpp-python; every position's logits read from the context."""

    def __init__(self, gguf: Path, context: int, kv: str):
        import llama_cpp

        types = {"f16": llama_cpp.GGML_TYPE_F16, "q4_0": llama_cpp.GGML_TYPE_Q4_0, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=PREFILL_CHUNK, n_ubatch=PREFILL_CHUNK,
                                   n_threads=blas.CHOICE.threads or 1, n_threads_batch=blas.CHOICE.threads or 1,
                                   type_k=types[kv], type_v=types[kv], flash_attn=True, verbose=False)
        self.n = 0

    def new_window(self):
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        self.n = 0

    def logits(self, part: list[int]) -> np.ndarray:
        self.llm._batch.set_batch(batch=part, n_past=self.n, logits_all=True)
        self.llm._ctx.decode(self.llm._batch)
        self.n += len(part)
        vocab = self.llm.n_vocab()
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(len(part), vocab)).copy()

    def close(self):
        self.llm.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(engines: dict, reference_of: dict, wins: list[list[int]], fp16_bytes_of=None) -> dict:
    """Run every engine over the windows in lockstep, chunk by chunk.

    `reference_of[name]` is the engine whose distribution `name` is compared
    with (itself for a reference). Returns per engine: ppl, kl, top1 and the
    tokens scored, plus bits per value for ours (stored bytes over fp16's)."""
    acc = {n: [0.0, 0.0, 0.0] for n in engines}
    bits = {n: [] for n in engines}
    scored = 0
    for win in wins:
        for e in engines.values():
            e.new_window()
        for a in range(0, len(win) - 1, PREFILL_CHUNK):
            part = win[a : a + PREFILL_CHUNK]
            targets = np.array(win[a + 1 : a + 1 + len(part)])
            n = len(targets)
            refs = {}  # only the references' log-probabilities are kept (a chunk of Gemma's are 0.5 GB)
            for name, e in engines.items():  # references come first in `engines`
                lp = log_softmax(e.logits(part)[:n])
                if reference_of[name] == name:
                    refs[name] = (lp, np.exp(lp), lp.argmax(-1))
                ref, ref_p, ref_top = refs[reference_of[name]]
                acc[name][0] -= float(np.take_along_axis(lp, targets[:, None], axis=1).sum())
                acc[name][1] += float((ref_p * (ref - lp)).sum())
                acc[name][2] += float((ref_top == lp.argmax(-1)).sum())
                del lp
            scored += n
        fp16 = engines.get("fp16")
        for name, e in engines.items():
            if isinstance(e, Ours) and fp16 is not None:
                bits[name].append(16.0 * e.nbytes() / fp16.nbytes())
    return {name: {"ppl": math.exp(a[0] / scored), "kl": a[1] / scored, "top1": a[2] / scored, "tokens": scored,
                   **({"bits": float(np.mean(bits[name]))} if bits[name] else {})}
            for name, a in acc.items()}


def greedy(engines: dict, reference: str, prompt: list[int], n: int) -> dict:
    """The reference engine decodes greedily; each other engine is forced along its tokens."""
    def steps(e, forced=None):
        e.new_window()
        logits, out = e.logits(prompt)[-1], []
        for i in range(n):
            out.append(int(np.argmax(logits)))
            logits = e.logits([forced[i] if forced else out[-1]])[-1]
        return out

    ref = steps(engines[reference])
    res = {}
    for name, e in engines.items():
        if name != reference:
            got = steps(e, ref)
            same = [a == b for a, b in zip(got, ref)]
            res[name] = {"agree": sum(same) / n, "first_diff": same.index(False) if False in same else n}
    return res


def bench_model(name: str, args, progress=None) -> dict:
    """`progress(result so far)` runs after every text and context (the script saves there)."""
    t0 = time.perf_counter()
    runner = ModelRunner.load(name, args.home)
    tok = runner.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id] else []
    gguf = gguf_file(name, args.home)
    out = {"bos": bool(bos), "gguf": gguf.name if gguf else None, "texts": {}}
    for text_name, text in ((t, x) for t, x in texts().items() if t in args.texts.split(",")):
        ids = tok.encode(text, add_special_tokens=False)
        out["texts"][text_name] = {"text_tokens": len(ids), "contexts": {}, "greedy": {}}
        offset = args.skip  # windows of every context are disjoint (and from earlier runs' with --skip)
        for i, (ctx, count) in enumerate(zip(args.contexts, args.windows)):
            wins = windows(ids[offset:], ctx, count, bos)
            offset += count * (ctx - len(bos))
            first = i == 0 and not args.headline_only
            ours = {m: Ours(runner, m) for m in ["fp16", DEFAULT_KV] + (["q4", "q4k", "q8"] if first else [])}
            peers = {f"mlx-lm q{b}": MlxLm(runner, b) for b in ((4, 8) if first else ())}
            engines = {**ours, **peers}
            reference_of = {n: "fp16" for n in engines}
            llama = {}
            if gguf is not None and (first or not args.peers_first_only):
                llama = {f"llama.cpp {kv}": LlamaCpp(gguf, ctx, kv) for kv in (["f16", "q4_0"] + (["q8_0"] if first else []))}
                engines.update(llama)
                reference_of.update({n: "llama.cpp f16" for n in llama})
            r = score(engines, reference_of, wins)
            for e in llama.values():
                e.close()
            for n, v in r.items():
                v["ppl_change_pct"] = 100 * (v["ppl"] / r[reference_of[n]]["ppl"] - 1)
            out["texts"][text_name]["contexts"][str(ctx)] = {"windows": len(wins), "engines": r}
            if progress is not None:
                progress(out)
            print(f"{name} {text_name} ctx {ctx}: {r['fp16']['tokens']} tokens | "
                  + " | ".join(f"{n} {v['ppl_change_pct']:+.2f}% KL {v['kl']:.4f}" for n, v in r.items() if reference_of[n] != n)
                  + f" | {time.perf_counter() - t0:.0f} s", flush=True)
        # greedy continuation from prompts taken from the text
        g_ours = {m: Ours(runner, m) for m in ("fp16", DEFAULT_KV)}
        runs = {"ours": [], "llama.cpp": []}
        gl = {f"llama.cpp {kv}": LlamaCpp(gguf, args.prompt_tokens + args.gen + 8, kv) for kv in ("f16", "q4_0")} if gguf else {}
        for p in range(args.prompts):
            start = (p + 1) * len(ids) // (args.prompts + 1)
            prompt = bos + ids[start : start + args.prompt_tokens - len(bos)]
            runs["ours"].append(greedy(g_ours, "fp16", prompt, args.gen))
            if gl:
                runs["llama.cpp"].append(greedy(gl, "llama.cpp f16", prompt, args.gen))
        for e in gl.values():
            e.close()
        for fam, rs in runs.items():
            for n in (rs[0] if rs else {}):
                out["texts"][text_name]["greedy"][n] = {"agree": sum(r[n]["agree"] for r in rs) / len(rs),
                                                        "first_diff": [r[n]["first_diff"] for r in rs]}
        print(f"{name} {text_name} greedy: " + " | ".join(f"{n} {g['agree']:.3f}" for n, g in out["texts"][text_name]["greedy"].items()), flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def headline(models: dict) -> dict:
    """Per model: the default mode's bits, its worst and mean ppl change and KL over texts and
    contexts, and llama.cpp q4_0's on the same windows; whether ours wins on every text."""
    out = {}
    for name, res in models.items():
        rows = [(t, c, r["engines"]) for t, tr in res["texts"].items() for c, r in tr["contexts"].items()]
        ours = [e[DEFAULT_KV] for _, _, e in rows]
        peer = [e.get("llama.cpp q4_0") for _, _, e in rows]
        h = {"mode": DEFAULT_KV, "bits_per_value": round(max(o["bits"] for o in ours), 3),
             "ppl_change_pct": round(float(np.mean([o["ppl_change_pct"] for o in ours])), 3),
             "ppl_change_worst_pct": round(max(o["ppl_change_pct"] for o in ours), 3),
             "kl": round(float(np.mean([o["kl"] for o in ours])), 5), "kl_worst": round(max(o["kl"] for o in ours), 5),
             "scored_tokens_per_text": min(sum(e[DEFAULT_KV]["tokens"] for t2, _, e in rows if t2 == t) for t in res["texts"])}
        pairs = [(o, p) for o, p in zip(ours, peer) if p is not None]  # where llama.cpp ran
        if pairs:
            h["llama_cpp_q4_0_ppl_change_pct"] = round(float(np.mean([p["ppl_change_pct"] for _, p in pairs])), 3)
            h["ours_where_llama_cpp_ran_ppl_change_pct"] = round(float(np.mean([o["ppl_change_pct"] for o, _ in pairs])), 3)
            h["llama_cpp_q4_0_bits_per_value"] = 4.5
            h["beats_llama_cpp_q4_0_wherever_both_ran"] = all(o["ppl_change_pct"] < p["ppl_change_pct"] for o, p in pairs)
            h["compared_with_llama_cpp_on"] = [f"{t} {c}" for (t, c, e) in rows if e.get("llama.cpp q4_0")]
        h["goal_met"] = h["ppl_change_worst_pct"] < 3.0 and h["kl_worst"] < 0.02 and h["bits_per_value"] <= 4.5
        out[name] = h
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# KV cache quality ({m['cpu']}, {m['date']})", "",
             f"`{data['command']}`. Windows start as prompts do (BOS where the model's tokenizer adds one), fed in "
             f"{PREFILL_CHUNK}-token chunks; ppl change and KL (nats, mean over scored tokens) against the fp16 cache of "
             "the same engine family on the same windows; top-1 = share of positions whose most likely token matches. "
             "Bits per value: stored bytes over fp16 bytes x 16 (ours), nominal for peers.", "",
             "## Headline (default mode)", "",
             "| model | mode | bits/value | ppl change mean (worst) | KL mean (worst) | llama.cpp q4_0 ppl change (same windows) | beats q4_0 wherever both ran | goal (<3%, KL<0.02, <=4.5 bits) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, h in data["headline"].items():
        lines.append(f"| {name} | {h['mode']} | {h['bits_per_value']:.3f} | {h['ppl_change_pct']:+.2f}% ({h['ppl_change_worst_pct']:+.2f}%) | "
                     f"{h['kl']:.4f} ({h['kl_worst']:.4f}) | {h.get('llama_cpp_q4_0_ppl_change_pct', float('nan')):+.2f}% | "
                     f"{h.get('beats_llama_cpp_q4_0_wherever_both_ran')} | {'met' if h['goal_met'] else 'missed'} |")
    lines += ["", "Published Q4 KV-cache ppl changes on much larger models, for scale: "
              + ", ".join(f"{k} {v:+.1f}%" for k, v in PUBLISHED.items()) + " (the product's README cites them).", "",
              "## Every engine", "", "| model | text | context | windows x tokens | engine | bits | ppl | ppl change | KL | top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    nominal = {"mlx-lm q4": 4.5, "mlx-lm q8": 8.5, "llama.cpp f16": 16, "llama.cpp q4_0": 4.5, "llama.cpp q8_0": 8.5}
    for name, res in data["models"].items():
        for t, tr in res["texts"].items():
            for c, r in tr["contexts"].items():
                for n, v in r["engines"].items():
                    b = v.get("bits", nominal.get(n))
                    lines.append(f"| {name} | {t} | {c} | {r['windows']} x {v['tokens'] // r['windows']} | {n} | {b:.2f} | {v['ppl']:.4f} | "
                                 f"{v['ppl_change_pct']:+.2f}% | {v['kl']:.5f} | {v['top1']:.4f} |")
    lines += ["", "## Greedy continuation", "", f"{data['settings']['prompts']} prompts of {data['settings']['prompt_tokens']} tokens per text, "
              f"{data['settings']['gen']} tokens generated by the family's fp16; agree = share of steps with the same greedy choice.", "",
              "| model | text | engine | agree | first difference per prompt |", "|---|---|---|---|---|"]
    for name, res in data["models"].items():
        for t, tr in res["texts"].items():
            for n, g in tr["greedy"].items():
                lines.append(f"| {name} | {t} | {n} | {g['agree']:.3f} | {', '.join(map(str, g['first_diff']))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--windows", default="2,1,1", help="windows per context (default: 16K tokens per text over 2K/4K/8K)")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="checks the script: one 512-token window per text, 1 prompt x 16 tokens")
    ap.add_argument("--peers-first-only", action="store_true", help="llama.cpp at the first context only")
    ap.add_argument("--texts", default="code,prose")
    ap.add_argument("--headline-only", action="store_true", help="ours fp16 and the default mode only")
    ap.add_argument("--skip", type=int, default=0, help="start after this many tokens of each text (to add contexts to an earlier run)")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.windows, args.prompts, args.gen, args.prompt_tokens = "512", "1", 1, 16, 128
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.windows = [int(w) for w in args.windows.split(",")]
    args.home = args.home or default_home()
    data = {"command": " ".join(["python", "scripts/bench_quality.py", *sys.argv[1:]]),
            "machine": {"cpu": blas.read_cpuinfo().model, "cores": __import__("os").cpu_count(), "os": platform.platform(),
                        "blas": blas.CHOICE.summary(), "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")},
            "settings": {"contexts": args.contexts, "windows": args.windows, "prompts": args.prompts,
                         "prompt_tokens": args.prompt_tokens, "gen": args.gen, "chunk": PREFILL_CHUNK},
            "published_q4_ppl_change_pct": PUBLISHED, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save(name, result):  # after every text and context: a long run keeps what it measured
        data["models"][name] = result
        data["headline"] = headline(data["models"])
        (args.out / "quality.json").write_text(json.dumps(data, indent=1))
        (args.out / "quality.md").write_text(markdown(data))

    for m in args.models.split(","):
        save(m, {**bench_model(m, args, lambda partial, m=m: save(m, {**partial, "partial": True})), "partial": False})
    print(json.dumps(data["headline"], indent=1))


if __name__ == "__main__":
    main()
