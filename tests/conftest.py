"""Shared fixtures: one model home per test session, models converted once.

`model_home` is $AGENTCACHE_TEST_HOME (or $AGENTCACHE_HOME, which CI sets)
when given, so conversions are reused across test files and runs; otherwise
a fresh directory under pytest's tmp.
"""

import mlx_agentcache  # noqa: F401  (must load the BLAS before anything imports mlx.core)

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def mlx_cache_limit():
    """A budgeted pool raises MLX's (process-wide) CPU cache limit to its headroom;
    a test that leaves its pool open must not pass that on to the next test."""
    yield
    from mlx_agentcache.pool import FreedMemory

    FreedMemory.reset()


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


def pytest_sessionfinish(session, exitstatus):
    """A skipped test fails the run: the README's test command installs or provides
    everything the tests need, so a skip means something is missing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        for r in skipped:
            reporter.write_line(f"SKIPPED counts as a failure: {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}")
        session.exitstatus = 1
