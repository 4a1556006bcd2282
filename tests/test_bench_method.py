"""The benchmarks' method: windows that do not overlap, held-out texts kept apart from tuning
ones, runs merged without losing a command, engines alternating with every sample kept.

The scripts' own functions on small inputs; the scripts' full runs are `agentcache bench
--quick` (tests/test_bench.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mlx_agentcache import benchreport

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # the scripts import each other
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


bq = script("bench_quality")
ttft = script("bench_ttft")


def test_windows_do_not_overlap_start_with_bos_and_say_where_they_start():
    ids = list(range(100, 1100))
    wins, starts, nxt = bq.windows(ids, 64, 8, [1], offset=0)
    assert [w[0] for w in wins] == [1] * 8 and all(len(w) == 64 for w in wins)
    body = [t for w in wins for t in w[1:]]
    assert len(body) == len(set(body)) == 8 * 63  # no token in two windows
    assert starts == [i * 63 for i in range(8)] and nxt == 8 * 63
    wins2, starts2, _ = bq.windows(ids, 128, 3, [1], offset=nxt)  # the next context continues after the first
    assert starts2[0] == nxt and not set(t for w in wins2 for t in w[1:]) & set(body)
    _, starts3, _ = bq.windows(ids, 250, 4, [], offset=900)  # too little left: from the start again
    assert starts3 == [0, 250, 500, 750]
    with pytest.raises(ValueError, match="1000 tokens"):
        bq.windows(ids, 512, 2, [], offset=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_lm_attention_over_its_quantized_cache_is_the_same_when_dequantized_first(bits):
    """The quality benchmark's mlx-lm peer runs its attention as float matmuls over the dequantized
    cache on the CPU: the same values as mlx-lm's own, under every mask it is called with."""
    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as own

    mx.random.seed(bits)
    for heads, kv_heads, q_len, k_len, mask in ((9, 3, 64, 64, "causal"), (9, 3, 32, 160, "causal"), (4, 4, 1, 96, None),
                                                 (8, 1, 16, 80, "array")):
        q = mx.random.normal((1, heads, q_len, 64))
        k, v = (mx.quantize(mx.random.normal((1, kv_heads, k_len, 64)), 64, bits) for _ in range(2))
        if mask == "array":
            mask = mx.random.uniform(shape=(1, 1, q_len, k_len)) > 0.3
        want = own(mx.array(q), k, v, 0.125, mask, 64, bits)  # copies: mlx-lm scales its queries in place
        got = bq.dequantized_attention(mx.array(q), k, v, 0.125, mask, 64, bits)
        assert got.shape == want.shape and mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), (heads, kv_heads, q_len, k_len)


def test_default_windows_score_at_least_16000_tokens_per_text_and_context():
    for context, count in zip((2048, 4096, 8192), (8, 4, 2)):
        assert count * (context - 1) >= 16000


def test_deroff_keeps_the_running_text_of_a_man_page():
    page = "\n".join([
        '.\\" Copyright comment', ".TH TCP 7 2022-10-30", ".SH NAME", "tcp \\- TCP protocol", ".SH DESCRIPTION",
        "This is an implementation of", ".BR connect (2)", "with \\fBbold\\fP and \\fIitalic\\fR words\\(emand a dash.",
        ".TS", "tab(:);", "l l.", "a:b", ".TE", ".PP", "Next paragraph."])
    text = bq.deroff(page)
    assert text.splitlines()[:3] == ["NAME", "tcp - TCP protocol", "DESCRIPTION"]
    assert "connect(2)" in text and "with bold and italic words--and a dash." in text
    assert "Copyright" not in text and "tab(:)" not in text and "a:b" not in text and "\\" not in text
    assert text.endswith("\n\nNext paragraph.")


def test_every_text_has_a_role_and_two_are_held_out():
    roles = {name: t.role for name, t in bq.TEXTS.items()}
    assert set(roles.values()) == {"tuning", "held-out"}
    assert roles["code"] == roles["prose"] == "tuning"
    assert sum(r == "held-out" for r in roles.values()) >= 2


def engines(q4c: float, q4_0: float | None) -> dict:
    out = {"fp16": {"ppl": 10.0, "kl": 0.0, "top1": 1.0, "tokens": 16376, "bits": 16.0, "ppl_change_pct": 0.0},
           "q4c": {"ppl": 10.0 * (1 + q4c / 100), "kl": q4c / 100, "top1": 0.9, "tokens": 16376, "bits": 4.41, "ppl_change_pct": q4c}}
    if q4_0 is not None:
        out["llama.cpp f16"] = {"ppl": 9.0, "kl": 0.0, "top1": 1.0, "tokens": 16376, "ppl_change_pct": 0.0}
        out["llama.cpp q4_0"] = {"ppl": 9.0 * (1 + q4_0 / 100), "kl": q4_0 / 50, "top1": 0.8, "tokens": 16376, "ppl_change_pct": q4_0}
    return out


def result(texts: dict) -> dict:
    return {"texts": {t: {"role": role, "contexts": {c: {"windows": 8, "window_starts": [0], "engines": e} for c, e in ctxs.items()},
                          "greedy": {}} for t, (role, ctxs) in texts.items()}}


def test_headline_keeps_held_out_texts_apart_and_compares_on_the_same_windows():
    res = result({"code": ("tuning", {"2048": engines(1.0, 7.0)}),
                  "gnu-standards": ("held-out", {"2048": engines(2.0, 6.0), "4096": engines(4.0, None)})})
    h = bq.headline({"m": res})["m"]
    assert h["ppl_change_pct"] == pytest.approx(7 / 3, abs=1e-3) and h["ppl_change_worst_pct"] == 4.0
    assert h["held_out_ppl_change_pct"] == 3.0 and h["held_out_texts"] == ["gnu-standards"]
    assert h["tuning_ppl_change_pct"] == 1.0 and h["tuning_texts"] == ["code"] and h["tuning_scored_tokens_per_text"] == 16376
    assert h["held_out_llama_cpp_q4_0_ppl_change_pct"] == 6.0  # only where it ran
    assert h["held_out_ours_where_llama_cpp_ran_ppl_change_pct"] == 2.0
    assert h["held_out_compared_with_llama_cpp_on"] == ["gnu-standards 2048"]
    assert h["held_out_beats_llama_cpp_q4_0_wherever_both_ran"] is True
    line = benchreport.quality_line("m", h)
    assert "held-out text (gnu-standards" in line and "+3.00%" in line and "llama.cpp q4_0 +6.00%" in line
    both = bq.headline({"m": result({"gnu-standards": ("held-out", {"2048": engines(2.0, 6.0), "4096": engines(4.0, None)}),
                                     "man-pages": ("held-out", {"2048": engines(1.0, 5.0)})})})["m"]
    assert both["held_out_contexts_by_text"] == {"gnu-standards": [2048, 4096], "man-pages": [2048]}
    assert "(gnu-standards at 2,048 and 4,096 tokens; man-pages at 2,048 tokens; at least" in benchreport.quality_line("m", both)
    tuning_only = bq.headline({"m": result({"code": ("tuning", {"2048": engines(1.0, 7.0)})})})["m"]
    assert "held_out_ppl_change_pct" not in tuning_only
    assert "on the tuning texts (no held-out run): ppl +1.00%" in benchreport.quality_line("m", tuning_only)
    assert "mlx-lm" not in benchreport.quality_line("m", both)
    with_mlx = engines(2.0, 6.0) | {"mlx-lm q4": {"ppl": 12.0, "kl": 0.1, "top1": 0.7, "tokens": 16376, "ppl_change_pct": 20.0}}
    h = bq.headline({"m": result({"gnu-standards": ("held-out", {"2048": with_mlx, "4096": engines(4.0, 8.0)})})})["m"]
    assert (h["held_out_mlx_lm_q4_ppl_change_pct"], h["held_out_ours_where_mlx_lm_ran_ppl_change_pct"]) == (20.0, 2.0)
    assert h["held_out_compared_with_mlx_lm_on"] == ["gnu-standards 2048"] and h["held_out_beats_mlx_lm_q4_wherever_both_ran"] is True
    assert "; mlx-lm q4 +20.00% (KL 0.1000) on the windows of 1 of 2 text contexts, where q4c is +2.00%" in benchreport.quality_line("m", h)
    sliding = {**result({"gnu-standards": ("held-out", {"2048": with_mlx})}), "mlx_lm_layers": {"quantized": 3, "total": 18}}
    h = bq.headline({"m": sliding})["m"]
    assert "mlx-lm q4 (15 of its 18 layers, the sliding-window ones, not quantized) +20.00%" in benchreport.quality_line("m", h)
    h = bq.headline({"m": {**sliding, "mlx_lm_layers": {"quantized": 18, "total": 18}}})["m"]
    assert "; mlx-lm q4 +20.00%" in benchreport.quality_line("m", h)


def test_merge_keeps_every_run_and_merges_a_texts_contexts(tmp_path):
    def part(name, texts, settings):
        return {"command": f"python scripts/bench_quality.py --texts {name}", "settings": settings, "machine": {"cpu": "x", "date": "d"},
                "models": {"m": {**result(texts), "seconds": 10.0, "partial": False}}}

    import json
    new = {"contexts": [2048], "windows": [8], "texts": ["gnu-standards"], "peers": ["llama.cpp q4_0"], "extra_modes": [],
           "prompts": 0, "prompt_tokens": 512, "gen": 128}
    old = {"contexts": [2048], "windows": [1], "prompts": 1, "prompt_tokens": 512, "gen": 64}  # before texts had roles
    (tmp_path / "a.json").write_text(json.dumps(part("gnu-standards", {"gnu-standards": ("held-out", {"2048": engines(2.0, 6.0)})}, new)))
    b = part("code", {"code": ("tuning", {"2048": engines(1.0, 7.0)})}, old)
    del b["models"]["m"]["texts"]["code"]["role"]
    (tmp_path / "b.json").write_text(json.dumps(b))
    data = bq.merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert [r["command"] for r in data["runs"]] == ["python scripts/bench_quality.py --texts gnu-standards", "python scripts/bench_quality.py --texts code"]
    assert "earlier method" in data["runs"][1]["note"] and data["models"]["m"]["texts"]["code"]["role"] == "tuning"
    assert data["models"]["m"]["seconds"] == 20.0 and data["headline"]["m"]["held_out_texts"] == ["gnu-standards"]
    md = bq.markdown(data)
    assert "| gnu-standards | held-out |" in md and "| code | tuning |" in md and "earlier method" in md
    # A text's contexts merge across files; a later file's run of a context replaces an earlier one's
    c = part("gnu-standards", {"gnu-standards": ("held-out", {"2048": engines(3.0, 5.0), "4096": engines(4.0, 8.0)})}, new)
    c["models"]["m"]["texts"]["gnu-standards"]["contexts"]["2048"]["window_starts"] = [2047]  # other windows
    (tmp_path / "c.json").write_text(json.dumps(c))
    merged = bq.merge([tmp_path / "a.json", tmp_path / "c.json"])["models"]["m"]["texts"]["gnu-standards"]["contexts"]
    assert list(merged) == ["2048", "4096"] and merged["2048"] == c["models"]["m"]["texts"]["gnu-standards"]["contexts"]["2048"]
    # ... unless both ran the same windows: a run of peers alone joins its engines to the earlier run's
    peers = {n: v for n, v in engines(3.0, 5.0).items() if n.startswith("llama.cpp")}
    peers["llama.cpp q8_0"] = {**peers["llama.cpp f16"], "ppl": 9.01, "ppl_change_pct": 0.1}
    d = part("gnu-standards", {"gnu-standards": ("held-out", {"2048": peers})}, {**new, "peers_only": True})
    (tmp_path / "d.json").write_text(json.dumps(d))
    joined = bq.merge([tmp_path / "a.json", tmp_path / "d.json"])
    ctx = joined["models"]["m"]["texts"]["gnu-standards"]["contexts"]["2048"]
    assert list(ctx["engines"]) == ["fp16", "q4c", "llama.cpp f16", "llama.cpp q4_0", "llama.cpp q8_0"]
    assert ctx["engines"]["q4c"]["ppl_change_pct"] == 2.0 and ctx["engines"]["llama.cpp q4_0"]["ppl_change_pct"] == 5.0
    assert joined["headline"]["m"]["held_out_llama_cpp_q4_0_ppl_change_pct"] == 5.0
    # a fact about the model that only a later file recorded is kept
    d["models"]["m"]["mlx_lm_layers"] = {"quantized": 3, "total": 18}
    (tmp_path / "d.json").write_text(json.dumps(d))
    assert bq.merge([tmp_path / "a.json", tmp_path / "d.json"])["headline"]["m"]["mlx_lm_layers"] == {"quantized": 3, "total": 18}
    assert "peers alone on the windows of an earlier run: llama.cpp q4_0" in bq.markdown(joined)
    d["models"]["m"]["texts"]["gnu-standards"]["contexts"]["2048"]["window_starts"] = [2047]
    (tmp_path / "d.json").write_text(json.dumps(d))
    with pytest.raises(SystemExit, match="same windows"):  # peers alone never stand in for a context's own run
        bq.merge([tmp_path / "a.json", tmp_path / "d.json"])


def test_alternation_rotates_the_order_and_keeps_every_sample():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("cold", "warm", "hot")}
    samples = ttft.alternated(fns, 3)
    assert calls == ["cold", "warm", "hot",  # untimed warm-up of each
                     "cold", "warm", "hot", "warm", "hot", "cold", "hot", "cold", "warm"]
    assert {k: len(v) for k, v in samples.items()} == {"cold": 3, "warm": 3, "hot": 3}
    r = ttft.ratios([10.0, 30.0, 20.0], [1.0, 2.0, 4.0])  # per repeat: 10, 15, 5
    assert (r["median"], r["min"], r["max"], r["n"]) == (10.0, 5.0, 15.0, 3)
