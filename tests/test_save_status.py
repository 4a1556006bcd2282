"""Saves that fail are reported as failed: `say --json` says `"saved": false` with
the reason, one `error:` line, exit status 3; read-only directories, a cache
directory under a read-only parent and a file-size limit end in one clean line
(no traceback) for `say`, `agents import` and `agents rm`. Real read-only
mounts (a tmpfs remounted read-only; root ignores permission bits) and a real
RLIMIT_FSIZE, no mocks."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

AGENTCACHE = str(Path(sys.executable).parent / "agentcache")
EXIT_NOT_SAVED = 3


def agentcache(home: Path, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, AGENTCACHE_HOME=str(home))

    def limit() -> None:  # as `ulimit -f`: writes past `fsize` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    r = subprocess.run([AGENTCACHE, *args], env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit if fsize else None, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


class ReadOnly:
    """A directory that can be made read-only for real: a tmpfs remounted
    read-only when running as root (root ignores permission bits), else chmod."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.mounted = os.geteuid() == 0
        if self.mounted:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], capture_output=True, text=True, check=False)
            assert r.returncode == 0, f"running as root, a tmpfs must be mountable for this test: {r.stderr}"

    def freeze(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)
        else:
            for p in [self.root, *self.root.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
        with pytest.raises(OSError):
            (self.root / "probe").write_text("x")

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)
        else:
            for p in [self.root, *self.root.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)


@pytest.fixture
def readonly(tmp_path):
    ro = ReadOnly(tmp_path / "ro")
    yield ro
    ro.close()


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_say_in_read_only_dir_is_not_saved(readonly, smollm2_path, model_home):
    d = readonly.root / "agents"
    r = agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "--json", "Remember PELICAN")
    assert r.returncode == 0 and json.loads(r.stdout)["saved"] is True
    readonly.freeze()
    before = snapshot(d)
    r = agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "--json", "Again")
    assert r.returncode == EXIT_NOT_SAVED, r.stderr
    out = json.loads(r.stdout)
    assert out["reply"] and out["saved"] is False
    assert "c.safetensors" in out["save_error"] and "c.json" in out["save_error"]
    assert ("Read-only file system" if readonly.mounted else "Permission denied") in out["save_error"]
    assert len(error_lines(r)) == 1 and "the turn of agent 'c' was not saved to disk" in error_lines(r)[0]
    assert snapshot(d) == before
    r = agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "Again")  # plain text: same status
    assert r.returncode == EXIT_NOT_SAVED and len(error_lines(r)) == 1 and r.stdout.strip()


def test_corrupt_cache_in_read_only_dir_reprefills(readonly, smollm2_path, model_home):
    d = readonly.root / "agents"
    assert agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "Remember PELICAN").returncode == 0
    f = d / "c.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # a bit flip in the last tensor: its checksum no longer matches
    f.write_bytes(bytes(data))
    readonly.freeze()
    r = agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "--json", "Again")
    assert r.returncode == EXIT_NOT_SAVED, r.stderr
    out = json.loads(r.stdout)
    assert out["tier"] == "cold" and out["reply"] and out["saved"] is False
    assert "cache for agent 'c' not used" in r.stderr and "left in place (could not move it" in r.stderr
    assert f.read_bytes() == bytes(data)


def test_file_size_limit_is_not_saved_and_leaves_no_partial_file(tmp_path, smollm2_path, model_home):
    d = tmp_path / "agents"
    long_text = " ".join(f"word{i}" for i in range(60))
    r = agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "big", "--max-tokens", "6", "--json", long_text, fsize=100 << 10)
    assert r.returncode == EXIT_NOT_SAVED, r.stderr
    out = json.loads(r.stdout)
    assert out["saved"] is False and "could not save big.safetensors: File too large" in out["save_error"]
    assert len(error_lines(r)) == 1
    assert not (d / "big.safetensors").exists()
    assert [p.name for p in d.iterdir() if ".tmp" in p.name] == []
    assert json.loads((d / "big.json").read_text())["messages"][1]["content"] == out["reply"]  # the small history did fit
    r = agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "big", "--max-tokens", "6", "--json", "And now?")
    assert r.returncode == 0 and json.loads(r.stdout)["saved"] is True and (d / "big.safetensors").exists()


def test_management_in_read_only_places_fails_in_one_line(readonly, smollm2_path, model_home, tmp_path):
    d = readonly.root / "agents"
    assert agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "Remember PELICAN").returncode == 0
    card = tmp_path / "c.archive.safetensors"
    assert agentcache(model_home, "agents", "export", "--cache-dir", str(d), "c", "-o", str(card)).returncode == 0
    readonly.freeze()
    before = snapshot(d)
    cases = [
        (("agents", "rm", "--cache-dir", str(d), "-y", "c"), "could not remove agent 'c'"),
        (("agents", "import", "--cache-dir", str(d), "--name", "c2", str(card)), "could not import"),
        (("agents", "import", "--cache-dir", str(readonly.root / "new" / "sub"), str(card)), "could not import"),
        (("say", "--cache-dir", str(readonly.root / "new" / "sub"), "--agent", "c", "hello"), "cannot use"),
    ]
    for args, needle in cases:
        r = agentcache(model_home, *args)
        assert r.returncode == 1, (args, r.stderr)
        assert len(error_lines(r)) == 1 and needle in error_lines(r)[0], (args, r.stderr)
    assert snapshot(d) == before


def test_import_under_a_file_size_limit_leaves_nothing(tmp_path, smollm2_path, model_home):
    d = tmp_path / "agents"
    assert agentcache(model_home, "say", "--cache-dir", str(d), "--agent", "c", "--max-tokens", "6", "Remember PELICAN").returncode == 0
    card = tmp_path / "c.archive.safetensors"
    assert agentcache(model_home, "agents", "export", "--cache-dir", str(d), "c", "-o", str(card)).returncode == 0
    r = agentcache(model_home, "agents", "import", "--cache-dir", str(d), "--name", "c2", str(card), fsize=32 << 10)
    assert r.returncode == 1 and "File too large" in error_lines(r)[0]
    assert not (d / "c2.safetensors").exists() and not (d / "c2.json").exists()


def test_workflow_run_in_read_only_dir_is_not_saved(readonly, smollm2_path, model_home, tmp_path):
    wf = tmp_path / "one.yaml"
    wf.write_text('name: one\nagents:\n  solo:\n    system: "You answer briefly."\nrounds: 1\norder: [solo]\nstart: "Say hi."\n')
    d = readonly.root / "agents"
    d.mkdir()
    readonly.freeze()
    r = agentcache(model_home, "run", str(wf), "--cache-dir", str(d), "--max-tokens", "4", "--json")
    assert r.returncode == EXIT_NOT_SAVED, r.stderr
    assert json.loads(r.stdout)["turns"][0]["reply"]
    assert len(error_lines(r)) == 1 and "not saved: solo" in error_lines(r)[0]
    assert list(d.iterdir()) == []
