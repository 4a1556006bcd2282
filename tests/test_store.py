"""The store against hostile input: one name rule, gc that never touches a
live agent, damaged histories set aside, caches and archives checked against
the model's structure (not only their checksums)."""

import json
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_agentcache import catalog
from mlx_agentcache.pool import CachePool
from mlx_agentcache.runtime import Runtime
from mlx_agentcache.store import codec, container, history, segments
from mlx_agentcache.store.layout import Layout, validate_agent_name
import forge
from tiny import tiny_runner, tokens


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """The tiny random Llama with a byte-level tokenizer: real turns, in seconds."""
    from mlx_lm.utils import load_tokenizer

    from mlx_agentcache.models import tiny_models

    d = tmp_path_factory.mktemp("tok")
    tiny_models.write_byte_tokenizer(d)
    return tiny_runner(tokenizer=load_tokenizer(d))


def quiet_pool(d: Path, runner, **kw) -> CachePool:
    return CachePool(d, runner.fingerprint, runner.new_cache, float("inf"), warn=kw.pop("warn", lambda m: None), share_prefixes=False, **kw)


def saved_agent(d: Path, runner, name: str = "a", n: int = 40) -> Path:
    """An agent file written through the pool: a real prefill of `n` tokens."""
    p = quiet_pool(d, runner, write_behind=False)
    cache, _ = p.checkout(name)
    cache, _ = p.begin_turn(name, tokens(n, vocab=256))
    runner.prefill(tokens(n, vocab=256), cache)
    p.checkin(name, cache)
    return p.path(name)


def rewrite(path: Path, change) -> None:
    """Change a file's tensors or metadata and write it back with correct checksums:
    only the structure is wrong, never a CRC. A manifest's one segment holds the layers."""
    _, meta, _ = container.read_header(path, codec.FORMATS)
    if meta["format"] == codec.MANIFEST:
        (path,) = Layout(path.parent).segment_files(Layout.agent_of(path))
    tensors, meta = container.read_tensors(path, codec.FORMATS + (segments.SEGMENT_FORMAT,))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    change(tensors, meta)
    container.write_tensors(path, tensors, meta)


# -- names ---------------------------------------------------------------------

BAD_NAMES = ["nl\n", "x.card", "x.archive", "k.safetensors.bad-1", "a.safetensors", "h.json.bad-1", "", "../x", ".h", "a..b", "x" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_one_name_rule_everywhere(name, tmp_path, runner):
    with pytest.raises(ValueError, match="invalid agent name"):
        validate_agent_name(name)
    rt = Runtime(cache_dir=tmp_path, runner=runner, max_tokens=2)
    with pytest.raises(ValueError, match="invalid agent name"):
        rt.agent(name)
    archive = tmp_path / "ok.archive.safetensors"
    saved_agent(tmp_path, runner, "ok")
    catalog.export_archive(tmp_path, "ok", archive)
    with pytest.raises(ValueError, match="invalid agent name"):
        catalog.import_archive(tmp_path / "other", archive, name)
    assert not (tmp_path / "other").exists() or not list((tmp_path / "other").iterdir())
    rt.close()


def test_names_at_the_limits_work_and_list(tmp_path, runner):
    for name in ["a", "A.b-c_d", "x" * 64, "a.json"]:
        saved_agent(tmp_path, runner, name, n=5)
    assert catalog.names(tmp_path) == sorted(["a", "A.b-c_d", "x" * 64, "a.json"])


def test_gc_never_touches_a_live_agents_files(tmp_path, runner):
    """A file whose name only looks like one set aside (an agent of an older
    name rule) stays; a real one set aside goes."""
    live = tmp_path / "k.safetensors.bad-1.safetensors"
    saved_agent(tmp_path, runner, "k", n=5).rename(live)
    (tmp_path / "k.safetensors.bad-1.json").write_text(json.dumps({"messages": []}))
    bad = tmp_path / "x.safetensors.bad-20250101-000000-1"
    bad.write_bytes(b"junk")
    plan = [p for p, _ in catalog.gc_plan(tmp_path, set())]
    assert bad in plan and live not in plan
    catalog.gc_apply(tmp_path, catalog.gc_plan(tmp_path, set()))
    assert live.exists() and not bad.exists()


# -- damaged histories -----------------------------------------------------------

DAMAGED = {
    "not json": b"{nope",
    "empty": b"",
    "not utf-8": b"\xff\xfe\x00{",
    "a list": b"[1, 2]",
    "messages a string": json.dumps({"messages": "hello"}).encode(),
    "message without content": json.dumps({"messages": [{"role": "user"}]}).encode(),
    "system an int": json.dumps({"system": 3, "messages": []}).encode(),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_damaged_history_is_moved_aside_and_the_agent_goes_on(kind, tmp_path, runner, capfd):
    saved_agent(tmp_path, runner, "x", n=30)
    (tmp_path / "x.json").write_bytes(DAMAGED[kind])
    (tmp_path / "y.json").write_text(json.dumps({"name": "y", "system": "hi", "messages": [{"role": "user", "content": "q"}]}))
    listed = {i["name"]: i for i in catalog.listing(tmp_path)}  # one bad file never hides the others
    assert set(listed) == {"x", "y"} and listed["y"]["messages"] == 1 and listed["x"]["tier"] == "warm"

    rt = Runtime(cache_dir=tmp_path, runner=runner, max_tokens=3)
    a = rt.agent("x")
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "history of agent 'x' not used" in err[0] and "x.json" in err[0] and "starting a new conversation" in err[0]
    aside = list(tmp_path.glob("x.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == DAMAGED[kind]  # kept, never deleted
    assert a.messages == []
    r = a.chat("Hello.")
    assert r.stats.tier == "warm"  # the cache was sound: it stays in use
    assert rt.flush() == {}
    assert len(history.load(tmp_path / "x.json")["messages"]) == 2
    rt.close()


# -- structure checked against the model -------------------------------------------

def doubled_heads(tensors, meta):
    for k in [k for k in tensors if k.startswith("layers.")]:
        tensors[k] = np.concatenate([tensors[k], tensors[k]], axis=0)


def nan_scales(tensors, meta):
    tensors["layers.0.k.1"][...] = np.float16("nan")


def wrong_dim(tensors, meta):
    for k in [k for k in tensors if k.startswith("layers.")]:
        tensors[k] = np.concatenate([tensors[k], tensors[k]], axis=-1)  # a consistent Q4 layout of twice the head dim


STRUCTURE = {
    "doubled heads": (doubled_heads, "stores 2 heads"),
    "NaN scales": (nan_scales, "not finite"),
    "twice the head dim": (wrong_dim, "this model stores"),
}


@pytest.mark.parametrize("kind", list(STRUCTURE))
def test_checksum_valid_but_malformed_cache_is_refused_and_moved_aside(kind, tmp_path, runner):
    change, reason = STRUCTURE[kind]
    path = saved_agent(tmp_path, runner)
    rewrite(path, change)
    container.read_tensors(path, codec.FORMATS)  # every checksum is right
    messages = []
    p = quiet_pool(tmp_path, runner, warn=messages.append)
    cache, tier = p.checkout("a")
    assert tier == "cold" and cache.offset == 0
    assert len(messages) == 1 and reason in messages[0] and "re-prefilling" in messages[0]
    assert not path.exists() and len(list(tmp_path.glob("a.safetensors.bad-*"))) == 1


def test_huge_empty_tensor_is_refused(tmp_path, runner):
    path = saved_agent(tmp_path, runner)
    header, meta, body = forge.split(path.read_bytes())
    header["junk"] = {"dtype": "F16", "shape": [1 << 40, 0], "data_offsets": [0, 0]}
    header = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]))
    meta["crc32"] = json.dumps({**json.loads(meta["crc32"]), "junk": 0})
    path.write_bytes(forge.join(header, meta, body))
    with pytest.raises(container.CacheFileError, match=r"shape\[0\] is 1099511627776, outside"):
        codec.load(path, runner.fingerprint, runner.new_cache().layers)


def test_archives_are_checked_completely_at_import(tmp_path, runner):
    saved_agent(tmp_path, runner, "a")
    (tmp_path / "a.json").write_text(json.dumps({"name": "a", "system": None, "messages": [{"role": "user", "content": "hi"}]}))
    archive = catalog.export_archive(tmp_path, "a", tmp_path / "a.archive.safetensors")
    dest = tmp_path / "dest"
    rt = Runtime(cache_dir=dest, runner=runner, max_tokens=2)
    assert rt.import_archive(archive, "good") == "good"

    bad = tmp_path / "bad.archive.safetensors"
    bad.write_bytes(archive.read_bytes())
    rewrite(bad, nan_scales)
    with pytest.raises(container.CacheFileError, match="not finite"):  # without a model: the archive on its own
        catalog.import_archive(dest, bad, "nan")
    bad.write_bytes(archive.read_bytes())
    rewrite(bad, doubled_heads)
    catalog.import_archive(tmp_path / "nomodel", bad, "consistent")  # consistent on its own
    with pytest.raises(ValueError, match="stores 2 heads"):  # not for this model
        rt.import_archive(bad, "heads")
    bad.write_bytes(archive.read_bytes())
    rewrite(bad, lambda t, m: m.update(fingerprint="0" * 32))
    with pytest.raises(ValueError, match="another model"):
        rt.import_archive(bad, "foreign")
    bad.write_bytes(archive.read_bytes())
    rewrite(bad, lambda t, m: m.update(archive=json.dumps({"name": "a", "history": {"messages": "hi"}})))
    with pytest.raises(container.CacheFileError, match="history: 'messages' is not a list"):
        catalog.import_archive(dest, bad, "hist")
    bad.write_bytes(archive.read_bytes())  # written before archives were told apart from cache cards: its entry is "card"
    rewrite(bad, lambda t, m: m.update(card=m.pop("archive")))
    assert rt.import_archive(bad, "older") == "older"
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["good.json", "good.safetensors", "older.json", "older.safetensors"]
    rt.close()


# -- fuzz: histories and archive metadata give a result or a clean refusal ------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["name", "system", "messages", "role", "content", "x"]), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzzed_histories_load_or_are_refused(tmp_path, value, raw):
    path = tmp_path / "f.json"
    path.write_bytes(raw if raw is not None else json.dumps(value).encode())
    try:
        got = history.load(path)
    except history.HistoryError as e:
        assert str(e).startswith("f.json") and "\n" not in str(e)
        return
    assert isinstance(got["messages"], list) and all(isinstance(m["content"], str) for m in got["messages"])
    assert got["system"] is None or isinstance(got["system"], str)


@pytest.fixture(scope="module")
def archive_file(tmp_path_factory, runner):
    d = tmp_path_factory.mktemp("archive")
    saved_agent(d, runner, "c", n=10)
    return catalog.export_archive(d, "c", d / "c.archive.safetensors")


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(about=st.one_of(json_values, st.fixed_dictionaries({"name": st.just("c"), "history": json_values})))
def test_fuzzed_archive_metadata_imports_or_is_refused(tmp_path_factory, archive_file, about):
    path = tmp_path_factory.mktemp("fuzz") / "x.archive.safetensors"
    path.write_bytes(archive_file.read_bytes())
    rewrite(path, lambda t, m: m.update(archive=json.dumps(about)))
    dest = path.parent / "agents"
    try:
        name = catalog.import_archive(dest, path, "imported")
    except (container.CacheFileError, ValueError):
        assert not dest.exists() or not any(p.suffix for p in dest.iterdir() if not p.name.startswith("."))
        return
    assert name == "imported"
    h = history.load(Layout(dest).history_file(name))  # what was written is a valid history
    assert isinstance(h["messages"], list)


def test_agents_show_verifies_the_structure(tmp_path, runner):
    path = saved_agent(tmp_path, runner, "a")
    assert catalog.describe(tmp_path, "a", verify=True)["status"] == "ok"
    rewrite(path, nan_scales)
    info = catalog.describe(tmp_path, "a", verify=True)
    assert info["tier"] == "invalid" and "not finite" in info["error"] and "status" not in info
