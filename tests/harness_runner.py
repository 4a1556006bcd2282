"""Runs recorded mx.fast.metal_kernel launches on the CPU through kernels/harness (shared by the kernel tests).

`Harness.run(launch)` compiles kernels/harness/harness.cpp with clang (g++
ignores the section of a template's static locals, where the harness puts
threadgroup memory) around the source MLX would build for the launch
(`metal_launch.mlx_source`, `for_clang`), once per source
and build, runs it on the launch's inputs and returns its outputs as MLX
arrays. `Harness.installed()` puts a `KernelRecorder` in place of
mx.fast.metal_kernel, so `metal_kernels`' own wrappers launch through it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from metal_launch import TYPE_STRING, KernelRecorder, Launch, for_clang, mlx_source

from mlx_agentcache import metal_kernels

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint32": np.uint32,
         "int32": np.int32, "uint16": np.uint16}
BUILDS = {
    None: ["-O2"],
    "count": ["-O2", "-DHARNESS_COUNT"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"],
}


def np_(a: mx.array) -> np.ndarray:
    return np.array(a)


def launch_header(launch: Launch) -> str:
    """launch.h for harness.cpp: which buffers, and the call MLX's signature takes."""
    body = launch.source
    cooperative = any(w in body for w in ("threadgroup_barrier", "simd_", "threadgroup "))
    buffers = [f"IN({TYPE_STRING[dt]}, {n})" for n, dt in zip(launch.input_names, launch.input_dtypes)]
    buffers += [f"OUT({TYPE_STRING[dt]}, {n})" for n, dt in zip(launch.output_names, launch.output_dtypes)]
    args = [f"{n}.data()" if a.ndim else f"{n}[0]" for n, a in zip(launch.input_names, launch.inputs)]
    args += [f"{n}.data()" for n in launch.output_names]
    args += [f"A.{a}" for a, _ in launch.attributes()]
    template = launch.template_args() if launch.template else ""
    return (f"#define HARNESS_COOPERATIVE {int(cooperative)}\n"
            f"#define HARNESS_THREADGROUP_MEMORY {int('threadgroup ' in body)}\n"
            f"#define HARNESS_BUFFERS(IN, OUT) {' '.join(buffers)}\n"
            f"#define HARNESS_CALL(NS, A) NS::{launch.kernel_name()}{template}({', '.join(args)})\n")


class Harness:
    """Compiles harness.cpp once per (kernel source, launch header, build) and runs launches on raw files."""

    def __init__(self, root: Path):
        self.root = root
        self.source = KERNELS / "harness" / "harness.cpp"
        self.binaries = {}
        self.runs = 0
        self.options = {}  # defaults for run(): sanitize, seed, timeout_s

    def binary(self, launch: Launch, sanitize: str | None = None) -> Path:
        files = {"launch_kernel.metal": for_clang(mlx_source(launch)), "launch.h": launch_header(launch)}
        key = (*files.values(), sanitize)
        if key not in self.binaries:
            build = self.root / f"build{len(self.binaries)}"
            build.mkdir()
            for name, text in files.items():
                (build / name).write_text(text)
            cmd = ["clang++", *BUILDS[sanitize], "-std=c++17", "-ffp-contract=off", "-pthread", "-Wall", "-Werror",
                   "-Wno-unknown-attributes", "-Wno-unused-variable", f"-I{build}", "-o",
                   str(build / "harness"), str(self.source)]
            subprocess.run(cmd, check=True)
            self.binaries[key] = build / "harness"
        return self.binaries[key]

    def start(self, launch: Launch, sanitize=None, seed=None, timeout_s=None):
        """Run the launch; returns (completed process, its directory)."""
        self.runs += 1
        d = self.root / f"run{self.runs}"
        d.mkdir()
        for name, a in zip(launch.input_names, launch.inputs):
            np.ascontiguousarray(a).tofile(d / f"{name}.bin")
        env = dict(os.environ)
        if seed is not None:
            env["HARNESS_SEED"] = str(seed)
        if timeout_s is not None:
            env["HARNESS_TIMEOUT_S"] = str(timeout_s)
        env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66"
        env["ASAN_OPTIONS"] = "exitcode=67 detect_leaks=0"
        counts = [a.size for a in launch.inputs] + [int(np.prod(s)) for s in launch.output_shapes]
        cmd = [str(self.binary(launch, sanitize)), str(d), *map(str, launch.grid), *map(str, launch.threadgroup),
               *map(str, counts)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
        return proc, d

    def outputs(self, launch: Launch, d: Path) -> list[mx.array]:
        out = []
        for name, shape, dt in zip(launch.output_names, launch.output_shapes, launch.output_dtypes):
            a = mx.array(np.fromfile(d / f"{name}.bin", dtype=NUMPY[dt]).reshape(shape))
            out.append(a.view(mx.bfloat16) if dt == "bfloat16" else a)
        return out

    def run(self, launch: Launch, **kw) -> list[mx.array]:
        proc, d = self.start(launch, **{**self.options, **kw})
        if proc.returncode != 0:
            raise RuntimeError(f"harness {launch.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return self.outputs(launch, d)

    @contextlib.contextmanager
    def installed(self, run: bool = True):
        """metal_kernels' launches go through a recorder (and, with `run`, through this harness)."""
        recorder = KernelRecorder(self.run if run else None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mx.fast, "metal_kernel", recorder.metal_kernel)
            metal_kernels._kernel.cache_clear()
            try:
                yield recorder
            finally:
                metal_kernels._kernel.cache_clear()


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Harness:
    """One harness for the session, so a source compiled for one test module serves the others."""
    assert shutil.which("clang++"), "the kernel tests need clang (scripts/install_test_deps.sh)"
    return Harness(tmp_path_factory.mktemp("harness"))
