"""The real Claude Code and Codex CLIs, run against a test server exactly as
the README's recipes run them. scripts/install_test_deps.sh installs both,
pinned, into .npm-clients/; a missing one fails the test, it never skips."""

import json
import os
import subprocess
from pathlib import Path

from server_process import KEY, Server

MODEL = "smollm2-135m"  # the server's default

BIN = Path(__file__).resolve().parent.parent / ".npm-clients" / "node_modules" / ".bin"
TIMEOUT_S = 300


def binary(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: run scripts/install_test_deps.sh"
    return str(path)


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """A CLI with only the environment given (plus PATH), so nothing of the
    machine's own configuration or keys leaks in."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd / "home"), **env}
    Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


# The README's Claude Code recipe: these variables, then `claude` with these arguments.
# CLAUDE_CODE_ATTRIBUTION_HEADER=0: else the system prompt opens with a line that
# changes with the first message, and no two sessions share a prefix.
# CLAUDE_CODE_MAX_OUTPUT_TOKENS: Claude Code asks for 32,000 tokens, and its first
# message carries today's date, so whether a greedy 135M model ends its reply
# changes from day to day; the limit bounds every run (see `served`).
CLAUDE_ENV = {"ANTHROPIC_AUTH_TOKEN": KEY, "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
              "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
              "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_MAX_RETRIES": "0",
              "CLAUDE_CODE_ATTRIBUTION_HEADER": "0", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64"}
CLAUDE_ARGS = ["--output-format", "json", "--tools", "", "--max-turns", "1"]


def claude_json(server: Server, args: list[str], cwd: Path) -> dict:
    """`claude ARGS` against the server with the README's variables; its JSON result."""
    p = run([binary("claude"), *args], {"ANTHROPIC_BASE_URL": server.url, **CLAUDE_ENV}, cwd)
    assert p.stdout.strip(), f"claude printed nothing (exit {p.returncode}): {p.stderr[-2000:]}"
    return {**json.loads(p.stdout), "exit_code": p.returncode}


def claude(server: Server, prompt: str, system_prompt: str, cwd: Path) -> dict:
    """`claude -p PROMPT` with no tools and a short system prompt (its full
    prompt, 24 tools, is ~18K tokens: minutes of prefill on a small CPU)."""
    return claude_json(server, ["-p", prompt, *CLAUDE_ARGS, "--system-prompt", system_prompt], cwd)


def served(result: dict) -> None:
    """Every request was served: the model ended its reply, or it reached the
    output limit each time Claude Code asked for the rest, which Claude Code
    then reports as an error of its own (not an API error)."""
    assert result["api_error_status"] is None, result
    if result["is_error"]:
        assert "output token maximum" in result["result"], result
    else:
        assert result["exit_code"] == 0 and result["stop_reason"] == "end_turn" and result["result"].strip(), result


# Claude Code's own system prompt and 24 tools, as it sends them, against `serve --compact-tools`.
# A small model rarely ends its reply on that prompt.
CLAUDE_FULL_ARGS = ["--output-format", "json", "--max-turns", "1"]


def claude_full(server: Server, prompt: str, cwd: Path) -> dict:
    """`claude -p PROMPT` with its whole prompt (system prompt and tools)."""
    return claude_json(server, ["-p", prompt, *CLAUDE_FULL_ARGS], cwd)


CODEX_CONFIG = """\
model = "{model}"
model_provider = "agentcache"
model_instructions_file = "{instructions}"
include_permissions_instructions = false
include_apps_instructions = false
include_collaboration_mode_instructions = false
include_environment_context = false
check_for_update_on_startup = false
web_search = "disabled"

[model_providers.agentcache]
name = "agentcache"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "AGENTCACHE_API_KEY"

[features]
shell_tool = false
goals = false
apps = false
plugins = false
image_generation = false

[agents]
enabled = false

[skills]
include_instructions = false
"""

CODEX_ARGS = ["--json", "--strict-config", "--skip-git-repo-check", "-s", "read-only"]


def codex(server: Server, prompt: str, instructions: str, cwd: Path) -> tuple[list[dict], subprocess.CompletedProcess]:
    """`codex exec --json` with a CODEX_HOME whose config.toml points at the
    server's Responses API, short instructions, and no shell, agents, skills,
    apps or web search; its events (JSON lines)."""
    home = cwd / "codex-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "instructions.md").write_text(instructions + "\n")
    (home / "config.toml").write_text(CODEX_CONFIG.format(model=MODEL, url=server.url,
                                                          instructions=home / "instructions.md"))
    p = run([binary("codex"), "exec", *CODEX_ARGS, prompt],
            {"CODEX_HOME": str(home), "AGENTCACHE_API_KEY": KEY}, cwd)
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")], p
