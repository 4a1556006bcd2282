"""Matrix products: MLX with each available BLAS vs NumPy vs llama.cpp's ggml, same shapes.

Why: on Linux MLX's CPU speed is the speed of the BLAS it finds (`mlx_agentcache/blas.py`).
This measures what each choice gives on the shapes our models run, beside the two
peers a user would compare with: NumPy (its own OpenBLAS) and llama.cpp's ggml
(float32 weights, and Q4_1 weights as llama.cpp runs SmolLM2's GGUF).

Each engine runs in its own child process (the BLAS is fixed when mlx.core loads);
engines alternate within every round, each child warms up untimed, and the table
gives the median GFLOP/s over all rounds with the min-max spread. Every engine gets
the same thread count (--threads, default cores - 1, the runtime's default).

Writes bench_results/blas.json and blas.md, with the CPU named.

    python scripts/bench_blas.py [--rounds 3] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench_results"

# (label, A shape, B shape): A @ B, B held transposed as weights are. SmolLM2: hidden 576, MLP 1536, vocab 49152, 9 heads of 64.
SHAPES = [
    ("square 1024", (1024, 1024), (1024, 1024)),
    ("prefill 512 tok: MLP up", (512, 576), (576, 1536)),
    ("prefill 512 tok: MLP down", (512, 1536), (1536, 576)),
    ("decode 1 tok: MLP up", (1, 576), (576, 1536)),
    ("decode 1 tok: LM head", (1, 576), (576, 49152)),
    ("attention scores 9x512x512", (9, 512, 64), (9, 64, 512)),
]

CHILD = r"""
import json, os, sys, time
engine, reps = sys.argv[1], int(sys.argv[2])
shapes = json.loads(sys.argv[3])
import numpy as np
rng = np.random.default_rng(0)

def operands(sa, sb):  # A and B^T: B is held transposed (N x K), as nn.Linear weights and attention keys are
    a = rng.standard_normal(sa).astype(np.float32)
    bt = rng.standard_normal(tuple(sb[:-2]) + (sb[-1], sb[-2])).astype(np.float32)
    return a, bt

def timeit(fn):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out

res = {"engine": engine, "times": {}, "max_rel_err": 0.0}
if engine.startswith("mlx"):
    import mlx_agentcache
    from mlx_agentcache import blas
    import mlx.core as mx
    res["blas"] = blas.CHOICE.summary()
    for label, sa, sb in shapes:
        a, bt = operands(sa, sb)
        ma, mb = mx.array(a), mx.array(bt).swapaxes(-1, -2)
        res["times"][label] = timeit(lambda: mx.eval(ma @ mb))
        want = a.astype(np.float64) @ bt.swapaxes(-1, -2).astype(np.float64)
        res["max_rel_err"] = max(res["max_rel_err"], float(np.abs(np.array(ma @ mb) - want).max() / np.abs(want).max()))
elif engine == "numpy":
    res["blas"] = "NumPy's bundled OpenBLAS"
    for label, sa, sb in shapes:
        a, bt = operands(sa, sb)
        b = bt.swapaxes(-1, -2)
        res["times"][label] = timeit(lambda: a @ b)
else:  # llama.cpp's ggml through the libraries that llama-cpp-python ships
    import ctypes
    import llama_cpp
    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(os.path.join(lib, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(os.path.join(lib, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    class Init(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    base.ggml_init.argtypes, base.ggml_init.restype = [Init], P
    base.ggml_new_tensor_3d.argtypes, base.ggml_new_tensor_3d.restype = [P, ctypes.c_int, I64, I64, I64], P
    base.ggml_mul_mat.argtypes, base.ggml_mul_mat.restype = [P, P, P], P
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [P], P
    base.ggml_build_forward_expand.argtypes = [P, P]
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [P], P
    base.ggml_free.argtypes = [P]
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, P, P, I64, I64, I64, P]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    cpu.ggml_graph_compute_with_ctx.argtypes, cpu.ggml_graph_compute_with_ctx.restype = [P, P, ctypes.c_int], ctypes.c_int
    if hasattr(cpu, "ggml_cpu_init"):
        cpu.ggml_cpu_init()
    F32, Q4_1 = 0, 3
    wtype = Q4_1 if engine.endswith("q4_1") else F32
    threads = int(os.environ["BENCH_THREADS"])
    res["blas"] = f"ggml, {'Q4_1' if wtype == Q4_1 else 'f32'} weights"
    for label, sa, sb in shapes:
        batch = sa[0] if len(sa) == 3 else 1
        m, k = sa[-2], sa[-1]
        n = sb[-1]
        a, bt = operands(sa, sb)
        a, bt = a.reshape(batch, m, k), np.ascontiguousarray(bt.reshape(batch, n, k))
        ctx = base.ggml_init(Init(int(4 * batch * (m * k + k * n + m * n)) + (64 << 20), None, False))
        w = base.ggml_new_tensor_3d(ctx, wtype, k, n, batch)  # ggml: rows of K, one per output
        x = base.ggml_new_tensor_3d(ctx, F32, k, m, batch)
        if wtype == F32:
            ctypes.memmove(base.ggml_get_data(w), bt.ctypes.data, bt.nbytes)
        else:
            base.ggml_quantize_chunk(wtype, bt.ctypes.data, base.ggml_get_data(w), 0, batch * n, k, None)
        ctypes.memmove(base.ggml_get_data(x), a.ctypes.data, a.nbytes)
        y = base.ggml_mul_mat(ctx, w, x)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        run = lambda: cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
        res["times"][label] = timeit(run)
        got = np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(y), ctypes.POINTER(ctypes.c_float)), (batch, m, n))
        want = a.astype(np.float64) @ bt.transpose(0, 2, 1).astype(np.float64)
        if wtype == F32:
            res["max_rel_err"] = max(res["max_rel_err"], float(np.abs(got - want).max() / np.abs(want).max()))
        base.ggml_free(ctx)
print("RESULT " + json.dumps(res))
"""


def engines() -> list[tuple[str, dict]]:
    """Every engine that can run here, with the environment that selects it."""
    out = [("mlx + OpenBLAS (scipy-openblas32)", {"AGENTCACHE_BLAS": "openblas"})]
    from mlx_agentcache.blas import mkl_library, plan, read_cpuinfo

    if mkl_library() and plan(read_cpuinfo(), "mkl")[0] == "mkl":
        out.append(("mlx + Intel MKL", {"AGENTCACHE_BLAS": "mkl"}))
    out.append(("mlx + reference BLAS (wheel default)", {"AGENTCACHE_BLAS": "reference"}))
    out.append(("numpy", {}))
    try:
        import llama_cpp  # noqa: F401

        out += [("llama.cpp ggml f32", {}), ("llama.cpp ggml q4_1", {})]
    except ImportError:
        print("llama-cpp-python is not installed: ggml rows left out", file=sys.stderr)
    return out


def child(engine: str, env_extra: dict, reps: int, threads: int) -> dict:
    kind = "mlx" if engine.startswith("mlx") else "numpy" if engine == "numpy" else ("ggml_q4_1" if "q4_1" in engine else "ggml_f32")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTCACHE_BLAS", "OPENBLAS_", "MKL_"))}
    env.update(env_extra, OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), BENCH_THREADS=str(threads))
    shapes = json.dumps([[label, list(a), list(b)] for label, a, b in SHAPES])
    p = subprocess.run([sys.executable, "-c", CHILD, kind, str(reps), shapes], env=env, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"{engine} failed (rc {p.returncode}): {p.stderr[-1500:]}")
    return json.loads(line[0][7:])


def flops(sa, sb) -> float:
    batch = sa[0] if len(sa) == 3 else 1
    return 2.0 * batch * sa[-2] * sa[-1] * sb[-1]


def machine(threads: int) -> dict:
    from mlx_agentcache.blas import read_cpuinfo

    import mlx.core as mx

    cpu = read_cpuinfo()
    return {"cpu": cpu.model, "arch": cpu.arch, "features": cpu.features(), "cores": os.cpu_count(),
            "threads": threads, "os": platform.platform(), "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")}


def markdown(res: dict) -> str:
    m = res["machine"]
    feats = ", ".join(k for k, v in m["features"].items() if v)
    lines = [f"# Matrix products, GFLOP/s ({m['cpu']}; {feats}; {m['threads']} thread(s); {m['date']})", "",
             f"Median over {res['samples']} timed runs per cell (min-max in brackets); engines alternate within each round.", "",
             "| shape | " + " | ".join(res["engines"]) + " |", "|---|" + "---|" * len(res["engines"])]
    for label, *_ in SHAPES:
        cells = []
        for e in res["engines"]:
            c = res["results"][e][label]
            cells.append(f"{c['gflops_median']:.1f} [{c['gflops_min']:.1f}-{c['gflops_max']:.1f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (median GFLOP/s of mlx + OpenBLAS over each other engine):", ""]
    for e, r in res["headline"]["openblas_over"].items():
        lines.append(f"- {e}: {r:.2f}x (geometric mean over shapes)")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per shape in each child")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    todo = engines()
    times: dict[str, dict[str, list[float]]] = {e: {label: [] for label, *_ in SHAPES} for e, _ in todo}
    meta = {}
    for r in range(args.rounds):
        for e, env in todo:
            res = child(e, env, args.reps, args.threads)
            meta[e] = {"blas": res.get("blas"), "max_rel_err_vs_float64": res["max_rel_err"]}
            for label, ts in res["times"].items():
                times[e][label] += ts
            print(f"round {r + 1}/{args.rounds}: {e} done", flush=True)
    results = {}
    for e in times:
        results[e] = {}
        for label, sa, sb in SHAPES:
            g = sorted(flops(sa, sb) / t / 1e9 for t in times[e][label])
            results[e][label] = {"gflops_median": statistics.median(g), "gflops_min": g[0], "gflops_max": g[-1],
                                 "seconds": times[e][label]}
    ours = "mlx + OpenBLAS (scipy-openblas32)"
    over = {}
    for e in results:
        if e != ours:
            ratios = [results[ours][label]["gflops_median"] / results[e][label]["gflops_median"] for label, *_ in SHAPES]
            over[e] = statistics.geometric_mean(ratios)
    out = {"machine": machine(args.threads), "engines": list(results), "engine_details": meta,
           "samples": args.rounds * args.reps, "shapes": [[label, a, b] for label, a, b in SHAPES],
           "results": results, "headline": {"openblas_over": over}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blas.json").write_text(json.dumps(out, indent=1))
    (args.out / "blas.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
