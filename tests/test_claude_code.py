"""The real Claude Code CLI (npm `@anthropic-ai/claude-code`) against a real
`agentcache serve` on Gemma 3 270M, with the README's recipe.

Claude Code's default requests carry its 24 tools (about 18K tokens in the
generic tool format), so the model with a 32K context serves them; reading
that prompt takes 8 to 25 minutes on a 2-core CPU, more than a test suite
can spend, so the test keeps one tool (`--tools Read`): the same system
prompt, system messages, betas, headers and max_tokens as the full recipe.
A 270M model will not do the task well; what is checked is the wiring: the
CLI ends without an API error and its session is its own agent.
"""

import json
import os
import subprocess

import httpx
import pytest

from server_process import KEY, Server

MODEL = "gemma3-270m"
CLI_TIMEOUT_S = 1500
# Claude Code gives up on a stream after 5 minutes without a token (pings do not count)
# and on a request after 10; reading its first prompt on a small CPU can take longer.
SLOW_CPU = {"CLAUDE_STREAM_IDLE_TIMEOUT_MS": "1800000", "API_TIMEOUT_MS": "1800000"}


@pytest.fixture(scope="module")
def server(gemma3_path, model_home, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-claude")
    s = Server(model_home, d / "cache", d / "server.log", "--model", MODEL).start()
    yield s
    s.stop()


def claude(cli, server, home, prompt: str, *args: str) -> dict:
    """`claude -p PROMPT --output-format json` with the README's environment."""
    env = {**os.environ, "HOME": str(home), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_AUTH_TOKEN": KEY,
           "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", **SLOW_CPU}
    p = subprocess.run([str(cli), "-p", prompt, "--output-format", "json", *args], env=env, cwd=home, capture_output=True, text=True,
                       timeout=CLI_TIMEOUT_S)
    assert p.returncode == 0, f"claude failed ({p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}\n{server.tail()}"
    return json.loads(p.stdout)


def test_claude_code_says_hi_without_an_api_error(claude_cli, server, tmp_path):
    out = claude(claude_cli, server, tmp_path, "say hi", "--tools", "Read")
    assert out["type"] == "result" and out["is_error"] is False and out["api_error_status"] is None, out
    assert out["usage"]["output_tokens"] > 0
    agents = httpx.get(server.url + "/v1/agents", headers={"x-api-key": KEY}).json()["data"]
    assert out["session_id"] in [a["name"] for a in agents]  # X-Claude-Code-Session-Id names the agent
