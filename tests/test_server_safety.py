"""`agentcache serve` under faults and hostile clients: real server processes,
a real file system that turns read-only (a tmpfs remounted `ro` when root may
mount, else RLIMIT_FSIZE on the server), crafted files with valid checksums,
real sockets for floods (loopback, bounded in count and time)."""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import json
import os
import sys
import resource
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import forge
from test_server import KEY, MODEL, Server, home, server  # noqa: F401  (module fixtures: the model home, one server)

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
        r = httpx.delete(server.url + "/v1/agents/t0", headers={"x-api-key": KEY})  # reported, and nothing forgotten
        assert r.status_code == 500 and r.json()["error"]["code"] == "delete_failed" and str(disk.dir) not in r.text
        assert server.get("/v1/agents/t0").json()["messages"][0]["content"] == "Hello."
        r = turn(server, "t3", "Remember the word apple.")
        assert r.status_code == 200
        assert r.json()["x_agentcache"]["saved"] is False and r.headers["x-agentcache-saved"] == "false"
        assert server.get("/v1/agents/t3").json()["unsaved"] is True
        health = lambda **kw: httpx.get(server.url + "/health", **kw).json()  # noqa: E731
        assert "t3" in health(headers={"x-api-key": KEY})["unsaved"]
        anonymous = health()  # the names are for key holders; anyone may see that some are unsaved
        assert "unsaved" not in anonymous and anonymous["unsaved_count"] >= 1 and "t3" not in json.dumps(anonymous)
        assert server.metric("agentcache_save_failures_total") >= 1 and server.metric("agentcache_unsaved_agents") >= 1
        disk.recover()
        poll(lambda: health(headers={"x-api-key": KEY})["unsaved"] == [], "the retry saved t3")
        assert server.metric("agentcache_save_retries_total") >= 1 and server.metric("agentcache_unsaved_agents") == 0
        assert server.get("/v1/agents/t3").json()["unsaved"] is False

        disk.fail(server)  # the issue's reproduction: remount rw, stop at once, start again
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


# -- crafted files: every checksum recomputed, so only the checks of meaning stand in the way
reforge_header = forge.reforge


def reforge_tensors(path: Path, formats: tuple, edit) -> None:
    """Edit a container's tensors and metadata and write it again with every checksum recomputed."""
    from mlx_agentcache.store import container

    arrays, meta = container.read_tensors(path, formats)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    edit(arrays, meta)
    container.write_tensors(path, arrays, meta)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGENTCACHE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "mlx_agentcache", *args], env=env, capture_output=True, text=True, timeout=300)


def clean_failure(r: subprocess.CompletedProcess, needle: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out and needle in out, out


def download(server: Server, path: str, out: Path) -> Path:
    r = server.get(path)
    assert r.status_code == 200, r.text
    out.write_bytes(r.content)
    return out


def upload(server: Server, method: str, path: str, data: bytes) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"x-api-key": KEY}, content=data, timeout=300)


LONG_SYSTEM = " ".join(f"Rule {i}: answer in plain words and keep every reply short." for i in range(40))


def test_infinity_in_a_cache_header_is_moved_aside_and_nothing_else_stops(server, home, tmp_path):
    for agent in ("inf1", "inf2"):
        assert turn(server, agent, "Say hi.").json()["x_agentcache"]["saved"] is True
        assert server.get(f"/v1/agents/{agent}").json()["tier"] in ("hot", "warm")
    assert httpx.post(f"{server.url}/v1/agents/inf1/evict", headers={"x-api-key": KEY}).status_code == 200
    server.stop()  # a forged file present at start-up must not stop the server either

    def infinite(header, meta):
        header["tokens"]["shape"][0] = float("inf")  # a manifest's one tensor: the token ids

    for agent in ("inf1", "inf2"):
        reforge_header(server.cache_dir / f"{agent}.safetensors", infinite)
    server.start()
    assert httpx.get(server.url + "/health").status_code == 200
    listed = {a["name"]: a for a in server.get("/v1/agents").json()["data"]}
    assert listed["inf1"]["tier"] == "invalid" and "not an integer" in listed["inf1"]["error"]
    r = cli(home, "agents", "ls", "--cache-dir", str(server.cache_dir))
    assert r.returncode == 0 and "inf2" in r.stdout and "Traceback" not in r.stderr, r.stderr
    r = turn(server, "inf1", "Say hi again.")  # the file is refused, moved aside and the agent re-prefilled
    assert r.status_code == 200 and r.json()["x_agentcache"]["tier"] == "cold"
    assert list(server.cache_dir.glob("inf1.safetensors.bad-*"))
    r = cli(home, "agents", "gc", "--yes", "--cache-dir", str(server.cache_dir))
    assert r.returncode == 0 and "inf2.safetensors  (damaged cache file" in r.stdout, r.stdout + r.stderr
    assert not (server.cache_dir / "inf2.safetensors").exists() and not list(server.cache_dir.glob("inf1.safetensors.bad-*"))
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("field,value", [("first", float("inf")), ("first", -1), ("tokens", 2.5), ("hops", float("nan")), ("avg_bits", float("inf"))])
def test_card_header_numbers_are_refused_cleanly_everywhere(server, home, tmp_path, field, value):
    assert turn(server, "cs-src", "Name a fruit.").status_code == 200
    card = download(server, "/v1/agents/cs-src/cachecard?bits=8", tmp_path / "x.card")

    def edit(header, meta):
        h = json.loads(meta["card"])
        h[field] = value
        meta["card"] = json.dumps(h)

    reforge_header(card, edit)
    r = upload(server, "POST", "/v1/agents/cs-dst/cachecard", card.read_bytes())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_card" and field in r.json()["error"]["message"]
    assert server.get("/v1/agents/cs-dst").status_code == 404
    clean_failure(cli(home, "card", "show", str(card)), field)
    if field == "first":
        clean_failure(cli(home, "card", "inject", "--agent", "cs-cli", "--cache-dir", str(tmp_path / "c"), str(card)), field)


def test_infinity_in_an_archive_is_refused_cleanly(server, home, tmp_path):
    assert turn(server, "ar-src", "Name a tree.").status_code == 200
    archive = download(server, "/v1/agents/ar-src/archive", tmp_path / "a.archive.safetensors")
    reforge_header(archive, lambda header, meta: header["tokens"]["data_offsets"].__setitem__(1, float("inf")))
    r = upload(server, "PUT", "/v1/agents/ar-dst/archive", archive.read_bytes())
    assert r.status_code == 400 and "not an integer" in r.json()["error"]["message"]
    clean_failure(cli(home, "agents", "import", "--cache-dir", str(tmp_path / "c"), str(archive)), "not an integer")


# -- 2: positions are part of a card's validity; uploads never reach another agent ---------
def shift_positions(first: int):
    def edit(arrays, meta):
        h = json.loads(meta["card"])
        h["first"] = first
        meta["card"] = json.dumps(h)
        arrays["positions"] = np.arange(first, first + h["tokens"], dtype=np.int32)
    return edit


@pytest.mark.parametrize("first", [2**31 - 1000, 8192 - 4])
def test_card_positions_past_the_context_are_refused(server, tmp_path, first):
    from mlx_agentcache import cards

    assert turn(server, "pos-src", "Name a river.").status_code == 200
    card = download(server, "/v1/agents/pos-src/cachecard?bits=8", tmp_path / "p.card")
    reforge_tensors(card, (cards.FORMAT,), shift_positions(first))
    assert cards.read(card).first == first  # structurally valid: only its positions are wrong
    r = upload(server, "POST", "/v1/agents/pos-evil/cachecard", card.read_bytes())
    assert r.status_code == 400 and "context of 8192 tokens" in r.json()["error"]["message"]
    assert server.get("/v1/agents/pos-evil").status_code == 404


@pytest.mark.parametrize("kv", ["q4", "q4c"])
def test_uploaded_tensors_never_become_another_agents_prefix(home, tmp_path, kv):
    """Where agents share leading 256-token blocks, an upload whose tokens are a common
    system prompt but whose values are garbage must not change the reply any other agent
    gets for that prompt."""
    from mlx_agentcache import cards

    server = Server(home, tmp_path / "cache", tmp_path / "server.log", "--kv", kv).start()
    try:
        ask = lambda agent: httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY, "X-Agent-Id": agent},  # noqa: E731
                                       json={"model": MODEL, "max_tokens": 6, "messages": [{"role": "system", "content": LONG_SYSTEM},
                                                                                           {"role": "user", "content": "Name a color."}]},
                                       timeout=300).json()
        reference = ask("q4-src")
        assert reference["usage"]["prompt_tokens"] > 300
        card = download(server, "/v1/agents/q4-src/cachecard?bits=8&uniform=true", tmp_path / "src.card")
        assert server.get("/v1/agents/q4-src").status_code == 200
        assert httpx.delete(server.url + "/v1/agents/q4-src", headers={"x-api-key": KEY}).status_code == 200

        def garbage(arrays, meta):
            for name in arrays:
                if name.startswith("layers.") and name.endswith(".1"):  # scales: finite, wrong
                    arrays[name] = (-7 * arrays[name]).astype(arrays[name].dtype)

        reforge_tensors(card, (cards.FORMAT,), garbage)
        r = upload(server, "POST", "/v1/agents/q4-evil/cachecard", card.read_bytes())
        assert r.status_code == 201, r.text
        for agent in ("q4-a", "q4-b"):  # the second one may reuse the first one's own prefill
            got = ask(agent)
            assert got["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
        assert ask("q4-a")["x_agentcache"]["tier"] == "hot"
    finally:
        server.stop()


# -- 4: shape checks on every run of every encoding -----------------------------------------
def double_q8_heads(arrays, meta):
    """Double the kv heads of a q8 run (the q4c tail) in layer 0: a consistent run, wrong for the model.
    An archive lists its runs as [encoding, tokens] in `layers`, an agent's segment as
    [encoding, start, tokens] in `runs`."""
    runs_of_layer0 = json.loads(meta["layers"])[0]["runs"] if "layers" in meta else json.loads(meta["runs"])[0]
    runs = [r for r, (enc, *_) in enumerate(runs_of_layer0) if enc == "q8" and r > 0]
    assert runs, f"no q8 run after the body in {runs_of_layer0}"
    prefix = f"layers.0.{runs[0]}."
    for name in [n for n in arrays if n.startswith(prefix)]:
        arrays[name] = np.concatenate([arrays[name], arrays[name]], axis=0)


def test_doubled_heads_in_a_q8_tail_are_refused_by_api_and_cli(server, home, tmp_path):
    from mlx_agentcache.store import codec, formats

    r = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY, "X-Agent-Id": "hx-src"}, timeout=300,
                   json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Hi."}]})
    assert r.status_code == 200
    archive = download(server, "/v1/agents/hx-src/archive", tmp_path / "hx.archive.safetensors")
    reforge_tensors(archive, codec.FORMATS, double_q8_heads)
    r = upload(server, "PUT", "/v1/agents/hx/archive", archive.read_bytes())
    assert r.status_code == 400 and "q8 run holds" in r.json()["error"]["message"], r.text
    assert server.get("/v1/agents/hx").status_code == 404

    cache = tmp_path / "cli"  # the same run in an agent's own cache file: refused, moved aside, re-prefilled
    r = cli(home, "say", "--agent", "hy", "--cache-dir", str(cache), "--max-tokens", "2", "--system", LONG_SYSTEM, "Hi.")
    assert r.returncode == 0, r.stderr
    (segment,) = (cache / "segments" / "hy").glob("*.safetensors")  # one turn: one segment
    reforge_tensors(segment, (formats.SEGMENT,), double_q8_heads)
    r = cli(home, "say", "--agent", "hy", "--cache-dir", str(cache), "--max-tokens", "2", "--json", "Again.")
    assert r.returncode == 0 and "Traceback" not in r.stderr and json.loads(r.stdout)["tier"] == "cold", r.stderr
    assert len(list(cache.glob("hy.safetensors.bad-*"))) == 1 and (cache / "hy.safetensors").exists()  # set aside, then saved anew


# -- 6: a busy agent answers 409, never a silent overwrite ---------------------------------
def test_concurrent_turns_on_one_agent_get_409_not_an_overwrite(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> httpx.Response:
        return httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY, "X-Agent-Id": "busy-1"}, timeout=300,
                          json={"model": MODEL, "max_tokens": 24, "messages": [{"role": "user", "content": f"Message number {i}."}]})

    with ThreadPoolExecutor(5) as ex:
        got = list(ex.map(one, range(5)))
    ok = [(i, r) for i, r in enumerate(got) if r.status_code == 200]
    busy = [r for r in got if r.status_code == 409]
    assert len(ok) + len(busy) == 5 and ok and busy
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "agent_busy" for r in busy)
    # the request is the truth: the history is one answered request's exchange, whole
    exchanges = [[{"role": "user", "content": f"Message number {i}."}, {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}]
                 for i, r in ok]
    assert server.get("/v1/agents/busy-1").json()["messages"] in exchanges


# -- 5: limits without a key ----------------------------------------------------------------
@pytest.fixture(scope="module")
def keyless(home, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-keyless")
    s = Server(home, d / "cache", d / "server.log", "--max-connections", "32", "--header-timeout", "3", key=None).start()
    yield s
    s.stop()


def test_idle_connection_flood_is_bounded_and_loses_nothing(keyless):
    """More idle connections than the bound: the extra ones get a 503 at once, the held
    ones (and one with half-sent headers) are closed after the header timeout, the log
    stays small, and a turn answered afterwards is saved."""
    import socket

    server = keyless
    socks = []
    try:
        log_before = server.log.stat().st_size
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(32 + 48)]

        def read_all(s) -> bytes:  # ends with a 503 at once, or when the header deadline closes it
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

        replies = [read_all(s) for s in socks]
        half = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # alone now: held, then timed out
        socks.append(half)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        replies.append(read_all(half))
        refused = [r for r in replies if r.startswith(b"HTTP/1.1 503")]
        assert len(refused) >= 48 and all(b"too many open connections" in r for r in refused)
        assert all(r == b"" for r in replies if r not in refused)  # held ones: closed without an answer
        assert server.metric("agentcache_connections_refused_total") == len(refused)
        assert server.metric("agentcache_connections_timed_out_total") == len(replies) - len(refused)
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]},
                       headers={"X-Agent-Id": "after-flood"}, timeout=300)
        assert r.status_code == 200 and r.json()["x_agentcache"]["saved"] is True
        assert server.log.stat().st_size - log_before < 4096, server.tail()
    finally:
        for s in socks:
            s.close()


def test_without_a_key_cross_origin_writes_and_rebinding_are_refused(keyless):
    url = keyless.url + "/v1/chat/completions"
    body = json.dumps({"model": MODEL, "max_tokens": 2, "user": "alice", "messages": [{"role": "user", "content": "Forget everything."}]})
    r = httpx.post(url, content=body, headers={"content-type": "text/plain", "origin": "https://evil.example"}, timeout=300)
    assert r.status_code == 415 and keyless.get("/v1/agents/alice").status_code == 404  # a form's POST changes nothing
    for host in ("evil.example", "evil.example:%d" % keyless.port, "10.0.0.1"):  # DNS rebinding names the page's own host
        r = httpx.get(keyless.url + "/v1/agents", headers={"host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    for host in ("localhost:%d" % keyless.port, "127.0.0.1:%d" % keyless.port):
        assert httpx.get(keyless.url + "/v1/agents", headers={"host": host}).status_code == 200
    r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=300)
    assert r.status_code == 200 and r.json()["x_agentcache"]["agent"] == "alice"


def test_large_bodies_are_parsed_and_tokenized_off_the_event_loop(keyless):
    """Four concurrent ~2 MB prompts (refused after tokenizing: over the context) while
    /health is asked again and again: it keeps answering. On the event loop the four
    would run one after another and /health would wait for at least one whole of them
    (a quarter of the work); off it, no wait comes near that (the bound is relative, so
    a loaded machine does not decide the outcome)."""
    import threading

    text = "lorem ipsum dolor sit amet " * 80_000
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
    results, gaps = [], []

    def big(i: int) -> None:
        results.append(httpx.post(keyless.url + "/v1/chat/completions", json=body, headers={"X-Agent-Id": f"big-{i}"}, timeout=300))

    threads = [threading.Thread(target=big, args=(i,)) for i in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(keyless.url + "/health", timeout=60).status_code == 200
        gaps.append(time.monotonic() - t0)
    for t in threads:
        t.join()
    work = time.monotonic() - start
    assert [r.status_code for r in results] == [400] * 4 and all(r.json()["error"]["code"] == "context_length_exceeded" for r in results)
    assert len(gaps) > 3 and max(gaps) < work / 4, (work, sorted(gaps)[-5:])


# -- 8: the smaller items ------------------------------------------------------------------
@pytest.mark.parametrize("body,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": 5}, {"role": "user", "content": "x"}]}).encode(), "tool_calls"),
    (json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": "f"}]}, {"role": "user", "content": "x"}]}).encode(), "tool_calls"),
])
def test_malformed_bodies_are_400s(server, body, needle):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"x-api-key": KEY, "content-type": "application/json"}, timeout=300)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_bad_card_budget_history_of_another_agent_and_paths(server):
    assert turn(server, "sm-src", "Hi.").status_code == 200
    for bits in ("inf", "nan", "0", "100"):
        r = server.get(f"/v1/agents/sm-src/cachecard?bits={bits}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "bits"
    forged = {"name": "sm-src", "system": None, "messages": [{"role": "user", "content": "not yours"}, {"role": "assistant", "content": "x"}]}
    (server.cache_dir / "sm-other.json").write_text(json.dumps(forged))
    r = server.get("/v1/agents/sm-other")  # refused and moved aside: the agent starts anew
    assert "not yours" not in r.text and list(server.cache_dir.glob("sm-other.json.bad-*"))
    (server.cache_dir / "sm-nocache.json").write_text(json.dumps({**forged, "name": "sm-nocache"}))
    r = server.get("/v1/agents/sm-nocache/archive")
    assert r.status_code == 404 and "sm-nocache" in r.text and str(server.cache_dir) not in r.text and "/" not in r.json()["error"]["message"]


def test_keys_utf8_either_header_and_scoped(home, tmp_path):
    key = "clé-ü-🔑"
    server = Server(home, tmp_path / "cache", tmp_path / "server.log", "--api-key", "team-key:team-*", key=key).start()
    try:
        raw = key.encode()
        get = lambda path, headers: httpx.get(server.url + path, headers=headers, timeout=300)  # noqa: E731
        assert get("/v1/models", {"x-api-key": raw}).status_code == 200 and get("/v1/models", {"authorization": b"Bearer " + raw}).status_code == 200
        assert get("/v1/models", {"x-api-key": b"wrong", "authorization": b"Bearer " + raw}).status_code == 200  # either header may hold it
        assert get("/v1/models", {"x-api-key": raw, "authorization": b"Bearer wrong"}).status_code == 200
        assert get("/v1/models", {"x-api-key": b"cl\xe9"}).status_code == 401 and get("/v1/models", {}).status_code == 401

        team = {"x-api-key": "team-key"}
        ask = lambda headers, agent: httpx.post(server.url + "/v1/chat/completions", timeout=300, headers={**headers, **({"X-Agent-Id": agent} if agent else {})},  # noqa: E731
                                                json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
        assert ask({"x-api-key": raw}, "boss").status_code == 200
        assert ask(team, "team-a").status_code == 200
        for agent in ("boss", "other", None):  # another agent, a new one, an anonymous one
            r = ask(team, agent)
            assert r.status_code == 403 and r.json()["error"]["code"] == "agent_out_of_scope"
        assert [a["name"] for a in get("/v1/agents", team).json()["data"]] == ["team-a"]
        assert {a["name"] for a in get("/v1/agents", {"x-api-key": raw}).json()["data"]} == {"boss", "team-a"}
        for path in ("/v1/agents/boss", "/v1/agents/boss/archive", "/v1/agents/boss/card", "/v1/agents/boss/cachecard"):
            assert get(path, team).status_code == 404
        assert get("/v1/agents/team-a", team).json()["messages"][0]["content"] == "Hi."
        assert httpx.delete(server.url + "/v1/agents/boss", headers=team).status_code == 404
        assert get("/v1/agents/boss", {"x-api-key": raw}).status_code == 200
    finally:
        server.stop()
