"""Cache-card handoff: receiver TTFT, fidelity over hops, and a whole workflow.

    python scripts/bench_handoff.py --quick --out /tmp/h          # checks the script: 512 and 1K, 2 hops, ~2 min
    python scripts/bench_handoff.py [--contexts 1024 2048]        # default 1K-8K, 5 repeats: ~41 min on a 2-core x86 CPU

1. TTFT of a receiver that gets a source's context of C tokens and asks one
   question: re-prefilling the text, injecting a mixed-precision card (4 bits)
   and injecting an fp16 copy of the cache (a 16-bit card). Stages: export,
   write, read (checksums included), inject, first token. Engines alternate
   within each repeat after an untimed warm-up; medians with min-max.
2. Fidelity over hops 1..5 at budgets 2.5, 3, 4, 5 bits, uniform vs mixed
   precision (mixed: 2/3/4/8 bits with energy importance; mixed_flat: flat
   importance, i.e. sinks and recent tokens only; mixed_248: the 2/4/8 levels
   alone): each hop exports the receiver's cache again (mixed cards keep
   each token's width as a cap) and injects it into a fresh receiver. Against
   an fp16 handoff, on held-out text that follows the context: KL of the
   next-token distributions, greedy agreement, and the receiver's perplexity.
   Receivers keep fp16 caches here so that the card's precision is what is
   measured. (GSM8K accuracy means nothing at 135M parameters, so it is not used.)
3. A plan-execute-review-revise workflow with text passing vs card handoff:
   makespan and total prefilled tokens.

SmolLM2-135M. Writes handoff.json, handoff.md and handoff_*.png under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_agentcache  # noqa: E402,F401  (loads the BLAS first)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_agentcache import cards, workflow  # noqa: E402
from mlx_agentcache.blas import read_cpuinfo  # noqa: E402
from mlx_agentcache.config import default_home  # noqa: E402
from mlx_agentcache.kvcache import AgentCache, LayerCache  # noqa: E402
from mlx_agentcache.models.runner import ModelRunner  # noqa: E402
from mlx_agentcache.runtime import Runtime  # noqa: E402  (imported with the rest: one version of the package per run)

TEXT = ROOT / "tests" / "data" / "python_reference.txt"
MODEL = "smollm2-135m"
QUESTION = "\n\nQuestion: what is the main topic of the text above? Answer:"


def med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fresh(runner, mode=None) -> AgentCache:
    return AgentCache([LayerCache(mode or runner.kv_bits, w) for w in runner.windows])


# -- 1. TTFT ------------------------------------------------------------------------


def ttft(runner, tokens: list[int], question: list[int], tmp: Path) -> dict:
    """One receiver TTFT per engine; the source cache is already built."""
    source = fresh(runner)
    runner.prefill(tokens, source, logits=False)
    out = {}

    def reprefill():
        t0 = time.perf_counter()
        c = fresh(runner)
        logits = runner.prefill(tokens + question, c)
        mx.eval(logits)
        return {"first_token": time.perf_counter() - t0}

    def via_card(bits: float, mode: str):
        def go():
            s = {}
            t = time.perf_counter()
            card = cards.export(source, 0, len(tokens), bits, mode=mode, fingerprint=runner.fingerprint)
            s["export"] = time.perf_counter() - t
            t = time.perf_counter()
            cards.write(card, tmp / "c.card", runner.fingerprint)
            s["write"] = time.perf_counter() - t
            t = time.perf_counter()
            back = cards.read(tmp / "c.card", runner.fingerprint)
            s["read"] = time.perf_counter() - t
            t = time.perf_counter()
            c = fresh(runner)
            cards.inject(back, c, runner)
            s["inject"] = time.perf_counter() - t
            t = time.perf_counter()
            mx.eval(runner.prefill(question, c))
            s["first_token"] = time.perf_counter() - t
            s["bytes"] = back.nbytes
            return s
        return go

    engines = {"reprefill": reprefill, "card_mixed_4bit": via_card(4.0, "mixed"), "fp16_copy": via_card(16, "uniform")}
    for e in engines.values():  # untimed warm-up
        e()
    runs = {k: [] for k in engines}
    for _ in range(ARGS.repeats):
        for k, e in engines.items():  # alternate within each repeat
            runs[k].append(e())
    for k, rs in runs.items():
        stages = [s for s in rs[0] if s != "bytes"]
        receiver = [sum(r[s] for s in stages if s in ("read", "inject", "first_token")) * 1000 for r in rs]
        out[k] = {
            "receiver_ttft_ms": med(receiver),
            "handoff_ms": med([sum(r[s] for s in stages) * 1000 for r in rs]),
            "stages_ms": {s: statistics.median(r[s] for r in rs) * 1000 for s in stages},
            **({"card_bytes": rs[0]["bytes"]} if "bytes" in rs[0] else {}),
        }
    return out


# -- 2. fidelity over hops -------------------------------------------------------------


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def scores(runner, cache: AgentCache, held: list[int], ref: mx.array | None):
    """Logits over `held` after the cache's context (the cache is cut back afterwards)."""
    n = cache.offset
    logits = runner.logits(held, cache)
    cache.trim_to(n)
    lp = log_softmax(logits[:-1])
    nll = -mx.take_along_axis(lp, mx.array(held[1:])[:, None], axis=-1).mean().item()
    out = {"ppl": float(np.exp(nll))}
    if ref is not None:
        rp = log_softmax(ref[:-1])
        out["kl"] = float((mx.exp(rp) * (rp - lp)).sum(axis=-1).mean().item())
        out["greedy_agreement"] = float((mx.argmax(lp, axis=-1) == mx.argmax(rp, axis=-1)).astype(mx.float32).mean().item())
    return out, logits


def fidelity(runner, tokens: list[int], held: list[int]) -> dict:
    source = fresh(runner, 16)
    runner.prefill(tokens, source, logits=False)
    base, ref = scores(runner, source, held, None)
    res = {"fp16_handoff_ppl": base["ppl"], "budgets": {}}
    for budget in ARGS.budgets:
        res["budgets"][str(budget)] = {}
        for name, mode, importance, levels in (("uniform", "uniform", None, None), ("mixed", "mixed", "energy", (2, 3, 4, 8)),
                                               ("mixed_flat", "mixed", "flat", (2, 3, 4, 8)), ("mixed_248", "mixed", "energy", (2, 4, 8))):
            rows, cache, cap = [], source, None
            for hop in range(1, ARGS.hops + 1):
                card = cards.export(cache, 0, len(tokens), budget, mode=mode, cap=cap, hops=hop, fingerprint=runner.fingerprint,
                                    importance=importance or "energy", levels=levels or (2, 3, 4, 8))
                cap = card.widths
                cache = fresh(runner, 16)
                cards.inject(card, cache, runner)
                s, _ = scores(runner, cache, held, ref)
                rows.append({"hop": hop, "avg_bits": card.avg_bits, **s})
            res["budgets"][str(budget)][name] = rows
    return res


# -- 3. workflow --------------------------------------------------------------------------

TEXT_WF = """agents:
  planner: {system: "You are a planner. Split the task into three short numbered steps. No preamble."}
  executor: {system: "You are an executor. Carry out each step of the plan you are given, one line per step."}
  reviewer: {system: "You are a reviewer. Point out the weakest part of the work in two sentences."}
vars: {task: "Organise a one-day team offsite for twelve people."}
script:
  - planner: "Task: {task}"
  - executor: "Carry out this plan:\\n{planner}"
  - reviewer: "Task: {task}\\nPlan:\\n{planner}\\nWork:\\n{executor}"
  - planner: "The reviewer said:\\n{reviewer}\\nRevise your plan."
  - executor: "Carry out the revised plan:\\n{planner}"
"""


def workflows(runner) -> dict:
    flows = {"text": workflow.loads(TEXT_WF), "card_handoff": workflow.load(ROOT / "examples" / "plan_execute_review.yaml")}
    out = {k: [] for k in flows}
    for r in range(ARGS.wf_repeats + 1):  # the first of each is an untimed warm-up
        for k, wf in flows.items():
            with tempfile.TemporaryDirectory() as d:
                rt = Runtime(runner=runner, cache_dir=d, max_tokens=ARGS.wf_tokens)
                try:
                    t0 = time.perf_counter()
                    rs = workflow.run(rt, wf, max_tokens=ARGS.wf_tokens)
                    if r:
                        out[k].append({"makespan_s": time.perf_counter() - t0,
                                       "prefilled_tokens": sum(t.stats.prefilled_tokens for t in rs),
                                       "restored_tokens": sum(t.stats.restored_tokens for t in rs if not t.handoff_from)})
                finally:
                    rt.close()
    return {k: {"makespan_s": med([r["makespan_s"] for r in rs]), "prefilled_tokens": rs[0]["prefilled_tokens"],
                "restored_tokens": rs[0]["restored_tokens"]} for k, rs in out.items()}


# -- report ----------------------------------------------------------------------------


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fid = res["fidelity"]["budgets"]
    fig, axes = plt.subplots(1, len(fid), figsize=(4 * len(fid), 3.4), sharey=True)
    for ax, (b, modes) in zip(np.atleast_1d(axes), fid.items()):
        for mode, rows in modes.items():
            ax.plot([r["hop"] for r in rows], [r["kl"] for r in rows], marker="o", label=mode)
        ax.set_title(f"{b} bits"), ax.set_xlabel("hops"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("KL vs fp16 handoff (nats)")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(f"{MODEL}: receiver fidelity over hops")
    fig.tight_layout()
    fig.savefig(out / "handoff_fidelity.png", dpi=110)
    files.append("handoff_fidelity.png")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ctxs = list(res["ttft"])
    width = 0.27
    for j, eng in enumerate(("reprefill", "card_mixed_4bit", "fp16_copy")):
        ax.bar(np.arange(len(ctxs)) + (j - 1) * width, [res["ttft"][c][eng]["receiver_ttft_ms"]["median"] for c in ctxs], width, label=eng)
    ax.set_xticks(np.arange(len(ctxs)), ctxs), ax.set_xlabel("context tokens"), ax.set_ylabel("receiver TTFT (ms)"), ax.set_yscale("log")
    ax.legend(), ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "handoff_ttft.png", dpi=110)
    files.append("handoff_ttft.png")
    return files


def markdown(res: dict) -> str:
    lines = [f"# Cache-card handoff ({MODEL}, {res['cpu']})", "", f"`{res['command']}`", "",
             "## Receiver TTFT (ms, median of repeats [min-max]); stages in ms", "",
             "Receiver TTFT: from the card file to the first token (read with every checksum, inject, prefill the "
             "question); re-prefill: the context and the question from text. The sender's export and write are in the "
             "stages and in the whole handoff time.", "",
             "| context | re-prefill | card 4-bit mixed | fp16 copy | card / re-prefill | whole handoff, card | card stages (export, write, read, inject, first token) | card bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for c, r in res["ttft"].items():
        f = lambda e, r=r: f"{r[e]['receiver_ttft_ms']['median']:.1f} [{r[e]['receiver_ttft_ms']['min']:.1f}-{r[e]['receiver_ttft_ms']['max']:.1f}]"  # noqa: E731
        st = r["card_mixed_4bit"]["stages_ms"]
        ratio = r["card_mixed_4bit"]["receiver_ttft_ms"]["median"] / r["reprefill"]["receiver_ttft_ms"]["median"]
        lines.append(f"| {c} | {f('reprefill')} | {f('card_mixed_4bit')} | {f('fp16_copy')} | {ratio:.3f}x | "
                     f"{r['card_mixed_4bit']['handoff_ms']['median']:.1f} | "
                     + ", ".join(f"{st[s]:.1f}" for s in ("export", "write", "read", "inject", "first_token"))
                     + f" | {r['card_mixed_4bit']['card_bytes']:,} (fp16 {r['fp16_copy']['card_bytes']:,}) |")
    fid = res["fidelity"]
    lines += ["", f"## Fidelity over hops ({fid['context']} tokens of context, {fid['held_out']} held-out tokens; fp16 handoff perplexity {fid['fp16_handoff_ppl']:.3f})", "",
              "| budget | precision | hop | avg bits | KL | greedy agreement | perplexity |", "|---|---|---|---|---|---|---|"]
    for b, modes in fid["budgets"].items():
        for mode, rows in modes.items():
            for r in rows:
                lines.append(f"| {b} | {mode} | {r['hop']} | {r['avg_bits']:.3f} | {r['kl']:.4f} | {r['greedy_agreement']:.3f} | {r['ppl']:.3f} |")
    lines += ["", "## Workflow (plan, execute, review, revise)", "", "| passing | makespan s, median (min-max) | prefilled tokens | restored tokens |", "|---|---|---|---|"]
    for k, r in res["workflow"].items():
        m = r['makespan_s']
        lines.append(f"| {k} | {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) | {r['prefilled_tokens']} | {r['restored_tokens']} |")
    lines += ["", "## Headline", "", "```json", json.dumps(res["headline"], indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="checks the script: 512 and 1K contexts, 2 hops over 256 tokens, short workflows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    ap.add_argument("--contexts", type=int, nargs="*")
    ARGS = ap.parse_args()
    q = ARGS.quick
    ARGS.contexts = ARGS.contexts or ([512, 1024] if q else [1024, 2048, 4096, 8192])
    ARGS.repeats = 2 if q else 5
    ARGS.budgets = [2.5, 3.0, 4.0, 5.0]
    ARGS.hops = 2 if q else 5
    ARGS.wf_repeats = 1 if q else 5
    ARGS.wf_tokens = 16 if q else 80
    fid_ctx, held_n = (256, 32) if q else (1024, 128)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    runner = ModelRunner.load(MODEL, default_home())
    all_tokens = runner.tokenizer.encode(TEXT.read_text())
    question = runner.tokenizer.encode(QUESTION)
    res = {"command": " ".join(["python", "scripts/bench_handoff.py", *sys.argv[1:]]), "model": MODEL, "cpu": read_cpuinfo().model,
           "kv_mode": runner.kv_bits, "ttft": {}}
    with tempfile.TemporaryDirectory() as d:
        for c in ARGS.contexts:
            print(f"ttft {c}", flush=True)
            res["ttft"][str(c)] = ttft(runner, all_tokens[:c], question, Path(d))
            (ARGS.out / "handoff.partial.json").write_text(json.dumps(res, indent=1))  # a late failure keeps what was measured
    print("fidelity", flush=True)
    fp16 = ModelRunner.load(MODEL, default_home(), kv_bits=16)
    start = len(all_tokens) // 2
    fid = fidelity(fp16, all_tokens[start : start + fid_ctx], all_tokens[start + fid_ctx : start + fid_ctx + held_n])
    res["fidelity"] = {"context": fid_ctx, "held_out": held_n, **fid}
    (ARGS.out / "handoff.partial.json").write_text(json.dumps(res, indent=1))
    print("workflow", flush=True)
    res["workflow"] = workflows(runner)
    four = res["ttft"].get("4096")
    res["headline"] = {
        "ttft_vs_reprefill_4k": None if four is None else four["card_mixed_4bit"]["receiver_ttft_ms"]["median"] / four["reprefill"]["receiver_ttft_ms"]["median"],
        "kl_hop5": {b: {m: rows[-1]["kl"] for m, rows in modes.items()} for b, modes in fid["budgets"].items()},
        "workflow_prefilled_tokens": {k: r["prefilled_tokens"] for k, r in res["workflow"].items()},
    }
    res["plots"] = plots(res, ARGS.out)
    (ARGS.out / "handoff.json").write_text(json.dumps(res, indent=1))
    (ARGS.out / "handoff.md").write_text(markdown(res))
    (ARGS.out / "handoff.partial.json").unlink(missing_ok=True)
    print(json.dumps(res["headline"], indent=1))


if __name__ == "__main__":
    main()
