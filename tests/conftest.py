"""Shared fixtures: one model home per test session, models converted once.

`model_home` is $AGENTCACHE_TEST_HOME (or $AGENTCACHE_HOME, which CI sets)
when given, so conversions are reused across test files and runs; otherwise
a fresh directory under pytest's tmp.
"""

import mlx_agentcache  # noqa: F401  (must load the BLAS before anything imports mlx.core)

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_home(tmp_path_factory) -> Path:
    env = os.environ.get("AGENTCACHE_TEST_HOME") or os.environ.get("AGENTCACHE_HOME")
    if env:
        home = Path(env).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        return home
    return tmp_path_factory.mktemp("agentcache_home")


@pytest.fixture(scope="session")
def smollm2_path(model_home) -> Path:
    from mlx_agentcache.models.model_store import resolve_model

    return resolve_model("smollm2-135m", model_home)


@pytest.fixture(scope="session")
def gemma3_path(model_home) -> Path:
    from mlx_agentcache.models.model_store import resolve_model

    return resolve_model("gemma3-270m", model_home)


TEST_TOOLS = Path(__file__).resolve().parent.parent / ".test-tools"  # npm packages the tests run, kept out of git


def npm_tool(package: str, command: str) -> Path:
    """A command from an npm package, installed under .test-tools/ on first use."""
    exe = TEST_TOOLS / "node_modules" / ".bin" / command
    if not exe.exists():
        subprocess.run(["npm", "install", "--prefix", str(TEST_TOOLS), "--no-audit", "--no-fund", package], check=True, capture_output=True, timeout=600)
    return exe


@pytest.fixture(scope="session")
def claude_cli() -> Path:
    return npm_tool("@anthropic-ai/claude-code@2.1.197", "claude")


def pytest_sessionfinish(session, exitstatus):
    """A skipped test fails the run: the README's test command installs or provides
    everything the tests need, so a skip means something is missing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        for r in skipped:
            reporter.write_line(f"SKIPPED counts as a failure: {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}")
        session.exitstatus = 1
