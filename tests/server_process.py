"""`agentcache serve` in a subprocess on loopback: what every server test starts."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai

KEY = "test-key-123"
LOAD_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`agentcache serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, home: Path, cache_dir: Path, log: Path, *args: str, key: str | None = KEY):
        self.home, self.cache_dir, self.log, self.args, self.key = home, cache_dir, log, args, key
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.health_seen: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready: int = 200) -> "Server":
        """Start and wait until /health answers `ready` (200 serving, 500 failed to load)."""
        self.port = free_port()
        env = {**os.environ, "AGENTCACHE_HOME": str(self.home)}
        cmd = [sys.executable, "-m", "mlx_agentcache", "serve", "--port", str(self.port), "--cache-dir", str(self.cache_dir),
               *(["--api-key", self.key] if self.key else []), "--max-tokens", "8", "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        self.health_seen = []
        deadline = time.time() + LOAD_TIMEOUT_S
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.tail()}"
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                self.health_seen.append(r.status_code)
                if r.status_code == ready:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {LOAD_TIMEOUT_S} s: {self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert self.proc.returncode in (0, -signal.SIGTERM), f"server exit status {self.proc.returncode}: {self.tail()}"
        assert "Traceback" not in self.tail(), self.tail()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def anthropic(self, key: str = KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def get(self, path: str, headers: dict | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers={"x-api-key": KEY, **(headers or {})}, timeout=REQUEST_TIMEOUT_S)

    def metric(self, name: str) -> float:
        text = self.get("/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


@contextlib.contextmanager
def serving(home: Path, folder: Path, *args: str):
    """A started server on `folder`/cache (log in `folder`), stopped (and checked) on exit."""
    s = Server(home, folder / "cache", folder / "server.log", *args).start()
    try:
        yield s
    finally:
        s.stop()
