"""The cache file: exact round trips, clean refusals, crash safety, fuzzing."""

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_agentcache.store import codec, container
import forge
from tiny import random_cache, same_tensors

FP = "f" * 32
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[bytes, object]:
    cache = random_cache(7, layers=2, heads=1, n=300, dim=64, bits="q4c")  # sinks, body and tail
    path = tmp_path_factory.mktemp("small") / "a.safetensors"
    codec.save(path, cache, FP, extra={"note": "fuzz"})
    return path.read_bytes(), cache


@pytest.fixture(params=["one batch", "many batches"])
def read_batch(request, monkeypatch):
    """Reads of READ_BATCH bytes; small ones split a file into many preadv calls,
    allocation batches and checksum jobs."""
    if request.param == "many batches":
        monkeypatch.setattr(container, "READ_BATCH", 2048)
    return request.param


@pytest.mark.parametrize("bits", [4, 8, 16, "q4k", "q4c"])
@pytest.mark.parametrize("n", [3, 300])
def test_round_trip_is_exact(tmp_path, bits, n, read_batch):
    cache = random_cache(1, bits=bits, n=n)
    path = tmp_path / "a.safetensors"
    size = codec.save(path, cache, FP, extra={"k": 1}, model="m")
    assert size == path.stat().st_size
    back, extra = codec.load(path, FP)
    assert extra == {"k": 1} and same_tensors(cache, back) and back.nbytes == cache.nbytes
    assert back.layers[0].mode == cache.layers[0].mode and back.offset == n


def test_version_1_files_still_load_and_a_q4c_file_cannot_pass_for_one(tmp_path):
    """Files written before q4c (format "agentcache-kv", no kv_mode) load as they were; a q4c
    file relabelled as version 1 is refused, never read as q4."""
    for mode in (4, "q4c"):
        path = tmp_path / f"{mode}.safetensors"
        codec.save(path, random_cache(3, bits=mode), FP)
        meta_less = _rewrite_meta(path.read_bytes(), format=codec.FORMAT_V1, kv_mode="")
        path.write_bytes(meta_less)
        if mode == 4:
            back, _ = codec.load(path, FP)
            assert same_tensors(back, random_cache(3, bits=4)) and back.layers[0].mode == "q4"
        else:
            with pytest.raises(container.CacheFileError, match="q4c"):
                codec.load(path, FP)


def test_file_is_plain_safetensors(tmp_path):
    from safetensors.numpy import load_file

    cache = random_cache(2)
    path = tmp_path / "a.safetensors"
    codec.save(path, cache, FP)
    tensors = load_file(str(path))
    assert tensors["tokens"].tolist() == cache.tokens
    assert tensors["layers.0.k.0"].shape == (2, 300, 8)


def _rewrite_meta(data: bytes, **changes) -> bytes:
    """Change metadata fields and fix every checksum, so only the change itself can be refused."""
    header, meta, body = forge.split(data)
    return forge.join(header, {**meta, **changes}, body)


DAMAGE = {
    "empty": (lambda d: b"", "truncated"),
    "truncated in data": (lambda d: d[: len(d) - 1000], "truncated"),
    "truncated in header": (lambda d: d[:100], "truncated"),
    "bit flip in data": (lambda d: d[:-500] + bytes([d[-500] ^ 0x04]) + d[-499:], "checksum mismatch"),
    "bit flip in header": (lambda d: d[:40] + bytes([d[40] ^ 0x01]) + d[41:], "header|checksum|malformed|format"),
    "oversized header": (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "over the"),
    "header longer than file": (lambda d: struct.pack("<Q", len(d)) + d[8:], "truncated"),
    "garbage": (lambda d: random.Random(0).randbytes(len(d)), "header|truncated"),
    "not json": (lambda d: struct.pack("<Q", 8) + b"{nope!!}" + d[16:], "not valid JSON"),
    "wrong version": (lambda d: _rewrite_meta(d, version="1"), "version 1 is not supported"),
    "wrong format": (lambda d: _rewrite_meta(d, format="something-else"), "not an agent cache"),
    "wrong model": (lambda d: _rewrite_meta(d, fingerprint="0" * 32), "another model"),
    "wrong quantization": (lambda d: _rewrite_meta(d, kv_bits="3"), "malformed metadata"),
    "padded": (lambda d: d + b"\0" * 16, "padded"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_files_are_refused_with_a_reason(tmp_path, small_file, kind, read_batch):
    damage, reason = DAMAGE[kind]
    path = tmp_path / "a.safetensors"
    path.write_bytes(damage(small_file[0]))
    with pytest.raises(container.CacheFileError, match=reason) as e:
        codec.load(path, FP)
    assert str(e.value).startswith("a.safetensors")  # says which file
    assert "\n" not in str(e.value)


def test_wrong_model_is_refused_before_reading_tensors(tmp_path, small_file):
    data = bytearray(_rewrite_meta(small_file[0], fingerprint="0" * 32))
    data[-1] ^= 0xFF  # damaged data too; the model check comes first and costs only the header
    path = tmp_path / "a.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(container.CacheFileError, match="another model"):
        codec.load(path, FP)


def test_quarantine_keeps_the_bytes(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"broken")
    moved = container.quarantine(path, path.stat().st_ino)
    assert not path.exists() and moved.read_bytes() == b"broken" and ".bad-" in moved.name
    path.write_bytes(b"new")
    assert container.quarantine(path, inode=-1) is None and path.exists()  # replaced meanwhile: left alone


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    codec.save(path, random_cache(1), FP)
    before = path.read_bytes()

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(container.os, "fsync", boom)
    with pytest.raises(container.CacheWriteError, match="No space left"):
        codec.save(path, random_cache(2), FP)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# -- crash safety: a real process killed at random points ---------------------

CHILD = """
import sys
sys.path.insert(0, {tests!r})
from tiny import random_cache
from mlx_agentcache.store import codec
caches = [random_cache(s, layers=4, heads=2, n=1024, dim=128) for s in (1, 2)]
version = {start}
while True:
    codec.save({path!r}, caches[version % 2], {fp!r}, extra={{"version": version}})
    print(version, flush=True)
    version += 1
"""


def test_sigkill_at_random_points_never_loses_the_previous_version(tmp_path):
    path = tmp_path / "agent.safetensors"
    expected = {s: random_cache(s, layers=4, heads=2, n=1024, dim=128) for s in (1, 2)}
    rng = random.Random(1234)
    kills, mid_write, last_done, version = 0, 0, -1, 0
    t_end = time.monotonic() + 60
    while kills < 30 and time.monotonic() < t_end:
        code = CHILD.format(tests=str(TESTS), path=str(path), fp=FP, start=version)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # the child is saving now
        assert first.strip(), "child died before its first save"
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(child.pid, signal.SIGKILL)
        out = first + child.stdout.read()
        child.wait()
        kills += 1
        done = [int(x) for x in out.split()]
        last_done = max(done)
        mid_write += any(p.name.startswith(".agent.safetensors.tmp") for p in tmp_path.iterdir())
        cache, extra = codec.load(path, FP)  # must load after every kill
        got = extra["version"]
        assert got in (last_done, last_done + 1), (got, last_done)  # the last finished save, or the one being renamed
        assert same_tensors(cache, expected[(1, 2)[got % 2]])
        version = last_done + 2
        for p in tmp_path.glob(".agent.safetensors.tmp*"):
            p.unlink()
    print(f"{kills} kills, {mid_write} inside a write")
    assert kills >= 20
    assert mid_write >= 3, f"only {mid_write} of {kills} kills landed inside a write"


# -- fuzzing: mutated files give clean refusals, never crashes or hangs --------

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
)


def _mutate(data: bytes, ops) -> bytes:
    d = bytearray(data)
    for kind, pos, val in ops:
        if not d:
            break
        i = pos % len(d)
        if kind == "flip":
            d[i] ^= val
        elif kind == "set":
            d[i] = val
        elif kind == "truncate":
            del d[i:]
        else:
            d[i:i] = bytes([val]) * (1 + val % 9)
    return bytes(d)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(mutation, min_size=1, max_size=4), header_bias=st.booleans())
def test_fuzzed_files_are_refused_cleanly(tmp_path, small_file, ops, header_bias):
    data, original = small_file
    if header_bias:  # aim most mutations at the 8-byte length and the JSON header
        n = struct.unpack("<Q", data[:8])[0]
        ops = [(k, p % (n + 8), v) for k, p, v in ops]
    path = tmp_path / "fuzz.safetensors"
    mutated = _mutate(data, ops)
    path.write_bytes(mutated)
    try:
        cache, _ = codec.load(path, FP)
    except container.CacheFileError:
        return
    assert same_tensors(cache, original)  # only harmless changes (e.g. header padding) may load


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=12), json_values, max_size=5), tail=st.binary(max_size=64))
def test_arbitrary_headers_are_refused_cleanly(tmp_path, header, tail):
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    with pytest.raises(container.CacheFileError):
        codec.load(path, FP)


def test_deeply_nested_header_is_refused(tmp_path):
    raw = b"[" * 100000 + b"]" * 100000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(container.CacheFileError, match="not valid JSON|no string metadata"):
        codec.load(path, FP)
