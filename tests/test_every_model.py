"""Every architecture in every KV mode, end to end as a user runs it: two `say` turns
in two processes (the second restores the first's cache from disk), then a turn of
`agentcache serve` in a third process that restores it again. A mode a model cannot
run is refused with one clear line by both, never a traceback."""

import json
import os
import subprocess
import sys

import httpx
import pytest
from server_process import KEY, REQUEST_TIMEOUT_S, Server

from mlx_agentcache.kvcache import KV_MODES

MODELS = ["smollm2-135m", "gemma3-270m", "deepseek-v2-tiny-random", "llama3-tiny-random"]
REFUSED = {("deepseek-v2-tiny-random", "q4k"): "a latent cache (DeepSeek MLA) cannot use q4k"}  # one vector is key and value


def say(home, cache_dir, model, kv, text):
    cmd = [sys.executable, "-m", "mlx_agentcache", "say", "--model", model, "--kv", kv, "--cache-dir", str(cache_dir),
           "--agent", "a", "--max-tokens", "3", "--json", text]
    return subprocess.run(cmd, env={**os.environ, "AGENTCACHE_HOME": str(home)}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("kv", list(KV_MODES))
@pytest.mark.parametrize("model", MODELS)
def test_say_twice_then_serve(model, kv, model_home, tmp_path):
    cache_dir = tmp_path / "agents"
    first = say(model_home, cache_dir, model, kv, "Name a colour.")
    if (model, kv) in REFUSED:
        assert first.returncode == 2 and REFUSED[model, kv] in first.stderr and "Traceback" not in first.stderr, first.stderr
        server = Server(model_home, cache_dir, tmp_path / "server.log", "--model", model, "--kv", kv).start(ready=500)
        try:
            assert REFUSED[model, kv] in httpx.get(server.url + "/health").json()["error"]
        finally:
            server.stop()
        return
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert one["tier"] == "cold" and one["generated_tokens"] >= 1 and one["cache_tokens"] > 0

    second = say(model_home, cache_dir, model, kv, "And another.")
    assert second.returncode == 0, second.stderr
    two = json.loads(second.stdout)
    assert two["tier"] == "warm" and two["restored_tokens"] > 0
    assert two["restored_tokens"] + two["prefilled_tokens"] > one["cache_tokens"]

    server = Server(model_home, cache_dir, tmp_path / "server.log", "--model", model, "--kv", kv).start()
    try:
        stored = server.get("/v1/agents/a").json()
        messages = ([{"role": "system", "content": stored["system"]}] if stored["system"] else []) + stored["messages"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                       headers={"x-api-key": KEY, "X-Agent-Id": "a"},
                       json={"model": model, "messages": messages + [{"role": "user", "content": "One more."}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["x_agentcache"]["tier"] == "warm"
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= two["restored_tokens"]
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
