"""How much a quantized KV cache changes what the model predicts.

Every measurement runs the real cache path: tokens go through
`ModelRunner.logits` (teacher-forced prefill, chunk by chunk, so a chunk
attends to the quantized keys and values of earlier chunks) or through
`ModelRunner.decode`. Several cache modes are evaluated in lockstep on the
same text, the first one being the reference, so per-position comparisons
(KL divergence, top-1 agreement) never need more than one chunk of logits in
memory: a 262K-token vocabulary makes whole-window logits gigabytes.
"""

from __future__ import annotations

import math
import time

import mlx.core as mx

from .models.runner import PREFILL_CHUNK


def prompt_bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer starts every prompt with it (Gemma), else [] (SmolLM2)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer.encode("a")[:1] == [bos] else []


def as_prompts(ids: list[int], context: int, bos: list[int]) -> list[int]:
    """`ids` (encoded without special tokens) cut into windows of `context` tokens that
    each start with `bos`, as a prompt does, and joined: `compare` cuts at the same places."""
    size = context - len(bos)
    if size < 1:
        raise ValueError(f"a context of {context} leaves no room after BOS")
    return [t for i in range(0, len(ids), size) for t in bos + ids[i : i + size]]


def compare(runner, tokens: list[int], modes: list, context: int | list[int] = 2048, chunk: int = PREFILL_CHUNK) -> dict:
    """Perplexity of `tokens` under each cache mode; KL and top-1 agreement against `modes[0]`.

    The text is cut into windows of `context` tokens (a shorter last window
    is kept); each window starts from an empty cache, and each of its tokens
    after the first is scored given the window's earlier tokens. KL is
    KL(reference || mode) of the next-token distributions, in nats.
    Returns {mode: {"ppl", "nll", "kl", "top1_agree", "seconds"}} plus
    "tokens" (scored positions) and "context".

    With a list of contexts, windows are as long as the largest, and a shorter
    context C is scored on the first C tokens of each window, exactly as a
    window of C tokens would be (the same numbers when C is a multiple of
    `chunk`; fewer tokens scored, no extra compute); the result
    is then {C: result} for every C.
    """
    contexts = sorted(context) if isinstance(context, (list, tuple)) else [context]
    window_len = contexts[-1]
    acc = {c: {m: mx.zeros(3) for m in modes} for c in contexts}  # nll, kl, agree sums
    scored = {c: 0 for c in contexts}
    seconds = {m: 0.0 for m in modes}
    for w in range(0, len(tokens), window_len):
        window = tokens[w : w + window_len]
        if len(window) < 2:
            break
        caches = {m: runner.new_cache(m) for m in modes}
        for a in range(0, len(window), chunk):
            part = window[a : a + chunk]
            targets = mx.array(window[a + 1 : a + 1 + len(part)])  # the last position of a window has none
            n = targets.shape[0]
            pos = mx.arange(a, a + n)
            ref = None
            for m in modes:
                t0 = time.perf_counter()
                logits = runner.logits(part, caches[m], chunk)[:n]
                lse = mx.logsumexp(logits, axis=-1)
                nll = lse - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
                top = mx.argmax(logits, axis=-1)
                if ref is None:  # KL(ref || m) = sum p_ref * (l_ref - l_m) - (lse_ref - lse_m)
                    ref, ref_lse, ref_top = logits, lse, top
                    ref_p = mx.exp(logits - lse[:, None])
                    kl = mx.zeros(n)
                else:
                    kl = (ref_p * (ref - logits)).sum(axis=-1) - (ref_lse - lse)
                per_pos = mx.stack([nll, kl, (top == ref_top).astype(mx.float32)], axis=1)
                for c in contexts:  # a window of c tokens scores its positions 0 .. c-2
                    acc[c][m] = acc[c][m] + mx.where((pos < min(c, len(window)) - 1)[:, None], per_pos, 0.0).sum(axis=0)
                mx.eval([acc[c][m] for c in contexts])
                seconds[m] += time.perf_counter() - t0
        for c in contexts:
            scored[c] += max(min(c, len(window)) - 1, 0)
    out = {}
    for c in contexts:
        r = {"tokens": scored[c], "context": c}
        for m in modes:
            nll, kl, agree = acc[c][m].tolist()
            r[str(m)] = {"ppl": math.exp(nll / scored[c]), "nll": nll / scored[c], "kl": kl / scored[c],
                         "top1_agree": agree / scored[c], "seconds": seconds[m]}
        out[c] = r
    return out if isinstance(context, (list, tuple)) else out[context]


def perplexity(runner, tokens: list[int], mode, context: int = 2048, chunk: int = PREFILL_CHUNK) -> dict:
    """{"ppl", "nll", "tokens", "seconds"} of `tokens` under one cache mode."""
    r = compare(runner, tokens, [mode], context, chunk)
    m = r[str(mode)]
    return {"ppl": m["ppl"], "nll": m["nll"], "tokens": r["tokens"], "context": context, "seconds": m["seconds"]}


def greedy_agreement(runner, prompt: list[int], modes: list, n: int = 256) -> dict:
    """Greedy decoding under `modes[0]`, then the same tokens forced through each other mode.

    For every other mode: the share of the `n` steps whose greedy choice
    equals the reference's, and the first step where it differs (= how many
    tokens free-running greedy output stays identical; n if never).
    """
    ref_mode, others = modes[0], modes[1:]
    cache = runner.new_cache(ref_mode)
    logits = runner.prefill(prompt, cache)
    ref = []
    for _ in range(n):
        ref.append(int(mx.argmax(logits).item()))
        logits = runner.decode([ref[-1]], [cache])[0]
    out = {}
    for m in others:
        cache = runner.new_cache(m)
        logits = runner.prefill(prompt, cache)
        same = []
        for tok in ref:
            same.append(int(mx.argmax(logits).item()) == tok)
            logits = runner.decode([tok], [cache])[0]
        out[str(m)] = {"agree": sum(same) / n, "first_diff": same.index(False) if False in same else n}
    return out
