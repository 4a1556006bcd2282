"""The Q4 kernels of kernels/, run on the CPU through kernels/harness, against MLX.

Quantize must give the bytes of mx.quantize (fp16 input), NaN scales compared
as NaN since their bit pattern is platform dependent; dequantize must give the
bits of mx.dequantize; decode attention must match q4.decode_attention_q4
within DECODE_TOL. The portable q4 functions are checked against MLX and a
float64 attention reference as well.
"""

import mlx_agentcache  # noqa: F401  (first: preloads OpenBLAS before mlx.core)

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_agentcache import q4

HARNESS = Path(__file__).resolve().parent.parent / "kernels" / "harness" / "harness.cpp"

# Max |kernel - reference| relative to max |reference| (float32 outputs).
DECODE_TOL = 1e-5
# The same for fp16 queries/outputs: one fp16 rounding of the result.
DECODE_TOL_F16 = 1e-3
# decode_attention_q4 against float64 attention over the dequantized cache.
REFERENCE_TOL = 1e-5


class Harness:
    """Compiles harness.cpp once per set of -D flags and runs it on raw files."""

    def __init__(self, root: Path):
        self.root = root
        self.binaries = {}
        self.runs = 0

    def binary(self, defines: tuple) -> Path:
        if defines not in self.binaries:
            out = self.root / f"harness{len(self.binaries)}"
            cmd = ["g++", "-O2", "-std=c++17", "-ffp-contract=off", "-pthread", "-Wall",
                   *defines, "-o", str(out), str(HARNESS)]
            subprocess.run(cmd, check=True)
            self.binaries[defines] = out
        return self.binaries[defines]

    def run(self, op: str, args, inputs: dict, outputs: dict, defines=()) -> dict:
        self.runs += 1
        d = self.root / f"run{self.runs}"
        d.mkdir()
        for name, a in inputs.items():
            np.ascontiguousarray(a).tofile(d / f"{name}.bin")
        cmd = [str(self.binary(tuple(defines))), op, str(d), *map(str, args)]
        subprocess.run(cmd, check=True, timeout=120)
        return {name: np.fromfile(d / f"{name}.bin", dtype=dt) for name, dt in outputs.items()}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not available")
    return Harness(tmp_path_factory.mktemp("harness"))


def np_(a: mx.array) -> np.ndarray:
    return np.array(a)


def special_groups() -> np.ndarray:
    """64-value groups that exercise every branch of the quantizer."""
    rng = np.random.default_rng(1)
    ties = np.concatenate([[0.0, 15.0], np.arange(15) + 0.5, rng.integers(0, 16, 47)])
    n = lambda s: rng.standard_normal(64) * s  # noqa: E731
    groups = [
        np.zeros(64), -np.zeros(64), np.where(rng.random(64) < 0.5, 0.0, -0.0),
        np.full(64, 3.0), np.full(64, -2.5), np.full(64, 65504.0), np.full(64, -65504.0),
        np.full(64, 6e-8), np.full(64, -1e-5),
        -np.abs(n(1)), np.abs(n(1)) + 1, -np.abs(n(100)) - 50,
        ties, -ties, ties * 0.25, ties - 7.5, rng.integers(0, 4, 64).astype(float),
        n(0.01) + np.eye(64)[5] * 60000, n(0.01) - np.eye(64)[9] * 65504,
        n(1000) + np.eye(64)[0] * 1e-7, n(3e-5), n(1e-7),
        np.concatenate([[65504.0, -65504.0], n(1)[2:]]),
        np.where(np.eye(64)[7] > 0, np.nan, n(1)), np.where(rng.random(64) < 0.3, np.nan, n(5)),
        np.full(64, np.nan), np.concatenate([[np.nan], np.full(63, 2.0)]),
        np.where(np.eye(64)[3] > 0, np.inf, n(1)), np.where(np.eye(64)[60] > 0, -np.inf, n(1)),
        np.concatenate([[np.inf, -np.inf], n(1)[2:]]), np.concatenate([[np.inf, np.nan], n(1)[2:]]),
        np.full(64, np.inf), np.full(64, -np.inf),
    ]
    return np.stack(groups).astype(np.float16)


def block(rng, heads: int, d: int, specials: np.ndarray) -> np.ndarray:
    """(heads, 256, d) fp16: normal rows of assorted magnitudes, special groups scattered in."""
    x = rng.standard_normal((heads, 256, d)) * 10.0 ** rng.uniform(-4, 4, (heads, 256, 1))
    x = x.astype(np.float16)
    g = x.reshape(-1, 64)
    g[rng.choice(len(g), len(specials), replace=False)] = specials
    return x


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit equality of fp16 arrays, any NaN equal to any NaN."""
    g, w = got.ravel().view(np.uint16), want.ravel().view(np.uint16)
    both_nan = np.isnan(got.ravel()) & np.isnan(want.ravel())
    return g.shape == w.shape and bool(np.all((g == w) | both_nan))


def assert_q4_equal(got: dict, want: q4.Q4, prefix: str = ""):
    packed = got[prefix + "packed"]
    assert np.array_equal(packed, np_(want.packed).ravel()), "packed codes differ"
    assert same_bits(got[prefix + "scales"], np_(want.scales)), "scales differ"
    assert same_bits(got[prefix + "biases"], np_(want.biases)), "biases differ"


Q4_OUT = {"packed": np.uint32, "scales": np.float16, "biases": np.float16}


def test_quantize_kv_block_matches_mx_quantize_bytes(harness):
    rng = np.random.default_rng(0)
    specials = special_groups()
    k = block(rng, 4, 128, specials)
    v = block(rng, 4, 64, specials[::-1])
    nk, nv = k.size // 64, v.size // 64
    outs = {p + n: t for p in ("k_", "v_") for n, t in Q4_OUT.items()}
    got = harness.run("quantize_kv", [nk, nv], {"k": k, "v": v}, outs)
    assert_q4_equal(got, q4.Q4(*mx.quantize(mx.array(k), group_size=64, bits=4)), "k_")
    assert_q4_equal(got, q4.Q4(*mx.quantize(mx.array(v), group_size=64, bits=4)), "v_")


def test_quantize_many_random_groups(harness):
    rng = np.random.default_rng(2)
    n = 20000
    kinds = [
        rng.standard_normal((n, 64)) * 10.0 ** rng.uniform(-6, 4.5, (n, 1)),
        rng.integers(-8, 8, (n, 64)) * 2.0 ** rng.integers(-20, 10, (n, 1)),  # many exact ties
        rng.uniform(0, 1, (n, 64)) ** 3 * rng.choice([-1, 1], (n, 1)),  # one-signed groups
    ]
    x = np.clip(np.concatenate(kinds), -65504, 65504).astype(np.float16)
    got = harness.run("quantize", [len(x)], {"x": x}, Q4_OUT)
    assert_q4_equal(got, q4.Q4(*mx.quantize(mx.array(x), group_size=64, bits=4)))


def test_dequantize_matches_mx_dequantize_bits(harness):
    rng = np.random.default_rng(3)
    x = block(rng, 2, 128, special_groups())
    q = q4.Q4(*mx.quantize(mx.array(x), group_size=64, bits=4))
    # Arbitrary codes with arbitrary finite scales/biases too (overflow to inf included).
    ng = 4096
    words = rng.integers(0, 2**32, (ng, 8), dtype=np.uint32)
    sb = np.clip(rng.standard_normal((2, ng, 1)) * 10.0 ** rng.uniform(-7, 4.8, (2, ng, 1)),
                 -65504, 65504)
    r = q4.Q4(mx.array(words), *(mx.array(a.astype(np.float16)) for a in sb))
    for t in (q, r):
        got = harness.run("dequantize", [t.packed.size], {n: np_(a) for n, a in zip(Q4_OUT, t)},
                          {"out": np.float16})["out"]
        want = np_(mx.dequantize(*t, group_size=64, bits=4))
        assert same_bits(got, want)


DECODE_CASES = [
    # T, D, DV, R, TG, B, n_kv, N, lengths
    ("float", 128, 128, 4, 64, 2, 2, 300, [300, 137]),
    ("float", 64, 128, 1, 32, 3, 3, 100, [1, 64, 100]),
    ("float", 192, 64, 3, 64, 1, 2, 70, [70]),
    ("float16_t", 128, 64, 2, 128, 2, 1, 256, [256, 0]),
]


def decode_inputs(queries: np.ndarray, kq: q4.Q4, vq: q4.Q4, scale: float, lengths) -> dict:
    """The harness's decode inputs, named as in kernels/README.md."""
    inputs = {"queries": queries, "lengths": np.array(lengths, np.int32), "scale": np.array([scale], np.float32)}
    for p, c in (("k_", kq), ("v_", vq)):
        inputs.update({p + name: np_(a) for name, a in zip(Q4_OUT, c)})
    return inputs


def q4_cache(rng, b, n_kv, n, d, magnitude=1.0):
    x = rng.standard_normal((b, n_kv, n, d)) * magnitude
    return q4.quantize(mx.array(x.astype(np.float32)))


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_decode_attention_matches_reference(harness, case):
    t, d, dv, r, tg, b, n_kv, n, lengths = case
    rng = np.random.default_rng(d + dv + r)
    dtype = np.float16 if t == "float16_t" else np.float32
    queries = rng.standard_normal((b, n_kv * r, 1, d)).astype(dtype)
    kq, vq = q4_cache(rng, b, n_kv, n, d, 2.0), q4_cache(rng, b, n_kv, n, dv)
    scale = d**-0.5
    inputs = decode_inputs(queries, kq, vq, scale, lengths)
    defines = [f"-DDEC_T={t}", f"-DDEC_D={d}", f"-DDEC_DV={dv}", f"-DDEC_R={r}", f"-DDEC_TG={tg}"]
    got = harness.run("decode", [b, n_kv, n], inputs, {"out": dtype}, defines)["out"]
    want = np_(q4.decode_attention_q4(mx.array(queries), kq, vq, scale,
                                      mx.array(lengths, dtype=mx.int32)).astype(mx.float32))
    got = got.astype(np.float32).reshape(want.shape)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < (DECODE_TOL_F16 if t == "float16_t" else DECODE_TOL), err
    for i, length in enumerate(lengths):
        if length == 0:
            assert not np.any(got[i])


# --- the portable path -----------------------------------------------------


def test_portable_quantize_is_mx_quantize():
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((3, 5, 256, 128)).astype(np.float32) * 7)
    got = q4.quantize(x)
    want = mx.quantize(x.astype(mx.float16), group_size=64, bits=4)
    for a, w in zip(got, want):
        assert a.dtype == w.dtype and np.array_equal(np_(a).view(np.uint8), np_(w).view(np.uint8))
    kq, vq = q4.quantize_kv(x, x[..., :64])
    assert all(mx.array_equal(a, w).item() for a, w in zip(kq, got))
    assert vq.packed.shape == (3, 5, 256, 8)
    assert mx.array_equal(q4.dequantize(got), mx.dequantize(*want, group_size=64, bits=4)).item()


def float_reference(queries, kq, vq, scale, lengths):
    """float64 attention over the exactly dequantized cache (scale * code + bias)."""

    def deq(t):
        w = np_(t.packed)
        codes = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
        codes = codes.reshape(*w.shape[:-1], -1).astype(np.float64)
        rep = lambda a: np.repeat(np_(a).astype(np.float64), 64, axis=-1)  # noqa: E731
        return rep(t.scales) * codes + rep(t.biases)

    k, v = deq(kq), deq(vq)
    q = np_(queries).astype(np.float64)
    b, h, _, _ = q.shape
    rep = h // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    valid = np.arange(k.shape[2])[None, None, None, :] < np.array(lengths)[:, None, None, None]
    s = np.where(valid, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("h,n_kv,l,lengths", [(8, 2, 1, [300, 7]), (4, 4, 1, [1, 300]),
                                              (6, 1, 1, [300, 300]), (4, 2, 3, [250, 300])])
def test_decode_attention_q4_matches_float_reference(h, n_kv, l, lengths):
    rng = np.random.default_rng(h * 10 + n_kv)
    b, n, d, dv = len(lengths), 300, 128, 64
    queries = mx.array(rng.standard_normal((b, h, l, d)).astype(np.float32))
    kq, vq = q4_cache(rng, b, n_kv, n, d, 2.0), q4_cache(rng, b, n_kv, n, dv)
    got = np_(q4.decode_attention_q4(queries, kq, vq, d**-0.5, mx.array(lengths)))
    want = float_reference(queries, kq, vq, d**-0.5, lengths)
    assert got.shape == (b, h, l, dv)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < REFERENCE_TOL


def test_decode_attention_q4_empty_sequence_is_zero():
    rng = np.random.default_rng(5)
    kq, vq = q4_cache(rng, 2, 1, 64, 64), q4_cache(rng, 2, 1, 64, 64)
    out = q4.decode_attention_q4(mx.ones((2, 2, 1, 64)), kq, vq, 0.125, mx.array([0, 64]))
    assert not np.any(np_(out[0])) and np.all(np.isfinite(np_(out)))


# --- the fused kernel inside LayerCache.attend ----------------------------


def harness_decode(harness, tg=64):
    """metal_kernels.decode_attention's contract, computed by the kernel source through the harness."""

    def run(queries, kq, vq, scale, lengths):
        b, h, _, d = queries.shape
        _, n_kv, n, _ = kq.packed.shape
        dv = vq.packed.shape[-1] * 8
        inputs = decode_inputs(np_(queries).astype(np.float32), kq, vq, scale, np_(lengths))
        defines = ["-DDEC_T=float", f"-DDEC_D={d}", f"-DDEC_DV={dv}", f"-DDEC_R={h // n_kv}", f"-DDEC_TG={tg}"]
        calls.append((tuple(kq.packed.shape), np_(lengths).tolist()))
        out = harness.run("decode", [b, n_kv, n], inputs, {"out": np.float32}, defines)["out"]
        return mx.array(out.reshape(b, h, 1, dv))

    calls = []
    run.calls = calls
    return run


@pytest.mark.parametrize("mode", ["q4", "q4k"])
def test_attend_decode_step_uses_fused_kernel_in_place(harness, monkeypatch, mode):
    """On an Apple GPU a Q4 decode step reads the cache buffer in place (capacity rows past the
    length included) through the fused kernel; here the kernel source runs through the harness
    and must give what the general path gives."""
    from mlx_agentcache import metal_kernels
    from mlx_agentcache.kvcache import LayerCache

    rng = np.random.default_rng(11)
    n_kv, rep, d, n = 2, 3, 64, 300
    cache = LayerCache(mode)
    cache.update_and_fetch(mx.array(rng.standard_normal((1, n_kv, n, d)).astype(np.float32) * 2),
                           mx.array(rng.standard_normal((1, n_kv, n, d)).astype(np.float32)))
    query = mx.array(rng.standard_normal((1, n_kv * rep, 1, d)).astype(np.float32))
    want = np_(cache.attend(query, d**-0.5))

    kernel = harness_decode(harness)
    monkeypatch.setattr(q4, "fused_decode_available", lambda: True)
    monkeypatch.setattr(metal_kernels, "decode_attention", kernel)
    got = np_(cache.attend(query, d**-0.5))
    assert kernel.calls == [((1, n_kv, 512, d // 8), [n])]  # two blocks of capacity, no copy
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < DECODE_TOL

    # prefill rows, a second (shared) segment and a sliding window past its width take the general path
    cache.attend(mx.concatenate([query] * 2, axis=2), d**-0.5)
    shared = LayerCache(mode)
    shared.segments, shared.offset = [cache.segments[0]], n
    shared.segments[0].shared = True
    shared.update_and_fetch(*(mx.array(rng.standard_normal((1, n_kv, 1, d)).astype(np.float32)),) * 2)
    shared.attend(query, d**-0.5)
    window = LayerCache(mode, window=128)
    window.update_and_fetch(*(mx.array(rng.standard_normal((1, n_kv, 200, d)).astype(np.float32)),) * 2)
    window.attend(query, d**-0.5)
    assert len(kernel.calls) == 1
