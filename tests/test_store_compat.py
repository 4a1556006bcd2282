"""Caches written by earlier code (tests/data/store_v2, see make.py there) still
load, hold exactly the tensors in the file, and are converted to today's format
on their next save.

The files were written under one BLAS kernel set (make.py's machine). A fresh
prefill of the same tokens under another kernel set rounds differently, so what
holds on every CPU is: the load is bit-exact to the file, and the file agrees
with today's prefill to within one rounding step of its encoding on at most a
few values (under the kernels that wrote it, on every value)."""

import shutil
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_agentcache.pool import CachePool
from mlx_agentcache.store import codec, container
from tiny import same_tensors, tiny_runner, tokens

DATA = Path(__file__).parent / "data" / "store_v2"


STEP = {"fp16": 2**-9, "q8": 2 / 255, "q4": 2 / 15, "q4k": 2 / 15, "q4c": 2 / 15}  # one rounding step, of a layer's largest magnitude
MOVED = 0.01  # the share of values a change of BLAS kernels may move by one step


def fresh(runner, toks):
    cache = runner.new_cache()
    runner.prefill(toks, cache, logits=False)
    return cache


def holds_the_file(cache, file: Path, runner, tmp_path) -> bool:
    """Saved again as one version 2 file, the loaded cache gives back the file's tensors, bit for bit."""
    again = tmp_path / "again.safetensors"
    codec.save(again, cache, runner.fingerprint)
    a, b = (container.read_tensors(f, codec.FORMATS)[0] for f in (file, again))
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def agrees_with_a_fresh_prefill(cache, runner, toks, mode: str) -> None:
    """The same tokens, layout and encodings as today's prefill; values apart by one rounding step at most, few of them."""
    ref = fresh(runner, toks)
    assert cache.tokens == ref.tokens
    for x, y in zip(cache.layers, ref.layers, strict=True):
        assert (x.start, x.offset, [r[0] for r in x.stored_segments(x.start)]) == (y.start, y.offset, [r[0] for r in y.stored_segments(y.start)])
        for a, b in zip(x.dense(x.start, x.offset), y.dense(y.start, y.offset)):
            diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32))
            assert diff.max().item() <= STEP[mode] * mx.abs(b).max().item() and (diff > 0).mean().item() <= MOVED


def pool_over(tmp_path, fixture: str, runner, **kw) -> CachePool:
    d = tmp_path / fixture
    shutil.copytree(DATA / fixture, d)
    return CachePool(d, runner.fingerprint, runner.new_cache, budget_bytes=float("inf"), warn=pytest.fail, **kw)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["fp16", "q8", "q4", "q4k", "q4c"])
def test_v2_file_loads_and_is_converted_on_save(tmp_path, mode):
    runner = tiny_runner(kv_bits=mode)
    pool = pool_over(tmp_path, mode, runner, share_prefixes=False)
    cache, tier = pool.checkout("agent")
    assert tier == "warm" and holds_the_file(cache, DATA / mode / "agent.safetensors", runner, tmp_path)
    agrees_with_a_fresh_prefill(cache, runner, tokens(300), mode)
    more = tokens(300) + tokens(20, seed=5)
    cache, reuse = pool.begin_turn("agent", more)
    assert reuse == 300
    runner.prefill(more[reuse:], cache, logits=False)
    pool.checkin("agent", cache)
    assert pool.flush() == {}
    assert container.peek_meta(pool.path("agent"))["format"] == codec.MANIFEST  # converted
    pool.forget("agent")
    back, tier = pool.checkout("agent")
    assert tier == "warm" and same_tensors(back, cache)


@pytest.mark.numerics
def test_v1_file_loads_as_q4(tmp_path):
    runner = tiny_runner(kv_bits="q4")
    pool = pool_over(tmp_path, "v1", runner, share_prefixes=False)
    cache, tier = pool.checkout("agent")
    assert tier == "warm" and cache.layers[0].mode == "q4" and holds_the_file(cache, DATA / "v1" / "agent.safetensors", runner, tmp_path)
    agrees_with_a_fresh_prefill(cache, runner, tokens(300), "q4")


def test_v2_agents_sharing_a_prefix_block_load(tmp_path):
    runner = tiny_runner(kv_bits="q4")
    pool = pool_over(tmp_path, "shared", runner)
    for name, toks in (("first", tokens(600)), ("second", tokens(512) + tokens(40, seed=2))):
        cache, tier = pool.checkout(name)
        assert tier == "warm" and cache.tokens == toks
        assert cache.layers[0].segments[0].shared and cache.layers[0].segments[0].length == 512
        pool.checkin(name, cache, persist=False)
