"""What attaching a shared q4c prefix block costs in quality, against prefilling it oneself.

A window of the text is a prefix P (whole 256-token blocks) and then the
scored tokens S. Each cache prefills P, then S teacher-forced in 512-token
chunks from the end of P, and S's next-token predictions are scored:

* `fp16`: P prefilled by the agent itself (the reference);
* `q4c_own`: the same in q4c;
* `q4c_attached_one_go`: P attached from a block that another agent made by
  prefilling P in one go (the bytes the agent's own prefill writes);
* `q4c_attached_turns`: P attached from a block made by an agent that got P
  in turns of `--turn` tokens. A turn ending inside a 128-token key group
  leaves that group's tokens in the 8-bit tail; when the group fills they
  are decoded and quantized to 4 bits (twice rounded), and the next turn's
  queries read that group at 8 bits: the block's bytes differ from what the
  attaching agent's own prefill would have written (docs/pool.md).

Per mode: perplexity of S, KL(fp16 || mode) and KL(q4c_own || mode) in nats
per token, top-1 agreement with fp16. A model with sliding-window layers
(Gemma 3) shares no blocks (prefixes.eligible): it is listed as such.

    python scripts/prefix_quality.py [--models smollm2-135m,gemma3-270m] [--out bench_results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx

from mlx_agentcache.blas import read_cpuinfo
from mlx_agentcache.config import default_home
from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.prefixes import PrefixIndex, attach, eligible
from mlx_agentcache.quality import prompt_bos

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "python_reference.txt"
MODES = ("fp16", "q4c_own", "q4c_attached_one_go", "q4c_attached_turns")


def attached(runner: ModelRunner, prefix: list[int], turn: int | None):
    """A fresh q4c cache holding `prefix` as a shared block made by another agent's prefill
    (in one go, or in turns of `turn` tokens)."""
    maker = runner.new_cache("q4c")
    for a in range(0, len(prefix), turn or len(prefix)):
        runner.prefill(prefix[a : a + (turn or len(prefix))], maker, logits=False)
    index = PrefixIndex(runner.fingerprint, "q4c")
    key = index.create(maker, len(prefix))
    cache = runner.new_cache("q4c")
    attach(cache, index.segments(key, len(prefix), prefix), len(prefix), prefix)
    return cache


def window_scores(runner: ModelRunner, prefix: list[int], scored: list[int], turn: int) -> dict:
    """Per mode: summed (nll, KL vs fp16, KL vs q4c_own, top-1 agreement) over S's predictions."""
    caches = {}
    for mode in ("fp16", "q4c_own"):
        caches[mode] = runner.new_cache(mode.split("_")[0])
        runner.prefill(prefix, caches[mode], logits=False)
    caches["q4c_attached_one_go"] = attached(runner, prefix, None)
    caches["q4c_attached_turns"] = attached(runner, prefix, turn)
    logits = {m: runner.logits(scored, caches[m])[:-1].astype(mx.float32) for m in MODES}
    targets = mx.array(scored[1:])

    def logp(x):
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    ref, own = logp(logits["fp16"]), logp(logits["q4c_own"])
    out = {}
    for m in MODES:
        lp = logp(logits[m])
        nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
        kl = (mx.exp(ref) * (ref - lp)).sum()
        kl_own = (mx.exp(own) * (own - lp)).sum()
        agree = (mx.argmax(lp, axis=-1) == mx.argmax(ref, axis=-1)).sum()
        out[m] = [float(x) for x in (nll, kl, kl_own, agree)]
    out["max_logit_diff_one_go_vs_own"] = float(mx.abs(logits["q4c_attached_one_go"] - logits["q4c_own"]).max())
    return out


def bench_model(name: str, home: Path, prefix: int, score: int, windows: int, turn: int) -> dict:
    runner = ModelRunner.load(name, home, "q4c")
    if not eligible(runner.new_cache("q4c")):
        return {"shares_prefixes": False, "why": "sliding-window layers: a window drops the front of a cache, so no block is shared (prefixes.eligible)"}
    ids = runner.tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    bos = prompt_bos(runner.tokenizer)
    size = prefix + score
    if len(ids) < windows * (size - len(bos)):
        raise SystemExit(f"{TEXT.name} holds {len(ids)} tokens, fewer than {windows} windows of {size}")
    sums = {m: [0.0] * 4 for m in MODES}
    diff, t0 = 0.0, time.perf_counter()
    for w in range(windows):
        window = bos + ids[w * (size - len(bos)) : (w + 1) * (size - len(bos))]
        r = window_scores(runner, window[:prefix], window[prefix:], turn)
        diff = max(diff, r.pop("max_logit_diff_one_go_vs_own"))
        for m in MODES:
            sums[m] = [a + b for a, b in zip(sums[m], r[m])]
        print(f"{name} window {w + 1}/{windows}", flush=True)
    n = windows * (score - 1)
    out = {"shares_prefixes": True, "scored_tokens": n, "seconds": round(time.perf_counter() - t0, 1),
           "max_logit_diff_one_go_vs_own": round(diff, 6)}
    for m in MODES:
        nll, kl, kl_own, agree = (x / n for x in sums[m])
        out[m] = {"ppl": round(math.exp(nll), 4), "kl_vs_fp16": round(kl, 6), "kl_vs_q4c_own": round(kl_own, 6), "top1_agree": round(agree, 4)}
    for m in MODES[1:]:
        out[m]["ppl_change_vs_fp16_pct"] = round(100 * (out[m]["ppl"] / out["fp16"]["ppl"] - 1), 3)
    return out


def report(r: dict) -> str:
    lines = ["# Shared q4c prefix blocks: quality", "",
             f"CPU: {r['cpu']} ({r['cores']} cores). Text: {r['text']}; {r['windows']} windows of a {r['prefix']}-token prefix "
             f"and {r['score']} scored tokens; the turns block was made in turns of {r['turn']} tokens.", "",
             "| model | mode | ppl | change vs fp16 | KL vs fp16 | KL vs own q4c | top-1 vs fp16 |", "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        if not m["shares_prefixes"]:
            lines.append(f"| {name} | shares no blocks: {m['why']} | | | | | |")
            continue
        for mode in MODES:
            x = m[mode]
            lines.append(f"| {name} | {mode} | {x['ppl']} | {x.get('ppl_change_vs_fp16_pct', 0):+.2f}% | {x['kl_vs_fp16']:.5f} | "
                         f"{x['kl_vs_q4c_own']:.5f} | {x['top1_agree']:.2%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--prefix", type=int, default=2048, help="tokens of the shared prefix (whole 256-token blocks)")
    ap.add_argument("--score", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--turn", type=int, default=100, help="turn length of the agent that made the 'turns' block")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    a = ap.parse_args()
    if a.prefix % 256:
        raise SystemExit("--prefix must be whole 256-token blocks")
    r = {"cpu": read_cpuinfo().model, "cores": os.cpu_count(), "text": f"tests/data/{TEXT.name}", "prefix": a.prefix,
         "score": a.score, "windows": a.windows, "turn": a.turn,
         "models": {name: bench_model(name, default_home(), a.prefix, a.score, a.windows, a.turn) for name in a.models.split(",")}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prefix_quality.json").write_text(json.dumps(r, indent=1) + "\n")
    (a.out / "prefix_quality.md").write_text(report(r))
    print(report(r))


if __name__ == "__main__":
    main()
