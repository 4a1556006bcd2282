"""The launches `metal_kernels` makes, recorded, and the Metal source MLX 0.32 builds for each.

`KernelRecorder.metal_kernel` stands in for `mx.fast.metal_kernel` in the
tests: every launch the real wrappers make (inputs, template, grid,
threadgroup, output shapes) is kept as a `Launch`, and then either run
(through the CPU harness) or answered with zeros (to collect launches for
the compile check). `mlx_source` writes what MLX's `metal_kernel`
(mlx/backend/metal/custom_kernel.cpp in 0.32: `write_signature`,
`write_template` and the kernel name) hands to the Metal compiler after its
own prelude, so both the harness and the clang check compile exactly that
signature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements go in the `constant` address space

# MLX's get_type_string.
TYPE_STRING = {"bool": "bool", "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
               "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
               "float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "float64": "double"}

# The attributes MLX declares when their name occurs in the body, in MLX's order.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
]


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def raw(a: mx.array) -> np.ndarray:
    """An MLX array's bytes as NumPy (bfloat16 as uint16)."""
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


@dataclass
class Launch:
    """One call of a kernel made by mx.fast.metal_kernel, as the wrapper passed it."""

    name: str
    input_names: list
    output_names: list
    source: str
    header: str
    inputs: list            # NumPy arrays (raw bytes), in input_names order
    input_dtypes: list      # MLX dtype names
    output_shapes: list
    output_dtypes: list     # MLX dtype names
    grid: tuple
    threadgroup: tuple
    template: list = field(default_factory=list)  # (name, int | bool | dtype name)

    def is_constant(self, i: int) -> bool:
        return self.inputs[i].size < MAX_CONSTANT_ARRAY_SIZE

    def attributes(self) -> list[tuple[str, str]]:
        return [(a, t) for a, t in METAL_ATTRIBUTES if a in self.source]

    def template_args(self) -> str:
        """MLX's write_template: `<float, 128, 1>` (bools as 0/1, dtypes by their Metal names)."""
        args = [TYPE_STRING[v] if isinstance(v, str) else str(int(v)) for _, v in self.template]
        return "<" + ", ".join(args) + ">"

    def kernel_name(self) -> str:
        name = "custom_kernel_" + self.name
        if self.template:
            name += "_" + re.sub(r"<|>|(, )", "_", self.template_args())[:-1]
        for i, dt in enumerate(self.input_dtypes):
            name += "_" + TYPE_STRING[dt] + ("s" if self.inputs[i].ndim == 0 else "c" if self.is_constant(i) else "")
        return name + "".join("_" + TYPE_STRING[dt] for dt in self.output_dtypes)


def mlx_source(launch: Launch) -> str:
    """The source MLX 0.32 compiles for this launch (after its prelude, metal::utils())."""
    if any(f"{n}_{what}" in launch.source for n in launch.input_names for what in ("shape", "strides", "ndim")):
        raise NotImplementedError("shape, strides and ndim parameters are not generated here")
    name = launch.kernel_name()
    out = launch.header
    if launch.template:
        kinds = {bool: "bool", int: "int", str: "typename"}
        out += "template <" + ", ".join(f"{kinds[type(v)]} {n}" for n, v in launch.template) + ">\n"
    out += f"[[kernel]] void {name}(\n"
    params = []
    for i, (n, a) in enumerate(zip(launch.input_names, launch.inputs)):
        where = "constant" if launch.is_constant(i) else "device"
        ref = "&" if a.ndim == 0 else "*"
        params.append(f"  const {where} {TYPE_STRING[launch.input_dtypes[i]]}{ref} {n} [[buffer({i})]]")
    k = len(params)
    params += [f"  device {TYPE_STRING[dt]}* {n} [[buffer({k + j})]]"
               for j, (n, dt) in enumerate(zip(launch.output_names, launch.output_dtypes))]
    params += [f"  {t} {a} [[{a}]]" for a, t in launch.attributes()]
    out += ",\n".join(params) + ") {\n" + launch.source + "\n}\n"
    if launch.template:
        full = name + launch.template_args()
        out += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({full}) {full};\n'
    return out


INSTANTIATION = re.compile(r'\ntemplate \[\[host_name\("\w+"\)\]\] \[\[kernel\]\] decltype\(')


def for_clang(source: str) -> str:
    """MLX's source as clang takes it: the one change is that clang refuses attributes on an explicit
    instantiation, so MLX's `template [[host_name("...")]] [[kernel]] decltype(...)` loses those two."""
    s, n = INSTANTIATION.subn("\ntemplate decltype(", source)
    if n != ("template <" in source):
        raise ValueError("not the instantiation MLX writes")
    return s


class KernelRecorder:
    """Stands in for mx.fast.metal_kernel; `run(launch) -> list of mx arrays` executes, None only records."""

    def __init__(self, run=None):
        self.run = run
        self.launches: list[Launch] = []

    def metal_kernel(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                     atomic_outputs=False, compile_options=None):
        if atomic_outputs or not ensure_row_contiguous:
            raise NotImplementedError("only row-contiguous, non-atomic kernels are recorded")

        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
                   verbose=False, stream=None):
            if init_value is not None:
                raise NotImplementedError("init_value is not recorded")
            if len(inputs) != len(input_names) or len(output_shapes) != len(output_names) or len(output_dtypes) != len(output_names):
                raise ValueError(f"{name}: wrong number of inputs or outputs")
            template = [(n, dtype_name(v) if isinstance(v, mx.Dtype) else v) for n, v in (template or [])]
            rec = Launch(name, list(input_names), list(output_names), source, header,
                         [raw(mx.contiguous(a)) for a in inputs], [dtype_name(a.dtype) for a in inputs],
                         [tuple(s) for s in output_shapes], [dtype_name(d) for d in output_dtypes],
                         tuple(grid), tuple(threadgroup), template)
            self.launches.append(rec)
            if self.run is None:
                return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
            return self.run(rec)

        return launch
