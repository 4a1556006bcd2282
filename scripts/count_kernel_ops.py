"""Operations per token and query head of the decode-attention kernel, counted by the CPU harness.

For each model shape, one decode step over a 1024-token Q4 and q4c cache
(one sequence, one split) runs through kernels/harness built with
-DHARNESS_COUNT, which counts every lane's SIMD-group function calls, exp
calls and fp16 -> float conversions (loads of cache scales and biases, and
of the queries). The counts are divided by tokens x query heads, so the
once-per-threadgroup work is spread over the tokens. Integer and float
arithmetic is not counted.

    python scripts/count_kernel_ops.py [--label after] [--source FILE]

`--source` counts another body of decode_attention.metal (the kernel before
a change, say); the counts go under `--label` in bench_results/kernel_ops.json,
beside the others, and the table in kernels/README.md is rewritten from it,
one step per label of STAGES present in the file.
"""

from __future__ import annotations

import mlx_agentcache  # noqa: F401  (before mlx.core: loads the optimized BLAS)

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness_runner import Harness  # noqa: E402

from mlx_agentcache import metal_kernels, q4_format  # noqa: E402

SHAPES = {"smollm2-135m": (3, 64), "gemma3-270m": (4, 256), "llama3-8b": (4, 128)}  # (R, D), one kv head
TOKENS = 1024
OUT = ROOT / "bench_results" / "kernel_ops.json"


def pass1(harness: Harness, layout: str, r: int, d: int):
    """The recorded pass-1 launch of one decode step."""
    rng = np.random.default_rng(r * d)
    queries = mx.array(rng.standard_normal((1, r, 1, d)).astype(np.float32)).astype(mx.float16)
    k, v = (mx.array(rng.standard_normal((1, 1, TOKENS, d)).astype(np.float32)) for _ in range(2))
    lengths = mx.array([TOKENS], dtype=mx.int32)
    with harness.installed(run=False) as recorder:
        if layout == "q4":
            metal_kernels.decode_attention(queries, q4_format.quantize(k), q4_format.quantize(v), d**-0.5,
                                           lengths, splits=1)
        else:
            metal_kernels.decode_attention_q4c(queries, q4_format.quantize_keys(k), q4_format.quantize_values(v),
                                               d**-0.5, lengths, splits=1)
    return recorder.launches[0]


def count(harness: Harness, launch, r: int) -> dict:
    proc, _ = harness.start(launch, sanitize="count", seed=1)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    m = re.search(r"counts simd (\d+) exp (\d+) convert (\d+)", proc.stderr)
    per = TOKENS * r
    return {k: round(int(v) / per, 2) for k, v in zip(("simd", "exp", "convert"), m.groups())}


README = ROOT / "kernels" / "README.md"
TABLE_START, TABLE_END = "<!-- kernel_ops table: scripts/count_kernel_ops.py -->", "<!-- end of kernel_ops table -->"


# The kernel's versions, oldest first: as first written; with the inner loops' rescaling, q4c scale
# hoisting and 32-bit offsets; with several tokens per butterfly as well.
STAGES = ("before", "loops", "after")


def table(data: dict) -> str:
    """The README's table: SIMD-group functions / exp / conversions per token and head, one step per stage."""
    lines = [TABLE_START, "", "| shape (R, D) | layout | SIMD-group functions | exp | fp16 conversions |", "|---|---|---|---|---|"]
    stages = [s for s in STAGES if s in data]
    for key in data["after"]:
        name, layout = key.split()
        r, d = SHAPES[name]
        cells = [" -> ".join(f"{data[s][key][k]:g}" for s in stages) for k in ("simd", "exp", "convert")]
        lines.append(f"| {name} ({r}, {d}) | {layout} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", TABLE_END])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after")
    ap.add_argument("--source", type=Path, help="another decode_attention.metal body to count")
    args = ap.parse_args()
    harness = Harness(Path(tempfile.mkdtemp()))
    counts = {}
    for name, (r, d) in SHAPES.items():
        for layout in ("q4", "q4c"):
            launch = pass1(harness, layout, r, d)
            if args.source:
                launch = dataclasses.replace(launch, source=args.source.read_text())
            counts[f"{name} {layout}"] = count(harness, launch, r)
            print(name, layout, counts[f"{name} {layout}"], flush=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data.update({"tokens": TOKENS, "what": "per token and query head: every lane's SIMD-group function calls, "
                 "exp calls, fp16/bfloat16 -> float conversions; one sequence, one split, fp16 queries",
                 args.label: counts})
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    if "after" in data:
        text = README.read_text()
        a, b = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
        README.write_text(text[:a] + table(data) + text[b:])


if __name__ == "__main__":
    main()
