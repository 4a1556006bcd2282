"""Caches written by earlier code (tests/data/store_v2, see make.py there) still
load, hold what a fresh prefill of the same tokens holds, and are converted to
today's format on their next save."""

import shutil
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import pytest

from mlx_agentcache.pool import CachePool
from mlx_agentcache.store import codec, container
from tiny import same_tensors, tiny_runner, tokens

DATA = Path(__file__).parent / "data" / "store_v2"


def fresh(runner, toks):
    cache = runner.new_cache()
    runner.prefill(toks, cache, logits=False)
    return cache


def pool_over(tmp_path, fixture: str, runner, **kw) -> CachePool:
    d = tmp_path / fixture
    shutil.copytree(DATA / fixture, d)
    return CachePool(d, runner.fingerprint, runner.new_cache, budget_bytes=float("inf"), warn=pytest.fail, **kw)


@pytest.mark.parametrize("mode", ["fp16", "q8", "q4", "q4k", "q4c"])
def test_v2_file_loads_and_is_converted_on_save(tmp_path, mode):
    runner = tiny_runner(kv_bits=mode)
    pool = pool_over(tmp_path, mode, runner, share_prefixes=False)
    cache, tier = pool.checkout("agent")
    assert tier == "warm" and same_tensors(cache, fresh(runner, tokens(300)))
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


def test_v1_file_loads_as_q4(tmp_path):
    runner = tiny_runner(kv_bits="q4")
    pool = pool_over(tmp_path, "v1", runner, share_prefixes=False)
    cache, tier = pool.checkout("agent")
    assert tier == "warm" and cache.layers[0].mode == "q4" and same_tensors(cache, fresh(runner, tokens(300)))


def test_v2_agents_sharing_a_prefix_block_load(tmp_path):
    runner = tiny_runner(kv_bits="q4")
    pool = pool_over(tmp_path, "shared", runner)
    for name, toks in (("first", tokens(600)), ("second", tokens(512) + tokens(40, seed=2))):
        cache, tier = pool.checkout(name)
        assert tier == "warm" and cache.tokens == toks
        assert cache.layers[0].segments[0].shared and cache.layers[0].segments[0].length == 512
        pool.checkin(name, cache, persist=False)
