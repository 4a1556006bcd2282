"""`agentcache serve` under faults and hostile clients: real server processes,
a real file system that turns read-only (a tmpfs remounted `ro` when root may
mount, else RLIMIT_FSIZE on the server), crafted files with valid checksums,
real sockets for floods (loopback, bounded in count and time)."""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import os
import resource
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from test_server import KEY, MODEL, Server

DEADLINE_S = 60


class Disk:
    """A cache directory whose file system can be made to refuse writes and then recover."""

    def __init__(self, root: Path):
        self.dir = root / "fs"
        self.dir.mkdir()
        self.mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(self.dir)],
                                                             capture_output=True).returncode == 0
        self.pid: int | None = None

    def fail(self, server: Server) -> None:
        if self.mounted:  # busy while the server still has a file open for writing (a turn lock being released)
            poll(lambda: subprocess.run(["mount", "-o", "remount,ro", str(self.dir)], capture_output=True).returncode == 0,
                 "the tmpfs could be remounted read-only")
        else:  # every write of more than one byte fails (EFBIG); Python ignores SIGXFSZ
            self.pid = server.proc.pid
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))

    def recover(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,rw", str(self.dir)], check=True)
        elif self.pid is not None:
            try:
                resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.recover()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=True)


@pytest.fixture(scope="module")
def home(smollm2_path, model_home) -> Path:
    return model_home


def turn(server: Server, agent: str, text: str, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY, "X-Agent-Id": agent},
                      json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}, timeout=300)


def poll(check, what: str, deadline_s: float = DEADLINE_S):
    """`check()`'s first truthy value, polled until a deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {deadline_s} s: {what}")


# -- 1: no acknowledged turn is lost -------------------------------------------------------
def test_unsaved_turn_is_reported_retried_and_survives_a_restart(home, tmp_path):
    disk = Disk(tmp_path)
    server = Server(home, disk.dir / "cache", tmp_path / "server.log").start()
    try:
        assert turn(server, "t0", "Hello.").json()["x_agentcache"]["saved"] is True
        disk.fail(server)
        r = turn(server, "t3", "Remember the word apple.")
        assert r.status_code == 200
        assert r.json()["x_agentcache"]["saved"] is False and r.headers["x-agentcache-saved"] == "false"
        assert server.get("/v1/agents/t3").json()["unsaved"] is True
        assert "t3" in httpx.get(server.url + "/health").json()["unsaved"]
        assert server.metric("agentcache_save_failures_total") >= 1 and server.metric("agentcache_unsaved_agents") >= 1
        disk.recover()
        poll(lambda: httpx.get(server.url + "/health").json()["unsaved"] == [], "the retry saved t3")
        assert server.metric("agentcache_save_retries_total") >= 1 and server.metric("agentcache_unsaved_agents") == 0
        assert server.get("/v1/agents/t3").json()["unsaved"] is False

        disk.fail(server)  # the reproduction: remount rw, stop at once, start again
        assert turn(server, "t4", "Remember the word pear.").json()["x_agentcache"]["saved"] is False
        disk.recover()
        server.stop()
        server.start()
        for agent, word in (("t3", "apple"), ("t4", "pear")):
            r = server.get(f"/v1/agents/{agent}")
            assert r.status_code == 200 and word in r.json()["messages"][0]["content"]

        disk.fail(server)  # a stop that cannot write says which turns are lost
        assert turn(server, "t5", "Remember the word plum.").json()["x_agentcache"]["saved"] is False
        server.stop()
        assert "NOT SAVED at shutdown: t5" in server.tail()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        disk.close()
