"""Quality of the KV cache modes and of their peers: perplexity, KL and greedy agreement against fp16.

Texts (`TEXTS`), each labelled by its role:
  tuning    code (tests/data/python_reference.txt, the test suite's own data)
            and prose (CPython's `pydoc_data.topics`): q4c's layout was
            chosen on their first 2K windows
  held-out  nothing was tuned on them; fetched at run time from Debian
            packages (`apt-get download` into <home>/texts, never committed):
            the GNU Coding Standards (gnu-standards, GFDL 1.3) and the Linux
            man-pages of section 7 (manpages, roff markup stripped)
Each text is cut into windows that do not overlap, by default 8 of 2K,
4 of 4K and 2 of 8K (16,376 to 16,382 scored tokens per text and context),
in one run the contexts continuing where the previous one stopped (a text
too short for all of them starts over from its beginning; a run of one
context starts at the beginning; the start of every window is in the
JSON). Each window starts as a real prompt does (Gemma's BOS;
SmolLM2 has none) and is fed in 512-token chunks through a fresh cache, so
later tokens attend to the quantized keys and values of earlier ones,
exactly as the product runs.

Engines, all on the same token ids of the same GGUF weights:
  ours      fp16 (the reference), q4c (the default), and, at the first
            context only, --extra-modes (q4, q4k, q8)
  mlx-lm    its own model with QuantizedKVCache (4 and 8 bits, groups of
            64) against our fp16. mlx-lm cannot quantize a sliding-window
            cache (RotatingKVCache), so on Gemma 3 only the global layers
            are quantized: it is favoured there. On the CPU its attention
            over the quantized cache dequantizes first and runs float
            matmuls (`dequantized_attention`, the same values to float
            rounding), since mlx's CPU quantized_matmul is far slower; the
            JSON records which ran (`mlx_lm_attention`).
  llama.cpp llama-cpp-python with f16 (its own reference), q4_0 and q8_0
            K and V, flash attention on (quantized V needs it; every
            llama.cpp peer of the benchmarks runs with it), on every core:
            only its outputs are compared here, never its speed
The peers (--peers) run on every window of every context. Each quantized
engine is compared with the fp16 of its own family. Bits per value are
measured: the stored bytes of each cache over its fp16 bytes. Greedy
agreement: fp16 generates from prompts taken from each text, the other
engine of the family is forced along the same tokens.

    python scripts/bench_quality.py              # every text, model, context and peer (hours on a CPU)
    python scripts/bench_quality.py --texts gnu-standards,man-pages --contexts 2048 --windows 8
    python scripts/bench_quality.py --quick      # checks the script: one 512-token window of one tuning and one held-out text
    python scripts/bench_quality.py --texts man-pages --contexts 2048 --windows 8 --peers "llama.cpp q8_0" --peers-only --prompts 0
                                                 # a peer alone (mlx-lm's with our fp16), to --merge into an earlier run of the same windows

Writes quality.json (with a `headline` per model) and quality.md to --out.
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (before mlx.core: loads the optimized BLAS)

import argparse
import gzip
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_agentcache import blas, quality
from mlx_agentcache.config import DEFAULT_KV, default_home
from mlx_agentcache.models.model_store import gguf_file
from mlx_agentcache.models.runner import PREFILL_CHUNK, ModelRunner

ROOT = Path(__file__).resolve().parents[1]
CODE_TEXT = ROOT / "tests" / "data" / "python_reference.txt"
PEERS = ("mlx-lm q4", "mlx-lm q8", "llama.cpp q4_0", "llama.cpp q8_0")
# Published Q4 KV-cache perplexity changes on much larger models (README's sources).
PUBLISHED = {"llama-3.1-8b": 2.8, "gemma-3-12b": -0.7}


@dataclass(frozen=True)
class Text:
    role: str  # "tuning" (q4c's layout was chosen on it) or "held-out"
    source: str
    licence: str
    load: object  # (cache directory) -> str


def _pydoc_topics(_cache: Path) -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def debian_package(package: str, cache: Path) -> Path:
    """The unpacked files of a Debian package, downloaded once into `cache` with apt-get."""
    root = cache / package
    done = root / ".unpacked"
    if done.exists():
        return root / "files"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise SystemExit(f"the held-out text comes from the Debian package {package}: this needs apt-get and dpkg-deb "
                         "(Debian or Ubuntu); choose other texts with --texts")
    root.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
    if got.returncode and os.geteuid() == 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        got = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
    debs = sorted(root.glob(f"{package}_*.deb"))
    if got.returncode or not debs:
        raise SystemExit(f"apt-get download {package} failed ({got.stderr.strip()[-300:]}); run `apt-get update` first")
    shutil.rmtree(root / "files", ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root / "files")], check=True)
    done.write_text(debs[-1].name + "\n")
    return root / "files"


def _gnu_standards(cache: Path) -> str:
    return gzip.decompress((debian_package("gnu-standards", cache) / "usr/share/doc/gnu-standards/standards.text.gz").read_bytes()).decode("utf-8")


FONT_MACROS = {"B", "I", "SM", "SB"}  # arguments joined with spaces
ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}  # arguments joined without


def deroff(page: str) -> str:
    """The running text of a man page: requests and tables (tbl) dropped, font macros and escapes resolved."""
    out, table = [], False
    for line in page.splitlines():
        if line.startswith((".TS", ".TE")):
            table = line.startswith(".TS")
            continue
        if table or line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', rest)]
            if name in FONT_MACROS or name in ("SH", "SS", "IP", "TP", "UR", "MT"):
                line = " ".join(words) if name not in ("UR", "MT") else ""
            elif name in ALTERNATING:
                line = "".join(words)
            else:  # paragraph and layout requests
                line = "" if name in ("PP", "P", "LP", "SH", "SS", "sp", "br") else None
            if line is None:
                continue
        line = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", line)
        line = line.replace("\\-", "-").replace("\\(em", "--").replace("\\(en", "-").replace("\\(aq", "'").replace("\\(dq", '"')
        line = re.sub(r"\\\(..|\\\[[^]]*\]|\\\*\(..|\\\*.", "", line)
        line = line.replace("\\e", "\\").replace("\\&", "").replace("\\~", " ").replace("\\ ", " ").replace("\\c", "").replace("\\:", "")
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _man_pages(cache: Path) -> str:
    pages = sorted((debian_package("manpages", cache) / "usr/share/man/man7").glob("*.7.gz"))
    texts = [gzip.decompress(p.read_bytes()).decode("utf-8", "replace") for p in pages]
    return "\n\n".join(deroff(t) for t in texts if not t.lstrip().startswith(".so "))


TEXTS = {
    "code": Text("tuning", "tests/data/python_reference.txt (the test suite's own data)", "PSF",
                 lambda _cache: CODE_TEXT.read_text(encoding="utf-8")),
    "prose": Text("tuning", "CPython documentation topics (pydoc_data.topics)", "PSF", _pydoc_topics),
    "gnu-standards": Text("held-out", "GNU Coding Standards, Debian package gnu-standards (standards.text.gz)", "GFDL 1.3",
                          _gnu_standards),
    "man-pages": Text("held-out", "Linux man-pages section 7, Debian package manpages, roff markup stripped",
                      "GPL-2+, BSD and verbatim licences per page", _man_pages),
}
QUICK_TEXTS = ("code", "gnu-standards")


def windows(ids: list[int], context: int, count: int, bos: list[int], offset: int) -> tuple[list[list[int]], list[int], int]:
    """`count` windows of `context` tokens that do not overlap, each starting with `bos`, from token
    `offset` on (from the text's start when too few tokens remain): (windows, their starts, next offset)."""
    size = context - len(bos)
    if len(ids) < count * size:
        raise ValueError(f"text has {len(ids)} tokens, {count} windows of {context} need {count * size}")
    if offset + count * size > len(ids):
        offset = 0
    starts = [offset + i * size for i in range(count)]
    return [bos + ids[a : a + size] for a in starts], starts, offset + count * size


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


def dequantized_attention(queries, q_keys, q_values, scale, mask, group_size=64, bits=8):
    """mlx-lm's `quantized_scaled_dot_product_attention`, step for step, over the keys and values
    its cache stores, dequantized first: the same values (`test_bench_method`), but float matmuls,
    which reach the BLAS. On the CPU mlx's quantized_matmul does not, and is about 15x slower at
    4K here (an 8K window of it ran for over half an hour). Used on the CPU only; the JSON says so."""
    n_kv_heads = q_keys[0].shape[-3]
    keys = mx.dequantize(*q_keys, group_size=group_size, bits=bits)
    values = mx.dequantize(*q_values, group_size=group_size, bits=bits)
    B, n_q_heads, L, D = queries.shape
    repeats = n_q_heads // n_kv_heads
    queries = queries * scale
    if repeats > 1:
        queries = queries.reshape(B, n_kv_heads, repeats, L, D)
        keys, values = keys[:, :, None], values[:, :, None]
    scores = queries @ keys.swapaxes(-1, -2)
    if mask is not None:
        if isinstance(mask, str):
            q_len, k_len = scores.shape[-2:]
            mask = mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(k_len)[None]
        if repeats > 1 and mask.ndim > 3:
            mask = mask[:, :, None]
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min) if mask.dtype == mx.bool_ else scores + mask
    out = mx.softmax(scores, axis=-1, precise=True) @ values
    return out.reshape(B, n_q_heads, L, D) if repeats > 1 else out


MLX_LM_OWN = "mlx-lm's own (quantized_matmul)"  # what runs before the setting was recorded
MLX_LM_ATTENTION = "dequantized first (dequantized_attention)" if mx.default_device() == mx.cpu else MLX_LM_OWN


def mlx_lm_caches(model) -> list[tuple[object, bool]]:
    """mlx-lm's prompt cache for `model`, a layer at a time, and whether it can quantize that
    layer (a plain KVCache; a sliding-window RotatingKVCache it cannot)."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return [(c, type(c) is KVCache) for c in make_prompt_cache(model)]


def mlx_lm_layers(model) -> dict:
    """How many of the model's layers mlx-lm's quantized cache quantizes, of how many."""
    caches = mlx_lm_caches(model)
    return {"quantized": sum(q for _, q in caches), "total": len(caches)}


class MlxLm:
    """mlx-lm's own model call and caches; global layers as QuantizedKVCache of `bits`. On the CPU
    its attention over them runs as `dequantized_attention`."""

    def __init__(self, runner: ModelRunner, bits: int):
        from mlx_lm.models import base

        self.model, self.bits, self.cache = runner.model, bits, None
        if MLX_LM_ATTENTION != MLX_LM_OWN:
            base.quantized_scaled_dot_product_attention = dequantized_attention

    def new_window(self):
        from mlx_lm.models.cache import QuantizedKVCache

        self.cache = [QuantizedKVCache(group_size=64, bits=self.bits) if quantizable else c
                      for c, quantizable in mlx_lm_caches(self.model)]

    def logits(self, part: list[int]) -> np.ndarray:
        out = self.model(mx.array(part)[None], cache=self.cache)[0].astype(mx.float32)
        return np.array(out)


class LlamaCpp:
    """llama.cpp through llama-cpp-python; every position's logits read from the context."""

    def __init__(self, gguf: Path, context: int, kv: str):
        import llama_cpp

        types = {"f16": llama_cpp.GGML_TYPE_F16, "q4_0": llama_cpp.GGML_TYPE_Q4_0, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=PREFILL_CHUNK, n_ubatch=PREFILL_CHUNK,
                                   n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(),
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


def score(engines: dict, reference_of: dict, wins: list[list[int]], after_window=None) -> dict:
    """Run every engine over the windows in lockstep, chunk by chunk.

    `reference_of[name]` is the engine whose distribution `name` is compared
    with (itself for a reference). Returns per engine: ppl, kl, top1 and the
    tokens scored, plus bits per value for ours (stored bytes over fp16's).
    `after_window(result so far, windows done)` runs after every window."""
    acc = {n: [0.0, 0.0, 0.0] for n in engines}
    bits = {n: [] for n in engines}
    scored = 0

    def result():
        r = {name: {"ppl": math.exp(a[0] / scored), "kl": a[1] / scored, "top1": a[2] / scored, "tokens": scored,
                    **({"bits": float(np.mean(bits[name]))} if bits[name] else {})} for name, a in acc.items()}
        for n, v in r.items():
            v["ppl_change_pct"] = 100 * (v["ppl"] / r[reference_of[n]]["ppl"] - 1)
        return r

    for done, win in enumerate(wins, 1):
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
        if after_window is not None:
            after_window(result(), done)
    return result()


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


def peer_engines(runner: ModelRunner, gguf: Path | None, context: int, peers: list[str]) -> tuple[dict, dict]:
    """The peers of `peers` that this model has ({name: engine}) and their references."""
    engines, reference_of = {}, {}
    for p in peers:
        family, kind = p.split(" ")
        if family == "mlx-lm":
            engines[p], reference_of[p] = MlxLm(runner, int(kind[1:])), "fp16"
        elif gguf is not None:
            if "llama.cpp f16" not in engines:  # the family's reference comes before its quantized caches
                engines["llama.cpp f16"] = LlamaCpp(gguf, context, "f16")
                reference_of["llama.cpp f16"] = "llama.cpp f16"
            engines[p], reference_of[p] = LlamaCpp(gguf, context, kind), "llama.cpp f16"
    return engines, reference_of


def bench_model(name: str, args, progress=None) -> dict:
    """`progress(result so far)` runs after every text and context (the script saves there)."""
    t0 = time.perf_counter()
    runner = ModelRunner.load(name, args.home)
    tok = runner.tokenizer
    bos = quality.prompt_bos(tok)
    gguf = gguf_file(name, args.home)
    out = {"bos": bool(bos), "gguf": gguf.name if gguf else None, "mlx_lm_layers": mlx_lm_layers(runner.model), "texts": {}}
    for text_name in args.texts:
        text = TEXTS[text_name]
        ids = tok.encode(text.load(args.home / "texts"), add_special_tokens=False)
        out["texts"][text_name] = {"role": text.role, "source": text.source, "licence": text.licence,
                                   "text_tokens": len(ids), "contexts": {}, "greedy": {}}
        offset = 0  # contexts continue where the previous one stopped
        for i, (ctx, count) in enumerate(zip(args.contexts, args.windows)):
            wins, starts, offset = windows(ids, ctx, count, bos, offset)
            if args.peers_only:  # mlx-lm's caches are compared with our fp16, which then runs too
                ours = {"fp16": Ours(runner, "fp16")} if any(p.startswith("mlx-lm") for p in args.peers) else {}
            else:
                ours = {m: Ours(runner, m) for m in ["fp16", DEFAULT_KV] + (args.extra_modes if i == 0 else [])}
            peers, peer_refs = peer_engines(runner, gguf, ctx, args.peers)
            engines = {**ours, **peers}
            reference_of = {**{n: "fp16" for n in ours}, **peer_refs}
            def keep(r, done, ctx=ctx, starts=starts):  # after every window: a run stopped early keeps what it scored
                out["texts"][text_name]["contexts"][str(ctx)] = {"windows": done, "windows_planned": len(starts),
                                                                 "window_starts": starts[:done], "engines": r}
                if progress is not None:
                    progress(out)

            r = score(engines, reference_of, wins, keep)
            for e in peers.values():
                if isinstance(e, LlamaCpp):
                    e.close()
            print(f"{name} {text_name} ctx {ctx}: {next(iter(r.values()))['tokens']} tokens | "
                  + " | ".join(f"{n} {v['ppl_change_pct']:+.2f}% KL {v['kl']:.4f}" for n, v in r.items() if reference_of[n] != n)
                  + f" | {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.prompts:
            continue
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


def _summary(rows: list[tuple[str, str, dict]]) -> dict:
    """The default mode's mean and worst ppl change and KL over `rows`, and llama.cpp q4_0's and mlx-lm q4's on the
    windows where each ran."""
    ours = [e[DEFAULT_KV] for _, _, e in rows]
    h = {"ppl_change_pct": round(float(np.mean([o["ppl_change_pct"] for o in ours])), 3),
         "ppl_change_worst_pct": round(max(o["ppl_change_pct"] for o in ours), 3),
         "kl": round(float(np.mean([o["kl"] for o in ours])), 5), "kl_worst": round(max(o["kl"] for o in ours), 5),
         "scored_tokens_min": min(o["tokens"] for o in ours), "contexts": sorted({int(c) for _, c, _ in rows})}
    # mlx-lm quantizes global layers only (docs/quality.md): on Gemma 3 it is favoured
    for engine, key, family in (("llama.cpp q4_0", "llama_cpp_q4_0", "llama_cpp"), ("mlx-lm q4", "mlx_lm_q4", "mlx_lm")):
        pairs = [(e[DEFAULT_KV], e[engine]) for _, _, e in rows if engine in e]
        if pairs:
            h[f"{key}_ppl_change_pct"] = round(float(np.mean([p["ppl_change_pct"] for _, p in pairs])), 3)
            h[f"{key}_kl"] = round(float(np.mean([p["kl"] for _, p in pairs])), 5)
            h[f"ours_where_{family}_ran_ppl_change_pct"] = round(float(np.mean([o["ppl_change_pct"] for o, _ in pairs])), 3)
            h[f"beats_{key}_wherever_both_ran"] = all(o["ppl_change_pct"] < p["ppl_change_pct"] for o, p in pairs)
            h[f"compared_with_{family}_on"] = [f"{t} {c}" for t, c, e in rows if engine in e]
    return h


def headline(models: dict) -> dict:
    """Per model: the default mode's bits, its worst and mean ppl change and KL over every text and
    context, and llama.cpp q4_0's on the same windows; then the same over the tuning texts alone
    (`tuning_*`) and over the held-out texts alone (`held_out_*`), the texts nothing was tuned on."""
    out = {}
    for name, res in models.items():
        rows = [(t, c, r["engines"]) for t, tr in res["texts"].items() for c, r in tr["contexts"].items() if DEFAULT_KV in r["engines"]]
        if not rows:
            continue
        h = {"mode": DEFAULT_KV, "bits_per_value": round(max(e[DEFAULT_KV]["bits"] for _, _, e in rows), 3),
             **_summary(rows), "llama_cpp_q4_0_bits_per_value": 4.5}
        for role in ("tuning", "held-out"):
            part = [(t, c, e) for t, c, e in rows if res["texts"][t].get("role", "tuning") == role]
            if part:
                key = role.replace("-", "_")
                h |= {f"{key}_{k}": v for k, v in _summary(part).items()}
                h[f"{key}_texts"] = sorted({t for t, _, _ in part})
                h[f"{key}_contexts_by_text"] = {t: sorted(int(c) for t2, c, _ in part if t2 == t) for t in h[f"{key}_texts"]}
                h[f"{key}_scored_tokens_per_text"] = min(sum(e[DEFAULT_KV]["tokens"] for t2, _, e in part if t2 == t) for t in h[f"{key}_texts"])
        h["goal_met"] = h["ppl_change_worst_pct"] < 3.0 and h["kl_worst"] < 0.02 and h["bits_per_value"] <= 4.5
        if res.get("mlx_lm_layers"):
            h["mlx_lm_layers"] = res["mlx_lm_layers"]
        out[name] = h
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    st = data["settings"]
    runs = data.get("runs") or [{"command": data["command"], "settings": st}]
    lines = [f"# KV cache quality ({m['cpu']}, {m['date']})", "", "Runs:", ""]
    for r in runs:
        rs = r["settings"]
        lines.append(f"- {r.get('date', m['date'])}, `{r['command']}`: texts {', '.join(rs.get('texts', []))}; contexts {', '.join(map(str, rs['contexts']))} with "
                     f"{', '.join(map(str, rs['windows']))} windows per text; "
                     + (r["note"] if "note" in r else f"peers alone on the windows of an earlier run: {', '.join(rs['peers'])}" if rs.get("peers_only")
                        else f"peers on every window: {', '.join(rs.get('peers', [])) or 'none'}; "
                        f"our extra modes at the first context: {', '.join(rs.get('extra_modes', [])) or 'none'}")
                     + (f"; mlx-lm's attention: {rs.get('mlx_lm_attention', MLX_LM_OWN)}" if any(p.startswith("mlx-lm") for p in rs.get("peers", [])) else ""))
    lines += ["", "Windows do not overlap and start as prompts do (BOS where the model's tokenizer adds one), fed in "
             f"{PREFILL_CHUNK}-token chunks; ppl change and KL (nats, mean over scored tokens) against the fp16 cache of "
             "the same engine family on the same windows; top-1 = share of positions whose most likely token matches. "
             "Bits per value: stored bytes over fp16 bytes x 16 (ours), nominal for peers.", "",
             "## Texts", "", "| text | role | source | licence |", "|---|---|---|---|"]
    seen = {}
    for res in data["models"].values():
        seen |= {t: tr for t, tr in res["texts"].items()}
    for t, tr in seen.items():
        lines.append(f"| {t} | {tr.get('role', 'tuning')} | {tr.get('source', '')} | {tr.get('licence', '')} |")
    lines += ["", "Tuning texts: q4c's layout was chosen on their first 2K windows. Held-out texts: nothing was tuned on them.", "",
              "## Headline (default mode)", "",
              "| model | texts | mode | bits/value | ppl change mean (worst) | KL mean (worst) | llama.cpp q4_0 ppl change, KL (same windows) | beats q4_0 wherever both ran | scored tokens per text and context (min) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, h in data["headline"].items():
        for label, p in (("all", ""), ("held-out", "held_out_")):
            if f"{p}ppl_change_pct" not in h:
                continue
            peer = (f"{h[p + 'llama_cpp_q4_0_ppl_change_pct']:+.2f}%, {h[p + 'llama_cpp_q4_0_kl']:.4f}"
                    if p + "llama_cpp_q4_0_ppl_change_pct" in h else "not run")
            lines.append(f"| {name} | {label} | {h['mode']} | {h['bits_per_value']:.3f} | {h[p + 'ppl_change_pct']:+.2f}% ({h[p + 'ppl_change_worst_pct']:+.2f}%) | "
                         f"{h[p + 'kl']:.4f} ({h[p + 'kl_worst']:.4f}) | {peer} | {h.get(p + 'beats_llama_cpp_q4_0_wherever_both_ran', 'n/a')} | "
                         f"{h[p + 'scored_tokens_min']:,} |")
    lines += ["", "Published Q4 KV-cache ppl changes on much larger models, for scale: "
              + ", ".join(f"{k} {v:+.1f}%" for k, v in PUBLISHED.items()) + " (the product's README cites them).", "",
              "## Every engine", "", "| model | text | role | context | windows x tokens | engine | bits | ppl | ppl change | KL | top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    nominal = {"mlx-lm q4": 4.5, "mlx-lm q8": 8.5, "llama.cpp f16": 16, "llama.cpp q4_0": 4.5, "llama.cpp q8_0": 8.5}
    for name, res in data["models"].items():
        for t, tr in res["texts"].items():
            for c, r in tr["contexts"].items():
                for n, v in r["engines"].items():
                    b = v.get("bits", nominal.get(n))
                    planned = f" (of {r['windows_planned']} planned)" if r.get("windows_planned", r["windows"]) != r["windows"] else ""
                    lines.append(f"| {name} | {t} | {tr.get('role', 'tuning')} | {c} | {r['windows']} x {v['tokens'] // r['windows']}{planned} | {n} | {b:.2f} | "
                                 f"{v['ppl']:.4f} | {v['ppl_change_pct']:+.2f}% | {v['kl']:.5f} | {v['top1']:.4f} |")
    lines += ["", "## Greedy continuation", "", f"{st['prompts']} prompts of {st['prompt_tokens']} tokens per text, "
              f"{st['gen']} tokens generated by the family's fp16; agree = share of steps with the same greedy choice.", "",
              "| model | text | engine | agree | first difference per prompt |", "|---|---|---|---|---|"]
    for name, res in data["models"].items():
        for t, tr in res["texts"].items():
            for n, g in tr["greedy"].items():
                lines.append(f"| {name} | {t} | {n} | {g['agree']:.3f} | {', '.join(map(str, g['first_diff']))} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path]) -> dict:
    """One result from runs of this script over different texts, contexts or models (each run's
    command and settings kept in `runs`); a context of a text run in a later file replaces the
    same context of an earlier one, unless both ran the same windows: then the later file's
    engines join the earlier ones (a `--peers-only` run adds its peers), replacing those of the
    same name. The headline is computed again over everything."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    data = {**parts[-1], "models": {}, "runs": []}
    for part in parts:
        if part.get("runs"):
            data["runs"] += part["runs"]
        elif "texts" in part["settings"]:
            data["runs"].append({"command": part["command"], "date": part["machine"]["date"], "settings": part["settings"]})
        else:  # a file of the earlier method, before held-out texts and peers on every window
            texts = sorted({t for res in part["models"].values() for t in res["texts"]})
            data["runs"].append({"command": part["command"], "date": part["machine"]["date"], "settings": {**part["settings"], "texts": texts},
                                 "note": "earlier method: mlx-lm, llama.cpp q8_0 and our q4, q4k, q8 at the first context only, "
                                         "llama.cpp q4_0 where --peers-first-only was not given (see each context's engines)"})
        for name, res in part["models"].items():
            have = data["models"].setdefault(name, {**res, "texts": {}, "seconds": 0.0})
            for k, v in res.items():  # what an earlier file did not record yet (mlx_lm_layers)
                have.setdefault(k, v)
            for t, tr in res["texts"].items():  # files from before texts carried their role
                if t in TEXTS:
                    tr.setdefault("role", TEXTS[t].role), tr.setdefault("source", TEXTS[t].source), tr.setdefault("licence", TEXTS[t].licence)
                old = have["texts"].get(t)
                if old is None:
                    have["texts"][t] = tr
                    continue
                for c, cr in tr["contexts"].items():  # a later file's run of a context replaces an earlier one's
                    was = old["contexts"].get(c)
                    if was is not None and was.get("window_starts") is not None and was.get("window_starts") == cr.get("window_starts"):
                        for n, v in cr["engines"].items():
                            if n in was["engines"] and was["engines"][n]["ppl"] != v["ppl"]:
                                print(f"{name} {t} {c}: {n} ppl {was['engines'][n]['ppl']:.4f} -> {v['ppl']:.4f}", flush=True)
                        print(f"{name} {t} {c}: {', '.join(cr['engines'])} join the same {cr['windows']} windows", flush=True)
                        was["engines"] = {**was["engines"], **cr["engines"]}
                        continue
                    if DEFAULT_KV not in cr["engines"]:
                        raise SystemExit(f"{name} {t} {c}: a run of peers alone must have the same windows as the run it joins")
                    if was is not None:
                        print(f"{name} {t} {c}: {cr['windows']} windows replace {was['windows']}", flush=True)
                    old["contexts"][c] = cr
                old["contexts"] = dict(sorted(old["contexts"].items(), key=lambda kv: int(kv[0])))
                if tr.get("greedy"):
                    old["greedy"] = tr["greedy"]
            have["seconds"] += res.get("seconds") or 0.0
            have["partial"] = have.get("partial", False) or res.get("partial", False)
    data["command"] = " ; ".join(r["command"] for r in data["runs"])
    data["headline"] = headline(data["models"])
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--windows", default="8,4,2", help="windows per context (default: at least 16,000 scored tokens per text and context)")
    ap.add_argument("--texts", default=None, help=f"comma separated, from {', '.join(TEXTS)} (default: all; --quick: {','.join(QUICK_TEXTS)})")
    ap.add_argument("--peers", default=",".join(PEERS), help="engines of other projects on every window, comma separated (empty: none)")
    ap.add_argument("--extra-modes", default="q4,q4k,q8", help="our other KV modes, at the first context only (empty: none)")
    ap.add_argument("--peers-only", action="store_true",
                    help="run only the peers (llama.cpp brings its own f16 reference; mlx-lm's is our fp16, which runs too), "
                         "to join an earlier run's windows with --merge")
    ap.add_argument("--prompts", type=int, default=1, help="greedy-continuation prompts per text (0: none)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="checks the script: one 512-token window per text, 1 prompt x 16 tokens")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    ap.add_argument("--merge", type=Path, nargs="+", help="write one quality.json/md from these files of earlier runs, running nothing")
    args = ap.parse_args()
    if args.merge:
        data = merge(args.merge)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps(data, indent=1))
        (args.out / "quality.md").write_text(markdown(data))
        return
    if args.quick:
        args.contexts, args.windows, args.prompts, args.gen, args.prompt_tokens = "512", "1", 1, 16, 128
    if args.texts is None:  # a quick run checks one tuning and one held-out text
        args.texts = ",".join(QUICK_TEXTS if args.quick else TEXTS)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.windows = [int(w) for w in args.windows.split(",")]
    args.texts = [t for t in args.texts.split(",") if t]
    args.peers = [p for p in args.peers.split(",") if p]
    args.extra_modes = [m for m in args.extra_modes.split(",") if m]
    if len(args.windows) != len(args.contexts):
        ap.error("--windows needs one count per context")
    if unknown := [t for t in args.texts if t not in TEXTS]:
        ap.error(f"unknown text {', '.join(unknown)}; choose from {', '.join(TEXTS)}")
    if unknown := [p for p in args.peers if p not in PEERS]:
        ap.error(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if args.peers_only and (not args.peers or args.prompts):
        ap.error("--peers-only runs the peers alone: give --peers and --prompts 0")
    args.home = args.home or default_home()
    data = {"command": " ".join(["python", "scripts/bench_quality.py", *sys.argv[1:]]),
            "machine": {"cpu": blas.read_cpuinfo().model, "cores": os.cpu_count(), "os": platform.platform(),
                        "blas": blas.CHOICE.summary(), "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")},
            "settings": {"contexts": args.contexts, "windows": args.windows, "texts": args.texts, "peers": args.peers,
                         "extra_modes": args.extra_modes, "peers_only": args.peers_only, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                         "gen": args.gen, "chunk": PREFILL_CHUNK, "llama_cpp_flash_attn": True, "mlx_lm_attention": MLX_LM_ATTENTION},
            "published_q4_ppl_change_pct": PUBLISHED, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save(name, result):  # after every window: a long run keeps what it measured
        data["models"][name] = result
        data["headline"] = headline(data["models"])
        (args.out / "quality.json").write_text(json.dumps(data, indent=1))
        (args.out / "quality.md").write_text(markdown(data))

    for m in args.models.split(","):
        save(m, {**bench_model(m, args, lambda partial, m=m: save(m, {**partial, "partial": True})), "partial": False})
    print(json.dumps(data["headline"], indent=1))


if __name__ == "__main__":
    main()
