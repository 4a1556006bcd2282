"""`agentcache bench`: a quick real run of one benchmark, and the report over the committed results.

Structure, not speed: the machine is recorded, the benchmark's JSON and log
land in --out, REPORT.md has its sections with the published figures labelled
by source, every plot it links is a PNG that exists, and the README's
generated section is rewritten between its markers and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_agentcache import benchreport

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def bench(*args, home: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"AGENTCACHE_HOME": str(home)} if home else {}))
    return subprocess.run([sys.executable, "-m", "mlx_agentcache", "bench", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def linked_images(report: Path) -> list[Path]:
    return [report.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def test_quick_run_of_every_benchmark_records_the_machine_and_writes_the_report(tmp_path, smollm2_path, gemma3_path, model_home):
    """`agentcache bench all --quick`, the smoke run: every script runs on the real models and
    every section of the report is filled from what it wrote (structure, not speed)."""
    p = bench("all", "--quick", "--out", str(tmp_path), home=model_home, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert {"cpu", "cores", "memory_GiB", "os", "mlx", "device", "blas", "blas_threads", "peers", "disk"} <= set(machine)
    assert machine["cores"] == os.cpu_count() and machine["memory_GiB"] > 0 and machine["disk"]["read_MBps"] > 0
    assert machine["peers"]["mlx_lm"] and machine["peers"]["llama_cpp_python"]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert set(runs) == set(benchreport.BENCHES)
    for name, r in runs.items():
        assert r["rc"] == 0 and r["quick"] is True, name
        assert (tmp_path / r["log"]).read_text().strip(), name
        assert list(tmp_path.glob(benchreport.SPECS[name].outputs)), name
    plausible_results(tmp_path)
    assert json.loads((tmp_path / "interleave.json").read_text())["quick"] is True
    report = tmp_path / "REPORT.md"
    text = report.read_text()
    for heading in ("## Machine", "## Published figures beside ours", "## Time to first token", "## Quality", "## Capacity",
                    "## Decode: our caches vs mlx-lm's own KVCache", "## Reloads hidden behind decoding, and batched decode",
                    "## Handoff", "## HTTP server under load", "## More benchmarks"):
        assert heading in text, heading
    assert not [line for line in text.splitlines() if "in this directory" in line]  # every section found its JSON
    for name, spec in benchreport.SPECS.items():  # the ones without a section of their own are linked
        if spec.about and name in benchreport.BENCHES:
            assert f"[{Path(spec.outputs).stem}.md]" in text and (tmp_path / spec.outputs).with_suffix(".md").is_file(), name
    assert machine["cpu"] in text
    for name in benchreport.BENCHES:
        assert f"| {name} (quick) | ok |" in text, name
    images = linked_images(report)
    assert len(images) >= 5
    for img in images:
        assert img.read_bytes()[:8] == PNG, img


def within(x: float, lo: float, hi: float, what: str) -> None:
    assert lo <= x <= hi, f"{what} = {x}, outside the plausible band [{lo}, {hi}]"


def plausible_results(out: Path) -> None:
    """Each quick run's ratios in a band that a working benchmark lands in on any machine (wide:
    a slow or busy CPU moves times, not these orders), exact where the quantity is arithmetic."""
    get = lambda name: json.loads((out / name).read_text())  # noqa: E731
    for res in (get(p.name) for p in out.glob("ttft_*.json")):
        for n, r in res["contexts"].items():
            within(r["speedup_warm"], 1.5, 2000, f"ttft {res['model']} {n}: cold / warm")  # a restore beats a re-prefill
            within(r["ours"]["hot_ttft_ms"] / r["ours"]["cold_ttft_ms"], 0, 0.7, f"ttft {res['model']} {n}: hot / cold")
            if r.get("prefill_ratio_vs_llamacpp"):
                within(r["prefill_ratio_vs_llamacpp"], 0.05, 20, f"ttft {res['model']} {n}: prefill rate vs llama.cpp")
    quality = get("quality.json")
    assert {"smollm2-135m", "gemma3-270m"} <= set(quality["headline"])
    for model, h in quality["headline"].items():
        within(h["ppl_change_pct"], -3, 8, f"quality {model}: q4c ppl change %")
        within(h["kl"], 1e-4, 0.05, f"quality {model}: q4c KL")
        within(h["bits_per_value"], 4.3, 4.7, f"quality {model}: q4c bits at the window end")
    bits = get("bits.json")
    assert bits["llama_cpp_q4_0"]["bits_per_value"] == 4.5
    for model, r in bits["models"].items():
        for mode, exact in (("q4", 4.5), ("q4k", 4.5), ("q8", 8.5), ("fp16", 16.0)):
            assert all(c["min_bits"] == c["max_bits"] == pytest.approx(exact) for c in r["modes"][mode]["contexts"].values()), (model, mode)
        for c, x in r["modes"]["q4c"]["contexts"].items():
            within(x["bits_at_context"], 4.38, 4.6, f"bits {model} q4c at {c}")
            within(x["mean_bits"], x["bits_at_context"], 8, f"bits {model} q4c mean over 1..{c}")  # the short lengths pay for sinks and tail
    capacity = get("capacity.json")
    per_token = capacity["bytes_per_token"]
    within(per_token["fp16"] / per_token["q4"], 3.5, 3.6, "capacity: fp16 / q4 bytes per token")  # 16 / 4.5 in whole blocks
    within(per_token["fp16"] / per_token["q4c"], 1.4, 3.7, "capacity: fp16 / q4c bytes per token")  # a short cache (quick: 32 tokens) is mostly sinks and 8-bit tail
    decode = get("decode.json")
    for r in decode["results"]:
        for mode in ("fp16", "q4c", "q4", "q4k"):
            within(r[mode]["time_vs_mlx_lm"], 0.3, 5, f"decode {r['context']}: {mode} time vs mlx-lm's cache")
        within(r["q4c"]["time_vs_fp16"], 0.4, 2.5, f"decode {r['context']}: q4c time vs our fp16")
        if "llama_cpp_q4_0" in r:
            assert r["llama_cpp_q4_0"]["cache_bytes"] == pytest.approx(r["llama_cpp_f16"]["cache_bytes"] * 18 / 64)
    interleave = get("interleave.json")
    for name, r in interleave["runs"].items():
        within(r["overlap"]["vs_hot"]["median"], 0.5, 2.0, f"interleave {name}: overlapped reload / all hot")
        within(r["reload"]["vs_hot"]["median"], 0.5, 3.0, f"interleave {name}: reload without overlap / all hot")
        within(r["batch"]["4"]["speedup_spread"]["median"], 0.7, 4.5, f"interleave {name}: batch 4 / batch 1 tokens/s")
    handoff = get("handoff.json")
    assert handoff["fidelity"]["budgets"] and handoff["workflow"]
    for n, r in handoff["ttft"].items():
        within(r["card_mixed_4bit"]["receiver_ttft_ms"]["median"] / r["reprefill"]["receiver_ttft_ms"]["median"], 0.001, 0.9,
               f"handoff {n}: card TTFT / re-prefill")
    for budget, kl in handoff["headline"]["kl_hop5"].items():
        within(kl["mixed"], 0, 3, f"handoff: KL at hop 5, {budget} bits")
    server = get("server.json")
    for r in server["runs"]:
        assert r["checks"]["lost"] == 0 and r["checks"]["cross_agent_leaks"] == [], r["checks"]
    store = get("store.json")
    sharing = store["sharing"]  # shared q4c prefixes: one copy of the prefix, a short own part per agent
    within(sharing["six_agents"]["vs_one_agent"], 1.0, 2.0, "store: 6 agents sharing a system prompt / one agent's bytes")
    for row in sharing["n_agents"]["rows"]:
        within(row["vs_one_agent"], 1.0, 1 + 0.5 * (row["agents"] - 1), f"store: {row['agents']} agents sharing a prefix / one agent's bytes")
    within(sharing["ttft"]["new_vs_restore"], 0.2, 5, "store: TTFT of a new agent on a shared prefix / a warm restore")
    ttft = store["returning_ttft"]
    for x in ttft["agents"]:
        within(x["p50_ms"], 1, 60_000, f"store: p50 TTFT of a returning agent, {x['agents']} agents on disk")
        within(x["p95_ms"] / x["p50_ms"], 1, 50, f"store: p95 / p50 TTFT, {x['agents']} agents on disk")
    within(ttft["p95_ratio"], 0.2, 5, "store: p95 TTFT with many agents on disk / with 10")  # the disk, not the agent count
    for k in ("running_pool_ratio", "restart_ratio"):
        within(store["restore"][k], 0.05, 2, f"store: {k} (restore / sequential read bandwidth)")
    within(store["restore"]["allocate_ratio"], 0.05, 20, "store: a new process's allocation / sequential read bandwidth")  # no read: it may beat the disk
    arch = get("arch_accuracy.json")["models"]
    assert set(arch) == {"smollm2-135m", "gemma3-270m", "llama3-tiny-random", "deepseek-v2-tiny-random"}
    for model, r in arch.items():
        within(r["modes"]["q8"]["mean_kl"], 0, 0.005, f"arch {model}: q8 mean KL")
        within(r["modes"]["q4c"]["mean_kl"], 1e-6, 0.05, f"arch {model}: q4c mean KL")
        if not model.endswith("-random"):  # random models' flat distributions keep every mode close
            within(r["modes"]["q4"]["mean_kl"] / r["modes"]["q4c"]["mean_kl"], 2, 1000, f"arch {model}: q4 / q4c mean KL")
            within(r["mlx_lm_4bit"]["mean_kl"], 1e-3, 1, f"arch {model}: mlx-lm 4-bit mean KL")
    latent = arch["deepseek-v2-tiny-random"]["mla_latent_vs_full_fp16"]
    within(latent["max_abs_logit_diff"] / latent["logit_std"], 0, 0.01, "arch: DeepSeek latent vs full logits / their spread")
    for model, r in get("weight_forms.json")["models"].items():
        rows = max(r["layer_ms"], key=int)
        within(r["layer_ms"][rows]["quantized"]["median"] / r["layer_ms"][rows]["float32"]["median"], 3, 500,
               f"weights {model}: quantized / float32 layer time at {rows} rows")
        within(r["layer_ms"]["1"]["quantized"]["median"] / r["layer_ms"]["1"]["float32"]["median"], 0.5, 50,
               f"weights {model}: quantized / float32 layer time at 1 row")
        for form, rate in r["decode_tok_s"].items():
            for n, prefill in r["prefill_tok_s"].items():
                within(prefill[form]["median"] / rate["median"], 2, 1000, f"weights {model}: prefill {n} / decode tokens/s, {form}")
    prefix = get("prefix_quality.json")["models"]
    for model, r in prefix.items():
        if not r["shares_prefixes"]:
            assert model.startswith("gemma3") and "sliding-window" in r["why"], model
            continue
        assert r["fp16"]["kl_vs_fp16"] == 0 and r["q4c_own"]["kl_vs_q4c_own"] == 0
        for mode in ("q4c_own", "q4c_attached_one_go", "q4c_attached_turns"):
            within(r[mode]["kl_vs_fp16"], 1e-4, 0.05, f"prefix_quality {model}: {mode} KL vs fp16")
            within(r[mode]["ppl_change_vs_fp16_pct"], -3, 8, f"prefix_quality {model}: {mode} ppl change %")
            within(r[mode]["top1_agree"], 0.8, 1, f"prefix_quality {model}: {mode} top-1 agreement with fp16")
        for mode in ("q4c_attached_one_go", "q4c_attached_turns"):
            within(r[mode]["kl_vs_q4c_own"], 0, 0.05, f"prefix_quality {model}: {mode} KL vs its own q4c")
    mla = get("mla.json")
    assert mla["tiny_ratio"] == 8 and mla["coder_v2_lite_ratio"] == 8.89  # arithmetic from the configs
    for ctx in {r["context"] for r in mla["decode"]}:
        rate = {r["mode"]: r["decode_tokens_per_s"] for r in mla["decode"] if r["context"] == ctx}
        within(rate["latent"] / rate["full"], 0.3, 3, f"mla {ctx}: latent / full decode tokens/s")
    blas_ = get("blas.json")
    over = blas_["headline"]["openblas_over"]
    within(over["mlx + reference BLAS (wheel default)"], 3, 100, "blas: OpenBLAS / reference BLAS GFLOP/s")
    for engine in ("numpy", "llama.cpp ggml f32"):
        within(over[engine], 0.2, 5, f"blas: OpenBLAS / {engine} GFLOP/s")
    for engine, d in blas_["engine_details"].items():
        within(d["max_rel_err_vs_float64"], 0, 1e-4, f"blas {engine}: max relative error against float64")
    if (out / "grammar.json").exists():  # no full run committed yet
        for model, r in get("grammar.json")["models"].items():
            within(r["ratio"], 0.8, 5, f"grammar {model}: decode time per token held / free")
            within(r["mask_us"], 1, 100_000, f"grammar {model}: microseconds per mask")
    ablation = get("kv_layout_ablation.json")
    for m in ablation["models"]:
        for text, rows in m["texts"].items():
            q4 = rows["q4 (today: K, V asym g64)"]
            assert q4["bits"] == 4.5, (m["model"], text)
            within(q4["ppl_change"], -0.05, 1, f"ablation {m['model']} {text}: q4 ppl change")
            for name, r in rows.items():
                if name != "fp32 cache":
                    within(r["kl"], 1e-4, 0.5, f"ablation {m['model']} {text}: {name} KL")
                    within(r["bits"], 4.3, 4.8, f"ablation {m['model']} {text}: {name} bits per value")
            within(rows["K chan g64, V asym g64, 4 sinks"]["kl"] / q4["kl"], 0.01, 0.7, f"ablation {m['model']} {text}: keys per channel + sinks / q4 KL")


def test_the_plausibility_check_holds_for_the_committed_results():
    """The same bands hold for the full committed runs, and a result outside one fails."""
    plausible_results(ROOT / "bench_results")


def test_a_result_outside_its_band_fails(tmp_path):
    shutil.copytree(ROOT / "bench_results", tmp_path / "r", ignore=shutil.ignore_patterns("*.png"))
    decode = json.loads((tmp_path / "r" / "decode.json").read_text())
    decode["results"][0]["q4c"]["time_vs_fp16"] = 0.01  # a cache 100x faster than fp16: a broken run, not a result
    (tmp_path / "r" / "decode.json").write_text(json.dumps(decode))
    with pytest.raises(AssertionError, match="q4c time vs our fp16"):
        plausible_results(tmp_path / "r")


def test_report_over_the_committed_results(tmp_path):
    out = tmp_path / "results"
    shutil.copytree(ROOT / "bench_results", out, ignore=shutil.ignore_patterns("*.png", "REPORT.md"))
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n\n## Performance\n\n", "\n\n## Next section\n\nkept as is\n"
    readme.write_text(before + benchreport.README_BEGIN + "\nstale text\n" + benchreport.README_END + after)
    for _ in range(2):  # a second run rewrites the same section, nothing else
        p = bench("--report-only", "--out", str(out), "--readme", str(readme))
        assert p.returncode == 0, p.stderr[-2000:]
    report = out / "REPORT.md"
    text = report.read_text()
    for heading in ("## Machine", "## Published figures beside ours", "## Time to first token", "## Quality", "## Capacity",
                    "## Reloads hidden behind decoding, and batched decode", "## Handoff", "## More benchmarks"):
        assert heading in text, heading
    assert "arXiv:2603.04428" in text and "arXiv:2605.03884" in text  # their figures carry their source
    assert "(published" in text or "published (theirs)" in text
    images = linked_images(report)
    assert len(images) >= 5
    for img in images:
        assert img.read_bytes()[:8] == PNG, img
    new = readme.read_text()
    assert new.startswith(before) and new.endswith(after) and "stale text" not in new
    assert new.count(benchreport.README_BEGIN) == 1 and "arXiv:2603.04428" in new


def test_the_committed_report_is_what_its_files_give(tmp_path):
    """REPORT.md is generated: `--report-only` over a copy of bench_results/ writes it again, byte for byte."""
    out = tmp_path / "results"
    shutil.copytree(ROOT / "bench_results", out)
    p = bench("--report-only", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "REPORT.md").read_text() == (ROOT / "bench_results" / "REPORT.md").read_text()


def test_a_quick_run_without_out_leaves_the_results_alone(tmp_path, model_home):
    """A smoke run writes into bench_quick/ of the working directory, never over bench_results/."""
    env = dict(os.environ, AGENTCACHE_HOME=str(model_home))
    p = subprocess.run([sys.executable, "-m", "mlx_agentcache", "bench", "mla", "--quick"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (tmp_path / "bench_quick" / "mla.json").is_file() and (tmp_path / "bench_quick" / "mla.md").is_file()
    assert not (tmp_path / "bench_results").exists()


def test_unknown_benchmark_is_a_usage_error(tmp_path):
    p = bench("warp-speed", "--out", str(tmp_path))
    assert p.returncode == 2 and "unknown benchmark warp-speed" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_metal_runs_only_on_an_apple_gpu(tmp_path):
    """`bench metal` measures the Metal kernels and is never in `all`; without Metal it says why and runs nothing."""
    import mlx.core as mx

    assert "metal" not in benchreport.BENCHES
    p = bench("metal", "--quick", "--out", str(tmp_path / "out"))
    if mx.metal.is_available():
        assert p.returncode == 0 and (tmp_path / "out" / "metal.json").is_file(), p.stderr[-2000:]
    else:
        assert p.returncode == 2 and "mx.metal.is_available() is False" in p.stderr
        assert not (tmp_path / "out").exists()


def test_the_full_ablation_reruns_the_committed_layouts():
    """The layouts `bench ablation` passes are the committed file's rows, each one the script knows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablate_kv_layout", ROOT / "scripts" / "ablate_kv_layout.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = json.loads((ROOT / "bench_results" / "kv_layout_ablation.json").read_text())
    for m in committed["models"]:
        for rows in m["texts"].values():
            assert tuple(rows)[1:] == benchreport.ABLATION_LAYOUTS
    assert set(benchreport.ABLATION_LAYOUTS) <= set(script.LAYOUTS)
    full = benchreport.command("ablation", ROOT, Path("/out"), False, None)
    assert full[full.index("--layouts") + 1].split("|") == list(benchreport.ABLATION_LAYOUTS)
    assert full[full.index("--windows") + 1] == str(committed["windows"])


def test_the_full_store_run_measures_as_the_committed_file_was():
    """`agentcache bench store` passes the options every part of the committed store.json ran with."""
    full = benchreport.command("store", ROOT, Path("/out"), False, None)[2:-2]
    for part, command in json.loads((ROOT / "bench_results" / "store.json").read_text())["commands"].items():
        args = command.split()[2:]
        for option in ("--layers", "--repeats"):
            assert args[args.index(option) : args.index(option) + 2] == full[full.index(option) : full.index(option) + 2], part


@pytest.mark.parametrize("quick", [True, False])
def test_every_benchmark_maps_to_a_script_and_its_options(quick):
    for name in benchreport.SPECS:
        cmd = benchreport.command(name, ROOT, Path("/out"), quick, ["gemma3-270m"])
        assert cmd[1].endswith(benchreport.SPECS[name].script) and cmd[-2] == "--out"
        if benchreport.SPECS[name].models:
            assert "gemma3-270m" in cmd and cmd.count("--models") + cmd.count("--model") == 1
