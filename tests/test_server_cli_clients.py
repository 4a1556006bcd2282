"""The real Claude Code (2.1.197) and Codex CLI (0.171.0) against a real
`agentcache serve --compact-tools` on SmolLM2-135M, with the README's
recipes: each ends without an API error, each session is its own agent,
Claude Code's whole prompt (its system prompt and 24 tools) fits the
model's context as signatures, and a second Claude Code session reads that
prefix from the first one's cache."""

import shlex
from pathlib import Path

import pytest

from cli_clients import CLAUDE_ARGS, CLAUDE_ENV, CLAUDE_FULL_ARGS, CODEX_ARGS, CODEX_CONFIG, MODEL, claude, claude_full, codex, served
from mlx_agentcache.q4_format import BLOCK_TOKENS as BLOCK
from server_process import serving

README = Path(__file__).resolve().parent.parent / "README.md"

CLAUDE_SYSTEM = "Reply in one short sentence."
CODEX_INSTRUCTIONS = "Reply with one word."
# Long enough to span a shared block, and one SmolLM2 answers briefly.
NOTES = "Notes: " + " ".join(f"Line {i} of the notes." for i in range(1, 31)) + "\nReply with one word."


@pytest.fixture(scope="module")
def server(smollm2_path, model_home, tmp_path_factory):
    # Codex sends no output limit: the server's own default (256) applies, not the tests' usual 8
    with serving(model_home, tmp_path_factory.mktemp("serve-cli-clients"), "--max-tokens", "256", "--compact-tools") as s:
        yield s


def prefix_hits(server) -> int:
    """Turns so far that attached a shared prefix from the cache instead of prefilling it."""
    return server.get("/v1/agents").json()["memory"]["prefix_hits"]


def test_claude_code_says_hi_without_an_api_error(server, tmp_path):
    result = claude(server, "say hi", CLAUDE_SYSTEM, tmp_path)
    served(result)
    agent = server.get(f"/v1/agents/{result['session_id']}").json()  # X-Claude-Code-Session-Id names the agent
    last = agent["messages"][-1]
    assert last["role"] == "assistant" and last["content"].strip(), agent["messages"]
    if not result["is_error"]:  # the reply Claude Code printed is the one the agent keeps
        assert last["content"] == result["result"]


def test_second_claude_code_session_reads_the_shared_prefix_from_the_cache(server, tmp_path):
    """Two sessions, two agents, one system prompt, different questions: the
    second one's system prompt comes from the first one's cache in whole
    blocks, its question is prefilled."""
    before = prefix_hits(server)
    first = claude(server, "say hi", NOTES, tmp_path / "one")
    after_first = prefix_hits(server)
    second = claude(server, "Say hi.", NOTES, tmp_path / "two")
    for result in (first, second):
        served(result)
    assert first["session_id"] != second["session_id"]
    assert after_first == before  # nothing held these notes yet
    assert prefix_hits(server) > after_first
    read, prefilled = second["usage"]["cache_read_input_tokens"], second["usage"]["cache_creation_input_tokens"]
    assert read >= BLOCK and 0 < prefilled, second["usage"]
    agent = {a["name"]: a for a in server.get("/v1/agents").json()["data"]}[second["session_id"]]
    shared = agent["shared_prefix"]
    assert shared["present"] and shared["tokens"] >= BLOCK and shared["tokens"] % BLOCK == 0, agent
    assert agent["shared_bytes"] > 0


def test_claude_code_whole_prompt_fits_as_signatures_and_a_second_session_reads_it_from_the_cache(server, tmp_path):
    """Claude Code's tools as JSON are twice SmolLM2's context; as signatures the
    whole request is served. A second session reads the first one's system
    prompt and tools from the cache in whole blocks instead of prefilling them."""
    first = claude_full(server, "Say hi in one word.", tmp_path)  # one directory: Claude Code's prompt names it
    second = claude_full(server, "Say hi in one word.", tmp_path)
    for result in (first, second):
        served(result)
    agents = {a["name"]: a for a in server.get("/v1/agents").json()["data"]}
    one = server.get(f"/v1/agents/{first['session_id']}").json()
    assert all(f"\n{tool}(" in one["system"] for tool in ("Agent", "Bash", "Edit", "Read", "Write", "WebFetch")), one["system"][-3000:]
    assert '"input_schema"' not in one["system"] and '"properties"' not in one["system"]
    assert agents[first["session_id"]]["tokens"] < 8192
    read = second["usage"]["cache_read_input_tokens"]
    assert read >= 8 * BLOCK, second["usage"]  # the system prompt and tools, not prefilled again
    assert agents[second["session_id"]]["shared_bytes"] > 0


def test_codex_exec_answers_without_an_api_error(server, tmp_path):
    events, p = codex(server, "say hi", CODEX_INSTRUCTIONS, tmp_path)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    kinds = [e["type"] for e in events]
    assert "turn.completed" in kinds and "turn.failed" not in kinds and "error" not in kinds, events
    # Codex notes, as an error item, that it has no metadata for a model it does not know
    notes = [e["item"]["message"] for e in events if e.get("item", {}).get("type") == "error"]
    assert all(n.startswith("Model metadata for `smollm2-135m` not found") for n in notes), notes
    (answer,) = [e["item"]["text"] for e in events if e.get("item", {}).get("type") == "agent_message"]
    assert answer.strip()
    thread = events[0]["thread_id"]  # Codex sends it as prompt_cache_key: it names the agent
    assert server.get(f"/v1/agents/{thread}").json()["messages"][-1] == {"role": "assistant", "content": answer}


def test_readme_recipes_are_the_ones_the_tests_run():
    """The README's Claude Code and Codex recipes, word for word (its key and port for the test's)."""
    readme = " ".join(README.read_text().replace("\\\n", " ").split())
    env = {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8000", **CLAUDE_ENV, "ANTHROPIC_AUTH_TOKEN": "secret"}
    claude_line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(
        ["claude", "-p", "say hi", *CLAUDE_ARGS, "--system-prompt", CLAUDE_SYSTEM])
    assert claude_line.replace("'", '"') in readme
    full_line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(["claude", "-p", "Say hi in one word.", *CLAUDE_FULL_ARGS])
    assert full_line.replace("'", '"') in readme
    assert "agentcache serve --api-key secret --compact-tools" in readme
    config = CODEX_CONFIG.format(model=MODEL, url="http://127.0.0.1:8000", instructions="$HOME/.codex/instructions.md")
    assert config in README.read_text()
    assert shlex.join(["codex", "exec", *CODEX_ARGS, "say hi"]).replace("'", '"') in readme
