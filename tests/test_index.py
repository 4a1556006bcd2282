"""The listing index (store/index.py): listings answer from it while the files
are unchanged, follow every change, and rebuild it from the files when it is lost."""

import json
import os
import subprocess
import sys

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import pytest

from mlx_agentcache import catalog
from mlx_agentcache.pool import CachePool
from mlx_agentcache.store import history, index
from mlx_agentcache.store.layout import Layout
from tiny import random_cache, tokens
from mlx_agentcache.kvcache import AgentCache, LayerCache


def saved(d, name: str, n: int) -> None:
    p = CachePool(d, "f" * 32, lambda: AgentCache([LayerCache("q4c") for _ in range(2)]), float("inf"), warn=pytest.fail,
                  write_behind=False, share_prefixes=False)
    p.save(name, random_cache(n, n=n, bits="q4c"))


def test_listing_follows_the_files_and_reads_only_what_changed(tmp_path):
    saved(tmp_path, "a", 300)
    saved(tmp_path, "b", 200)
    history.write(Layout(tmp_path).history_file("c"), "c", None, [{"role": "user", "content": "hi"}])
    notes = []
    first = index.listing(tmp_path, warn=notes.append)
    assert first == [catalog.describe(tmp_path, n) for n in "abc"]
    assert [i["tier"] for i in first] == ["warm", "warm", "cold"] and first[0]["tokens"] == 300
    assert notes == []  # the first listing of a directory builds its index silently
    # An unchanged file (same time, size, inode) is not read again: garbage in place goes unnoticed.
    a = Layout(tmp_path).agent_file("a")
    st = a.stat()
    with open(a, "r+b") as f:
        f.write(b"\0" * 16)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert index.listing(tmp_path, warn=notes.append) == first and notes == []
    # A changed, a removed and a new agent are each read again.
    saved(tmp_path, "a", 350)
    catalog.remove(tmp_path, "b")
    saved(tmp_path, "d", 100)
    got = {i["name"]: i for i in index.listing(tmp_path, warn=notes.append)}
    assert sorted(got) == ["a", "c", "d"] and got["a"]["tokens"] == 350 and got["d"]["tokens"] == 100
    assert notes == []
    assert sorted(json.loads(Layout(tmp_path).index_file.read_text())["agents"]) == ["a", "c", "d"]


@pytest.mark.parametrize("damage", ["lost", "garbage"])
def test_a_lost_or_damaged_index_is_rebuilt_with_one_line(tmp_path, damage):
    saved(tmp_path, "a", 300)
    first = index.listing(tmp_path, warn=lambda m: None)
    path = Layout(tmp_path).index_file
    if damage == "lost":
        path.unlink()
    else:
        path.write_bytes(b"{not json")
    notes = []
    assert index.listing(tmp_path, warn=notes.append) == first
    assert len(notes) == 1 and path.name in notes[0] and "rebuilt from the files of 1 agents" in notes[0]


def test_agents_ls_imports_no_mlx(tmp_path):
    saved(tmp_path, "a", 300)
    code = ("import sys; from typer.testing import CliRunner; from mlx_agentcache.cli import app; "
            f"r = CliRunner().invoke(app, ['agents', 'ls', '--cache-dir', {str(tmp_path)!r}]); "
            "print(r.exit_code, 'a ' in r.output, 'mlx.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "True", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("options", [[], ["--json"], ["--cache-dir"]])
def test_the_agentcache_command_lists_without_numpy_or_its_cli_framework(tmp_path, options):
    """The command's own entry answers `agents ls` before typer (which builds pydantic
    validators per run), numpy or MLX load: most of a listing's time was their import."""
    saved(tmp_path, "a", 300)
    args = options + [str(tmp_path)] if options == ["--cache-dir"] else options
    env = {**os.environ, "AGENTCACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_agentcache", "agents", "ls", *args], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and ("\na " in out.stdout or '"name": "a"' in out.stdout), out.stdout + out.stderr
    loaded = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "mlx_agentcache.store.index" in loaded and not loaded & {"numpy", "typer", "pydantic", "mlx.core", "filelock"}, loaded


def test_a_settled_directory_is_listed_from_the_index_alone_until_a_save(tmp_path):
    """With the directory unchanged since well before the index's scan, the index answers
    alone; any save renames a file into the directory and is seen at once."""
    saved(tmp_path, "a", 300)
    old = os.stat(tmp_path).st_mtime_ns - 10**10
    os.utime(tmp_path, ns=(old, old))  # the last change was 10 s ago
    first = index.listing(tmp_path, warn=lambda m: None)
    assert json.loads(Layout(tmp_path).index_file.read_text())["settled"] is True
    assert index.listing(tmp_path) == first
    saved(tmp_path, "a", 350)
    assert index.listing(tmp_path)[0]["tokens"] == 350
