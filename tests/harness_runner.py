"""Compiles kernels/harness/harness.cpp and runs the kernel bodies through it (shared by the kernel tests)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_agentcache import metal_kernels
from mlx_agentcache.q4_format import KEY_GROUP, VALUE_GROUP, Q4

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
Q4_OUT = {"packed": np.uint32, "scales": np.float16, "biases": np.float16}
CXX_TYPE = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t"}


def np_(a: mx.array) -> np.ndarray:
    return np.array(a)


def to_raw(a: mx.array) -> np.ndarray:
    """An MLX array as NumPy, bfloat16 as its raw uint16 bits."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


class Harness:
    """Compiles harness.cpp once per set of -D flags (and sanitizer) and runs it on raw files."""

    def __init__(self, root: Path, kernels: Path = KERNELS):
        self.root = root
        self.source = kernels / "harness" / "harness.cpp"
        self.binaries = {}
        self.runs = 0

    def binary(self, defines: tuple, tsan: bool = False) -> Path:
        key = (defines, tsan)
        if key not in self.binaries:
            out = self.root / f"harness{len(self.binaries)}"
            flags = ["-O1", "-g", "-fsanitize=thread"] if tsan else ["-O2"]
            cmd = ["g++", *flags, "-std=c++17", "-ffp-contract=off", "-pthread", "-Wall", "-Werror",
                   *defines, "-o", str(out), str(self.source)]
            subprocess.run(cmd, check=True)
            self.binaries[key] = out
        return self.binaries[key]

    def start(self, op: str, args, inputs: dict, defines=(), tsan=False, seed=None, timeout_s=None):
        """Run the harness; returns (completed process, its directory)."""
        self.runs += 1
        d = self.root / f"run{self.runs}"
        d.mkdir()
        for name, a in inputs.items():
            np.ascontiguousarray(a).tofile(d / f"{name}.bin")
        env = dict(os.environ)
        if seed is not None:
            env["HARNESS_SEED"] = str(seed)
        if timeout_s is not None:
            env["HARNESS_TIMEOUT_S"] = str(timeout_s)
        if tsan:
            env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66"
        cmd = [str(self.binary(tuple(defines), tsan)), op, str(d), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
        return proc, d

    def run(self, op: str, args, inputs: dict, outputs: dict, defines=(), **kw) -> dict:
        proc, d = self.start(op, args, inputs, defines, **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"harness {op} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return {name: np.fromfile(d / f"{name}.bin", dtype=dt) for name, dt in outputs.items()}

    # --- the kernels' contracts, computed by their sources -------------------

    def decode_defines(self, dtype: mx.Dtype, d: int, dv: int, r: int, q4c: bool = False) -> list[str]:
        plan = metal_kernels.decode_plan(dtype, d, dv, r)
        if plan is None:
            raise ValueError(f"decode_plan refuses {dtype}, D={d}, Dv={dv}, R={r}")
        layout = [f"-DDEC_KC={KEY_GROUP}", f"-DDEC_VS={VALUE_GROUP}"] if q4c else []
        return [f"-DDEC_T={CXX_TYPE[plan.dtype]}", f"-DDEC_D={d}", f"-DDEC_DV={dv}", f"-DDEC_R={r}",
                f"-DDEC_RT={plan.rows}", f"-DDEC_NSG={metal_kernels.SIMD_GROUPS}", *layout]

    def decode_inputs(self, queries: mx.array, kq: Q4, vq: Q4, scale: float, lengths) -> dict:
        """The decode inputs, named as in kernels/README.md."""
        inputs = {"queries": to_raw(queries), "lengths": np.asarray(lengths, np.int32),
                  "first": np.zeros(1, np.int32), "scale": np.array([scale], np.float32)}
        for p, c in (("k_", kq), ("v_", vq)):
            inputs.update({p + name: np_(a) for name, a in zip(Q4_OUT, c)})
        return inputs

    def decode_attention(self, queries: mx.array, kq: Q4, vq: Q4, scale: float, lengths=None,
                         splits=None, **kw) -> mx.array:
        """metal_kernels.decode_attention's contract (both passes), through the harness."""
        b, h, _, d = queries.shape
        _, n_kv, n, _ = kq.packed.shape
        dv = vq.packed.shape[-1] * 8
        r = h // n_kv
        defines = self.decode_defines(queries.dtype, d, dv, r)
        plan = metal_kernels.decode_plan(queries.dtype, d, dv, r)
        s = splits or metal_kernels.split_count(n_kv * plan.tiles * b, n)
        lengths = np.full(b, n) if lengths is None else np_(lengths)
        raw = np.uint16 if queries.dtype == mx.bfloat16 else np_(queries[:0]).dtype
        out = self.run("decode", [b, n_kv, n, s], self.decode_inputs(queries, kq, vq, scale, lengths),
                       {"out": raw}, defines, **kw)["out"]
        out = mx.array(out.reshape(b, h, 1, dv))
        return out.view(mx.bfloat16) if queries.dtype == mx.bfloat16 else out

    def quantize(self, x: mx.array) -> Q4:
        """metal_kernels.quantize's contract through the harness."""
        x16 = np_(x.astype(mx.float16))
        got = self.run("quantize", [x16.size // 64], {"x": x16}, Q4_OUT)
        lead = x16.shape[:-1]
        return Q4(*(mx.array(got[n].reshape(*lead, -1)) for n in Q4_OUT))

    def quantize_keys(self, x: mx.array) -> tuple:
        """metal_kernels.quantize_keys's contract through the harness."""
        x16 = np_(x.astype(mx.float16))
        *lead, t, d = x16.shape
        rows = x16.size // d
        got = self.run("quantize_keys", [rows], {"x": x16}, Q4_OUT, [f"-DDEC_D={d}", f"-DDEC_DV={d}"])
        return (mx.array(got["packed"].reshape(*lead, t, d // 8)),
                *(mx.array(got[n].reshape(*lead, t // KEY_GROUP, d)) for n in ("scales", "biases")))

    def quantize_values(self, x: mx.array) -> tuple:
        """metal_kernels.quantize_values's contract through the harness."""
        x16 = np_(x.astype(mx.float16))
        lead = x16.shape[:-1]
        got = self.run("quantize_values", [x16.size // VALUE_GROUP], {"x": x16},
                       {"packed": np.uint32, "scales": np.float16})
        return mx.array(got["packed"].reshape(*lead, -1)), mx.array(got["scales"].reshape(*lead, -1))

    def decode_attention_q4c(self, queries: mx.array, kq: tuple, vq: tuple, scale: float, lengths,
                             exact_k=None, exact_v=None, first=0, splits=None, **kw) -> mx.array:
        """metal_kernels.decode_attention_q4c's contract: pass 1 through the harness (q4c
        layout), the fp16 extra tokens as one more split, both merged by the combine."""
        b, h, _, d = queries.shape
        _, n_kv, n, _ = kq[0].shape
        dv = vq[0].shape[-1] * 8
        r = h // n_kv
        plan = metal_kernels.decode_plan(queries.dtype, d, dv, r)
        s = splits or metal_kernels.split_count(n_kv * plan.tiles * b, n)
        inputs = {"queries": to_raw(queries), "lengths": np_(lengths).astype(np.int32),
                  "first": np.array([first], np.int32), "scale": np.array([scale], np.float32)}
        inputs.update({"k_" + name: np_(a) for name, a in zip(Q4_OUT, kq)})
        inputs.update({"v_packed": np_(vq[0]), "v_scales": np_(vq[1])})
        got = self.run("decode", [b, n_kv, n, s], inputs, {"partial": np.float32, "maxes": np.float32, "sums": np.float32},
                       self.decode_defines(queries.dtype, d, dv, r, q4c=True), **kw)
        partial = mx.array(got["partial"].reshape(b, h, s, dv))
        maxes, sums = (mx.array(got[k].reshape(b, h, s)) for k in ("maxes", "sums"))
        return metal_kernels.merge_exact(partial, maxes, sums, queries, scale, exact_k, exact_v, self.combine)

    def combine(self, partial: mx.array, maxes: mx.array, sums: mx.array, dtype: mx.Dtype) -> mx.array:
        """The combine kernel (pass 2) through the harness."""
        b, h, s, dv = partial.shape
        raw = np.uint16 if dtype == mx.bfloat16 else np.dtype(str(dtype).rsplit(".", 1)[-1])
        inputs = {"partial": np_(partial), "maxes": np_(maxes), "sums": np_(sums)}
        defines = [f"-DDEC_T={CXX_TYPE[str(dtype).rsplit('.', 1)[-1]]}", f"-DDEC_DV={dv}"]
        out = mx.array(self.run("combine", [b * h, s], inputs, {"out": raw}, defines)["out"].reshape(b, h, 1, dv))
        return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out
