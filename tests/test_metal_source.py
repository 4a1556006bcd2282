"""The sources MLX will compile on a Mac, compiled here with clang, address spaces kept.

Every launch `metal_kernels` makes is recorded (mx.fast.metal_kernel
replaced by a recorder answering zeros), turned into the source MLX 0.32
builds for it (tests/metal_launch.py), and type-checked by clang against
kernels/harness/metal_clang.h, where `device`, `constant` and `threadgroup`
are distinct address spaces. Metal sources are ASCII only (MLX 0.32 hands
them over with NS::ASCIIStringEncoding).
"""

import mlx_agentcache  # noqa: F401  (first: preloads the BLAS before mlx.core)

import subprocess

import mlx.core as mx
from harness_runner import KERNELS, harness  # noqa: F401  (the session's fixture)
from metal_launch import for_clang, mlx_source

from mlx_agentcache import metal_kernels, q4_format

CLANG = ["clang++", "--target=aarch64-linux-gnu", "-march=armv8.6-a+bf16", "-std=c++17", "-fsyntax-only",
         "-Wno-unknown-attributes", "-include", str(KERNELS / "harness" / "metal_clang.h"), "-x", "c++"]
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def launches_of(harness, calls):
    with harness.installed(run=False) as recorder:
        calls()
    return recorder.launches


def every_launch():
    """Each kernel the wrappers launch: quantizers for every head dim; decode attention (Q4 and q4c, and
    their combine) for every dtype, D/Dv pair, R in 1, 4, 71, batches of 1 and 8 (`lengths`, and
    `maxes`/`sums` of one head and split, in constant memory or not), N = 1 (Q4) or one key group (q4c)."""
    for d in metal_kernels.HEAD_DIMS:
        x = mx.zeros((1, 128, d))
        metal_kernels.quantize(x), metal_kernels.quantize_keys(x), metal_kernels.quantize_values(x)
    for dtype in DTYPES:
        for d in metal_kernels.HEAD_DIMS:
            for dv in metal_kernels.HEAD_DIMS:
                for r in (1, 4, 71):
                    for b in (1, 8):
                        q = mx.zeros((b, r, 1, d), dtype)
                        kq, vq = q4_format.quantize(mx.zeros((b, 1, 1, d))), q4_format.quantize(mx.zeros((b, 1, 1, dv)))
                        metal_kernels.decode_attention(q, kq, vq, 0.125)
                        kc = q4_format.quantize_keys(mx.zeros((b, 1, 128, d)))
                        vc = q4_format.quantize_values(mx.zeros((b, 1, 128, dv)))
                        lengths = mx.full((b,), 100, mx.int32)
                        metal_kernels.decode_attention_q4c(q, kc, vc, 0.125, lengths, mx.zeros((b, 1, 2, d)),
                                                           mx.zeros((b, 1, 2, dv)), 4)


def clang_check(sources: list[str]) -> subprocess.CompletedProcess:
    """Type-check the sources (`for_clang`) in one run, each in its own namespace."""
    units = [f"namespace launch{i} {{\n{for_clang(s)}\n}}  // namespace launch{i}\n" for i, s in enumerate(sources)]
    return subprocess.run([*CLANG, "-"], input="".join(units), capture_output=True, text=True, timeout=600)


def test_every_launch_compiles_with_address_spaces(harness):
    launches = launches_of(harness, every_launch)
    sources = sorted({mlx_source(launch) for launch in launches})
    names = {launch.name for launch in launches}
    assert names == {"q4_quantize", "q4_quantize_keys", "q4_quantize_values", "q4_decode_attention", "q4_decode_combine"}
    # both address spaces of `lengths` (decode) and of `maxes` (combine) are among them
    for param in ("const constant int32_t* lengths", "const device int32_t* lengths",
                  "const constant float* maxes", "const device float* maxes"):
        assert any(param in s for s in sources), param
    proc = clang_check(sources)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-4000:]


def test_constant_input_given_to_a_device_pointer_fails(harness):
    """The check has teeth: the body takes `lengths` as a device pointer, which only batches of 8 or more
    (lengths in device memory) allow."""

    def decode(b):
        q = mx.zeros((b, 2, 1, 64))
        kq = q4_format.quantize(mx.zeros((b, 1, 1, 64)))
        return lambda: metal_kernels.decode_attention(q, kq, kq, 0.125)

    needle = "const int len = metal::min(int(lengths[b]), N);"
    edit = "const device int32_t* lens = lengths;\nconst int len = metal::min(int(lens[b]), N);"
    for b, fails in ((1, True), (8, False)):
        launch = launches_of(harness, decode(b))[0]
        assert needle in launch.source
        launch.source = launch.source.replace(needle, edit)
        proc = clang_check([mlx_source(launch)])
        assert (proc.returncode != 0) == fails, proc.stderr
        if fails:
            assert "cannot initialize a variable of type 'device int32_t const *'" in proc.stderr, proc.stderr


def test_source_is_what_mlx_writes(harness):
    """Name, signature, attributes and instantiation as MLX 0.32's metal_kernel writes them."""
    q = mx.zeros((1, 3, 1, 64), mx.bfloat16)
    kq = q4_format.quantize(mx.zeros((1, 1, 1, 64)))
    decode, combine = launches_of(harness, lambda: metal_kernels.decode_attention(q, kq, kq, 0.125))
    # one token: a single scale and bias per cache, so those go in constant memory too
    name = ("custom_kernel_q4_decode_attention__bfloat16_t_64_64_3_3_8_0_0_bfloat16_t_uint32_t_float16_tc_float16_tc"
            "_uint32_t_float16_tc_float16_tc_int32_tc_int32_tc_floatc_int32_tc_float_float_float")
    source = mlx_source(decode)
    head = source[len(decode.header):source.index(") {\n", len(decode.header)) + 4]
    assert head == (
        "template <typename T, int D, int DV, int R, int RT, int NSG, int KC, int VS>\n"
        f"[[kernel]] void {name}(\n"
        "  const device bfloat16_t* queries [[buffer(0)]],\n"
        "  const device uint32_t* k_packed [[buffer(1)]],\n"
        "  const constant float16_t* k_scales [[buffer(2)]],\n"
        "  const constant float16_t* k_biases [[buffer(3)]],\n"
        "  const device uint32_t* v_packed [[buffer(4)]],\n"
        "  const constant float16_t* v_scales [[buffer(5)]],\n"
        "  const constant float16_t* v_biases [[buffer(6)]],\n"
        "  const constant int32_t* lengths [[buffer(7)]],\n"
        "  const constant int32_t* first [[buffer(8)]],\n"
        "  const constant float* scale [[buffer(9)]],\n"
        "  const constant int32_t* n_tokens [[buffer(10)]],\n"
        "  device float* partial [[buffer(11)]],\n"
        "  device float* maxes [[buffer(12)]],\n"
        "  device float* sums [[buffer(13)]],\n"
        "  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]],\n"
        "  uint thread_index_in_simdgroup [[thread_index_in_simdgroup]],\n"
        "  uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]],\n"
        "  uint3 threadgroups_per_grid [[threadgroups_per_grid]]) {\n")
    full = f"{name}<bfloat16_t, 64, 64, 3, 3, 8, 0, 0>"
    assert source.endswith(f'\n}}\n\ntemplate [[host_name("{name}")]] [[kernel]] decltype({full}) {full};\n')
    assert decode.grid == (256, 1, 1) and decode.threadgroup == (256, 1, 1)
    assert combine.kernel_name().endswith("__bfloat16_t_64_float_floatc_floatc_int32_tc_bfloat16_t")


def test_kernel_sources_are_ascii():
    """MLX 0.32 passes kernel sources to Metal as ASCII: one other byte fails the compile on a Mac."""
    files = [p for p in KERNELS.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for p in files:
        bad = [(i, b) for i, b in enumerate(p.read_bytes()) if b > 0x7F]
        assert not bad, f"{p}: non-ASCII byte 0x{bad[0][1]:02x} at offset {bad[0][0]}"
