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
    p = bench("all", "--quick", "--out", str(tmp_path), home=model_home, timeout=1500)
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
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert decode["results"][0]["mlx_lm"]["ms_per_token"] > 0  # the baseline is mlx-lm's own cache
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert {"smollm2-135m", "gemma3-270m"} <= set(quality["headline"])
    handoff = json.loads((tmp_path / "handoff.json").read_text())
    assert handoff["fidelity"]["budgets"] and handoff["workflow"]
    interleave = json.loads((tmp_path / "interleave.json").read_text())
    assert interleave["quick"] is True and interleave["headline"]["overlap_vs_hot_8b_geometry"] > 0
    report = tmp_path / "REPORT.md"
    text = report.read_text()
    for heading in ("## Machine", "## Published figures beside ours", "## Time to first token", "## Quality", "## Capacity",
                    "## Decode: our caches vs mlx-lm's own KVCache", "## Reloads hidden behind decoding, and batched decode",
                    "## Handoff", "## HTTP server under load"):
        assert heading in text, heading
    assert not [line for line in text.splitlines() if "in this directory" in line]  # every section found its JSON
    assert machine["cpu"] in text
    for name in benchreport.BENCHES:
        assert f"| {name} (quick) | ok |" in text, name
    images = linked_images(report)
    assert len(images) >= 5
    for img in images:
        assert img.read_bytes()[:8] == PNG, img


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
                    "## Reloads hidden behind decoding, and batched decode", "## Handoff"):
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


def test_unknown_benchmark_is_a_usage_error(tmp_path):
    p = bench("warp-speed", "--out", str(tmp_path))
    assert p.returncode == 2 and "unknown benchmark warp-speed" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


@pytest.mark.parametrize("quick", [True, False])
def test_every_benchmark_maps_to_a_script_and_its_options(quick):
    for name in benchreport.BENCHES:
        cmd = benchreport.command(name, ROOT, Path("/out"), quick, ["gemma3-270m"])
        assert cmd[1].endswith(benchreport.SPECS[name].script) and cmd[-2] == "--out"
        if benchreport.SPECS[name].models:
            assert "gemma3-270m" in cmd and cmd.count("--models") + cmd.count("--model") == 1
