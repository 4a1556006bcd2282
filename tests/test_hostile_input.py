"""Bad values and hostile workflow files: one clear line, a documented exit code, no traceback.

Value checks (mlx_agentcache.limits) run before any model loads: the CLI cases
point AGENTCACHE_HOME at an empty directory, so a model load would start a
conversion (and print "[agentcache] ..." and create models/); none may happen.
The context check runs on real models: a tiny random Llama whose config says
its context is 64 tokens (byte tokenizer: one token per byte), driven through
the real `agentcache` command, and SmolLM2-135M (8192 tokens) through the API.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_agentcache import limits
from mlx_agentcache import workflow as wfm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_CONTEXT = 64
AGENTCACHE = str(Path(sys.executable).parent / "agentcache")  # the installed command


# -- the validators ----------------------------------------------------------
@pytest.mark.parametrize("value", [1, 256, limits.MAX_TOKENS])
def test_max_tokens_accepts_range(value):
    assert limits.max_tokens(value) == value


@pytest.mark.parametrize("value", [0, -1, -5, limits.MAX_TOKENS + 1, 10**30, 1.5, "12", True, None, float("nan")])
def test_max_tokens_refuses(value):
    with pytest.raises(ValueError, match=r"max_tokens must be an integer between 1 and 131072"):
        limits.max_tokens(value)


@pytest.mark.parametrize("value", [0, 1, 2**32 - 1, 2**32, 2**64 - 1])
def test_seed_accepts_what_mlx_accepts(value):
    import mlx.core as mx

    assert limits.seed(value) == value
    mx.eval(mx.random.key(value))  # MLX takes every seed the check lets through


@pytest.mark.parametrize("value", [-1, 2**64, 10**20, 1e20, 0.5, "1", False])
def test_seed_refuses(value):
    with pytest.raises(ValueError, match=r"seed must be an integer between 0 and 18446744073709551615"):
        limits.seed(value)


@pytest.mark.parametrize("value", [0, 0.0, 1e-4, 0.7, 1, 100])
def test_temperature_accepts(value):
    assert limits.temperature(value) == float(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.1, 1e-30, 100.5, 1e300, "0.7", True])
def test_temperature_refuses(value):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a number between"):
        limits.temperature(value)


def test_smallest_temperature_samples_finite_logits():
    """At MIN_TEMPERATURE the scaled logits of a float32 model stay finite."""
    import mlx.core as mx

    logits = mx.array([-60.0, 0.0, 60.0])
    scaled = logits / limits.MIN_TEMPERATURE
    assert mx.all(mx.isfinite(scaled)).item()
    assert mx.random.categorical(scaled, key=mx.random.key(0)).item() == 2


@pytest.mark.parametrize(
    "text, expected",
    [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("512MB", 512 * 10**6), ("1e9", 10**9), ("1.5k", 1500), (" 3 gi ", 3 << 30), ("1", 1), (None, None), ("", None)],
)
def test_parse_size(text, expected):
    assert limits.parse_size(text) == expected


@pytest.mark.parametrize("text", ["1e999", "-1GiB", "nan", "inf", "0", "0.1", "2XB", "2 GiB GiB", "1e30", "0x10", "1,5G"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="--cache-budget must be"):
        limits.parse_size(text)


@pytest.mark.parametrize("value", [0, -1, float("nan"), -float("inf"), 2**60, True, "1G"])
def test_budget_bytes_refuses(value):
    with pytest.raises(ValueError, match="cache budget must be between 1 byte and 1 PiB"):
        limits.budget_bytes(value)


def test_budget_bytes_accepts():
    assert limits.budget_bytes(None) is None
    assert limits.budget_bytes(math.inf) == math.inf  # the API's "no bound"
    assert limits.budget_bytes(1e9) == 10**9 and isinstance(limits.budget_bytes(1e9), int)


def test_context_length_from_config():
    assert limits.context_length({"max_position_embeddings": 8192}) == 8192
    assert limits.context_length({"text_config": {"max_position_embeddings": 32768}}) == 32768
    assert limits.context_length({"n_positions": 1024}) == 1024
    assert limits.context_length({"max_position_embeddings": None}) is None
    assert limits.context_length({}) is None


def test_check_context_names_the_numbers():
    assert limits.check_context([1] * 10, 54, 64) == [1] * 10
    with pytest.raises(limits.ContextTooLong, match=r"agent 'a': prompt of 10 tokens plus 55 to generate exceeds the model's context of 64 tokens; ask for at most 54"):
        limits.check_context([1] * 10, 55, 64, "a")
    with pytest.raises(limits.ContextTooLong, match="shorten the message, or reset or rewrite"):
        limits.check_context([1] * 64, 1, 64)
    assert limits.check_context([1] * 10**6, 10**6, None)  # no known context: no check


# -- workflow files ----------------------------------------------------------
BASE = "agents:\n  a: {system: hi}\n  b: {system: there}\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("rounds: abc\n", "rounds must be an integer between 1 and 1000, got 'abc'"),
        ("rounds: 1000000000\n", "rounds must be an integer between 1 and 1000, got 1000000000"),
        ("rounds: 0\n", "rounds must be an integer between 1 and 1000, got 0"),
        ("rounds: true\n", "rounds must be an integer between 1 and 1000, got True"),
        ("rounds: 1000\norder: [a, b, a, b, a, b, a, b, a, b, a, b]\n", "rounds x order is 12000 turns; at most 10000"),
        ("max_tokens: abc\n", "max_tokens must be an integer between 1 and 131072, got 'abc'"),
        ("max_tokens: -5\n", "max_tokens must be an integer between 1 and 131072, got -5"),
        ("max_tokens: 0\n", "max_tokens must be an integer between 1 and 131072, got 0"),
        ("max_tokens: 1.5\n", "max_tokens must be an integer between 1 and 131072, got 1.5"),
        ("temperature: .nan\n", "temperature must be 0 (greedy) or a number between"),
        ("temperature: -1\n", "temperature must be 0 (greedy) or a number between"),
        ("vars: [1, 2]\n", "vars must be a mapping of names to strings, got a list"),
        ("vars: {task: [x]}\n", "vars.task must be a string, got a list"),
        ("vars: {task: null}\n", "vars.task must be a string, got None"),
        ("vars: {1x: y}\n", "vars: '1x' is not a variable name"),
        ("vars: {last: y}\n", "vars.last is reserved"),
        ("temprature: 0.7\n", "unknown key 'temprature'; allowed: name, agents, rounds"),
        ("order: [a, c]\n", "order[1]: agent 'c' is not declared under 'agents'"),
        ("order: a\n", "order must be a non-empty list of agent names, got 'a'"),
        ("order: []\n", "order must be a non-empty list of agent names, got a list"),
        ("start: [x]\n", "start must be a string, got a list"),
        ("message: {x: 1}\n", "message must be a string, got a mapping"),
        ("name: [x]\n", "name must be a string, got a list"),
        ("name: ''\n", "name must be one line of 1 to 200 characters"),
        ("script: [{a: hi}]\nrounds: 2\n", "'script' and 'rounds' cannot be used together"),
        ("rounds: 2\nrounds: 3\n", "key 'rounds' appears twice in one mapping"),
    ],
)
def test_workflow_errors_name_the_key(extra, message):
    with pytest.raises(wfm.WorkflowError) as e:
        wfm.loads(BASE + extra)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("agents: {a: {system: hi, temprature: 1}}\n", "unknown key 'temprature' under agents.a; allowed: system"),
        ("agents: {a: {system: [x]}}\n", "agents.a.system must be a string, got a list"),
        ("agents: {'a/../b': {system: hi}}\n", "agents: invalid agent name 'a/../b'"),
        ("agents: {yes: {system: hi}}\n", "agents: agent names must be strings, got True"),
        ("agents: [a, b]\n", "a workflow needs an 'agents' mapping"),
        ("agents: {}\n", "a workflow needs an 'agents' mapping"),
        ("agents: {a: hi}\nscript: []\n", "script must be a non-empty list"),
        ("agents: {a: hi}\nscript: [{a: hi, b: ho}]\n", "script[0] must be one 'agent: message' pair, got a mapping"),
        ("agents: {a: hi}\nscript: [{c: hi}]\n", "script[0]: agent 'c' is not declared"),
        ("agents: {a: hi}\nscript: [{a: 5}]\n", "script[0].a must be a string, got 5"),
        ("[1, 2]\n", "a workflow is a mapping with an 'agents' key, got a list"),
        ("", "a workflow is a mapping with an 'agents' key, got None"),
        ("agents: {a: hi}\nstart: 2024-13-45\n", "not valid YAML"),
        ("agents: {a: hi}\nrounds: !!int " + "9" * 5000 + "\n", "not valid YAML"),
        ("agents: {a: !!python/object:os.system x}\n", "not valid YAML"),
        ("agents: {a: hi\n", "not valid YAML"),
        ("a: &a [*a]\n", "a YAML alias refers to itself"),
        ("agents: " + "[" * 5000 + "]" * 5000 + "\n", "YAML nested deeper than 32 levels"),
    ],
)
def test_workflow_structure_errors(text, message):
    with pytest.raises(wfm.WorkflowError) as e:
        wfm.loads(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def billion_laughs(where: str) -> str:
    levels = ['lol0: &l0 "lol"'] + [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    body = {"system": "agents:\n  a: {system: *l9}\n", "vars": "agents: {a: hi}\nvars: {x: *l9}\n"}[where]
    return "x-bomb:\n" + "".join(f"  {line}\n" for line in levels) + body


@pytest.mark.parametrize("where", ["system", "vars"])
def test_billion_laughs_refused_at_once(where):
    text = billion_laughs(where)
    t0 = time.perf_counter()
    with pytest.raises(wfm.WorkflowError, match="more than 64 YAML aliases"):
        wfm.loads(text)
    assert time.perf_counter() - t0 < 1.0


def test_few_aliases_but_huge_expansion_refused():
    """64 aliases are allowed, but 8 levels of 8 still expand to 8**8 nodes."""
    levels = ['l0: &l0 "x"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 8)}]" for i in range(1, 9)]
    text = "bomb:\n" + "".join(f"  {line}\n" for line in levels) + "agents: {a: hi}\n"
    assert text.count("*") == 64
    with pytest.raises(wfm.WorkflowError, match="expands to more than 100000 values"):
        wfm.loads(text)


def test_var_bomb_refused_before_rendering():
    """A message repeating a large var would render to gigabytes: refused by its computed size."""
    text = f"agents: {{a: hi}}\nvars: {{x: '{'y' * 900_000}'}}\nstart: '{'{x}' * 1000}'\n"
    with pytest.raises(wfm.WorkflowError, match=r"a message would be \d+ characters once its \{fields\} are filled in"):
        wfm.loads(text)
    with pytest.raises(wfm.WorkflowError, match="at most 1000000"):
        wfm.render("{last}{last}", {"last": "z" * 600_000})


def test_a_few_aliases_and_merge_keys_still_work():
    text = (
        "agents:\n  a: &sys {system: 'You are brief. {tone}'}\n  b: *sys\n  c: {<<: *sys}\n"
        "vars: {tone: calm, n: 3}\nrounds: 2\norder: [a, b, c]\nmax_tokens: 40\ntemperature: 0.5\n"
    )
    wf = wfm.loads(text)
    assert wf.agents == {"a": "You are brief. {tone}", "b": "You are brief. {tone}", "c": "You are brief. {tone}"}
    assert (wf.max_tokens, wf.temperature, wf.vars) == (40, 0.5, {"tone": "calm", "n": "3"})
    assert [s.agent for s in wf.steps] == ["a", "b", "c"] * 2


def test_examples_load():
    for path in EXAMPLES.glob("*.yaml"):
        wf = wfm.load(path)
        assert wf.steps and wf.agents


def test_workflow_file_limits(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "start: '" + "x" * wfm.MAX_FILE_BYTES + "'\n")
    with pytest.raises(wfm.WorkflowError, match=r"big.yaml: larger than 1 MiB"):
        wfm.load(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"agents: {a: caf\xe9}\n")
    with pytest.raises(wfm.WorkflowError, match="latin.yaml: not UTF-8 text"):
        wfm.load(latin)
    with pytest.raises(wfm.WorkflowError, match="missing.yaml: cannot read"):
        wfm.load(tmp_path / "missing.yaml")
    long_text = tmp_path / "long.yaml"
    long_text.write_text(BASE + "vars: {x: '" + "x" * (wfm.MAX_TEXT_CHARS + 1) + "'}\n")
    with pytest.raises(wfm.WorkflowError, match=r"long.yaml: larger than 1 MiB|vars.x is 1000001 characters"):
        wfm.load(long_text)


# -- fuzz: any YAML-ish document is a workflow or a clean WorkflowError --------
KEYS = list(wfm.TOP_KEYS) + ["system", "a", "b", "temprature", "<<", "1", "yes"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["a", "b", "{last}", "{x}", "abc", "-5", "0", "1e999", ".nan"]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=6)),
    max_leaves=40,
)
workflowish = st.fixed_dictionaries(
    {"agents": st.one_of(documents, st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.text(max_size=20), st.fixed_dictionaries({"system": documents})), min_size=1, max_size=3))},
    optional={k: documents for k in ("rounds", "order", "start", "message", "script", "vars", "max_tokens", "temperature", "temprature", "name")},
)
TOKENS = ["agents:", " a:", " b:", " {system: x}", "&x ", "*x", "<<: ", "[", "]", "{", "}", ",", "-", " ", "\n", "  ", "'", '"', "!!int ", "!!binary ", "!!str", ":", "?", "|", ">", "#", "%YAML 1.1\n", "---\n", "...\n", "\t", "\x00", "\ufeff", "rounds: ", "1e999", "script:"]


def _accepts_or_refuses_cleanly(text: str) -> None:
    try:
        wf = wfm.loads(text)
    except wfm.WorkflowError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert wf.agents and wf.steps and len(wf.steps) <= wfm.MAX_STEPS
    assert all(s.agent in wf.agents for s in wf.steps)
    assert wf.max_tokens is None or 1 <= wf.max_tokens <= limits.MAX_TOKENS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workflowish)
def test_fuzz_structured_documents(doc):
    _accepts_or_refuses_cleanly(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=6)), max_size=60))
def test_fuzz_yaml_text(parts):
    _accepts_or_refuses_cleanly("".join(parts))


# -- the real command line ---------------------------------------------------
def agentcache(*args: str, home: Path, timeout: float = 300, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, AGENTCACHE_HOME=str(home))
    t0 = time.perf_counter()
    cmd = [AGENTCACHE, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return r, time.perf_counter() - t0


def assert_clean_error(r: subprocess.CompletedProcess, rc: int, *needles: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == rc, out
    assert "Traceback" not in out, out
    for n in needles:
        assert n in r.stderr, out


def assert_no_model_loaded(home: Path, r: subprocess.CompletedProcess) -> None:
    assert "[agentcache]" not in r.stderr, r.stderr  # no conversion or download started
    assert not (home / "models").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["say", "hi", "--seed", "-1"], "seed must be an integer between 0 and 18446744073709551615, got -1"),
        (["say", "hi", "--seed", "99999999999999999999"], "seed must be an integer between 0 and"),
        (["say", "hi", "--seed", "1e20"], "Invalid value for '--seed'"),
        (["say", "hi", "--max-tokens", "-1"], "max_tokens must be an integer between 1 and 131072, got -1"),
        (["say", "hi", "--max-tokens", "0"], "max_tokens must be an integer between 1 and 131072, got 0"),
        (["say", "hi", "--max-tokens", "1000000"], "max_tokens must be an integer between 1 and 131072, got 1000000"),
        (["say", "hi", "--temperature", "nan"], "temperature must be 0 (greedy) or a number between 0.0001 and 100, got nan"),
        (["say", "hi", "--temperature", "inf"], "temperature must be 0 (greedy)"),
        (["say", "hi", "--temperature", "-0.5"], "temperature must be 0 (greedy)"),
        (["chat", "--cache-budget", "1e999"], "--cache-budget must be between 1 byte and 1 PiB, got '1e999'"),
        (["chat", "--cache-budget", "-2GiB"], "--cache-budget must be a size such as 2GiB"),
        (["chat", "--cache-budget", "nan"], "--cache-budget must be a size such as 2GiB"),
        (["chat", "--cache-budget", "0"], "--cache-budget must be between 1 byte and 1 PiB"),
        (["chat", "--temperature", "1e400"], "temperature must be 0 (greedy)"),
        (["say", "hi", "--agent", "../x"], "invalid agent name"),
    ],
)
def test_cli_values_checked_before_model_loads(tmp_path, args, needle):
    r, seconds = agentcache(*args, "--cache-dir", str(tmp_path / "d"), home=tmp_path / "home")
    assert_clean_error(r, 2, needle)
    assert_no_model_loaded(tmp_path / "home", r)
    assert not (tmp_path / "d").exists()  # nothing written either


WORKFLOW_CASES = [
    ("rounds: abc\n", "rounds must be an integer between 1 and 1000, got 'abc'"),
    ("rounds: 1000000000\n", "rounds must be an integer between 1 and 1000"),
    ("max_tokens: abc\n", "max_tokens must be an integer between 1 and 131072, got 'abc'"),
    ("max_tokens: -5\n", "max_tokens must be an integer between 1 and 131072, got -5"),
    ("vars: [1, 2]\n", "vars must be a mapping of names to strings, got a list"),
    ("temprature: 0.7\n", "unknown key 'temprature'"),
    ("BOMB", "more than 64 YAML aliases"),
]


@pytest.mark.parametrize("extra, needle", WORKFLOW_CASES, ids=[c[1][:30] for c in WORKFLOW_CASES])
def test_cli_run_refuses_bad_workflow_before_model_loads(tmp_path, extra, needle):
    f = tmp_path / "wf.yaml"
    f.write_text(billion_laughs("system") if extra == "BOMB" else BASE + extra)
    r, seconds = agentcache("run", str(f), "--cache-dir", str(tmp_path / "d"), home=tmp_path / "home")
    assert_clean_error(r, 2, f"error: {f}: {needle}")
    assert_no_model_loaded(tmp_path / "home", r)
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_run_max_tokens_zero_is_an_error(tmp_path):
    r, _ = agentcache("run", str(EXAMPLES / "debate.yaml"), "--max-tokens", "0", "--cache-dir", str(tmp_path / "d"), home=tmp_path / "home")
    assert_clean_error(r, 2, "max_tokens must be an integer between 1 and 131072, got 0")
    assert_no_model_loaded(tmp_path / "home", r)


def test_cli_import_empty_name_is_an_error(tmp_path):
    card = tmp_path / "x.archive.safetensors"
    card.write_bytes(b"not read")
    r, _ = agentcache("agents", "import", str(card), "--name", "", "--cache-dir", str(tmp_path / "d"), home=tmp_path / "home")
    assert_clean_error(r, 2, "--name must not be empty")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_cli_import_with_model_refuses_another_kv_mode_at_import(tmp_path, model_home):
    """`agents import --model M --kv K` checks the card against that model before writing anything."""
    d, other = tmp_path / "d", tmp_path / "other"
    r, _ = agentcache("say", "--agent", "src", "--cache-dir", str(d), "--max-tokens", "2", "Hello.", home=model_home)
    assert r.returncode == 0, r.stderr
    card = tmp_path / "src.archive.safetensors"
    r, _ = agentcache("agents", "export", "src", "-o", str(card), "--cache-dir", str(d), home=model_home)
    assert r.returncode == 0, r.stderr
    r, _ = agentcache("agents", "import", str(card), "--model", "smollm2-135m", "--kv", "q8", "--cache-dir", str(other), home=model_home)
    assert_clean_error(r, 1, "stored with q4c KV, runtime uses q8")  # a q4c (default) card is not a q8 cache
    assert not other.exists() or not any(other.glob("*.safetensors"))
    r, _ = agentcache("agents", "import", str(card), "--model", "smollm2-135m", "--cache-dir", str(other), home=model_home)
    assert r.returncode == 0 and (other / "src.safetensors").exists(), r.stderr


# -- context length, on real models ------------------------------------------
@pytest.fixture(scope="module")
def tiny_context_model(tmp_path_factory) -> Path:
    """The seeded random Llama 3 folder with its config saying 64 tokens of context."""
    from mlx_agentcache.models import tiny_models

    path = tiny_models.build("llama3-tiny-random", tmp_path_factory.mktemp("models") / "tiny64")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = TINY_CONTEXT
    config["rope_scaling"]["original_max_position_embeddings"] = TINY_CONTEXT // 2
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_cli_say_refuses_prompt_longer_than_context(tmp_path, tiny_context_model):
    d = tmp_path / "d"
    r, _ = agentcache("say", "x" * 200, "--model", str(tiny_context_model), "--cache-dir", str(d), "--max-tokens", "4", home=tmp_path / "home")
    assert_clean_error(r, 2, "exceeds the model's context of 64 tokens", "shorten the message")
    assert not (d / "assistant.json").exists()  # the refused turn is not in the history
    r, _ = agentcache("say", "hi", "--model", str(tiny_context_model), "--cache-dir", str(d), "--max-tokens", "60", home=tmp_path / "home")
    assert_clean_error(r, 2, "plus 60 to generate exceeds the model's context of 64 tokens; ask for at most")
    r, _ = agentcache("say", "hi", "--model", str(tiny_context_model), "--cache-dir", str(d), "--max-tokens", "4", "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generated_tokens"] <= 4
    assert len(json.loads((d / "assistant.json").read_text())["messages"]) == 2


@pytest.mark.slow
def test_cli_say_context_error_on_smollm2_is_one_line(tmp_path, smollm2_path, model_home):
    """A 27K-token prompt on SmolLM2's 8192: one line on stderr (not also the tokenizer's warning)."""
    env = dict(os.environ, AGENTCACHE_HOME=str(model_home))
    text = "The quick brown fox jumps over the lazy dog. " * 2700
    r = subprocess.run([AGENTCACHE, "say", text, "--cache-dir", str(tmp_path / "d")], env=env, capture_output=True, text=True, timeout=600)
    assert_clean_error(r, 2, "agent 'assistant': prompt of 27", "exceeds the model's context of 8192 tokens")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "d" / "assistant.json").exists()


def test_cli_run_refuses_turn_longer_than_context(tmp_path, tiny_context_model):
    f = tmp_path / "wf.yaml"
    f.write_text("agents: {a: {system: s}, b: {system: s}}\nvars: {long: '" + "y" * 100 + "'}\nscript:\n  - a: hi\n  - b: '{long}'\nmax_tokens: 3\n")
    r, _ = agentcache("run", str(f), "--model", str(tiny_context_model), "--cache-dir", str(tmp_path / "d"), home=tmp_path / "home")
    assert_clean_error(r, 2, "agent 'b': prompt of", "exceeds the model's context of 64 tokens")
    assert r.stdout.startswith("a: ")  # the first turn ran; the second was refused before prefill


def test_cli_workflow_limits_and_overrides(tmp_path, tiny_context_model):
    f = tmp_path / "wf.yaml"
    f.write_text("agents: {a: hi, b: there}\norder: [b, a]\nmax_tokens: 2\ntemperature: 0.5\n")
    base = ["--model", str(tiny_context_model), "--cache-dir", str(tmp_path / "d"), "--json"]
    r, _ = agentcache("run", str(f), *base, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    turns = json.loads(r.stdout)["turns"]
    assert [t["agent"] for t in turns] == ["b", "a"] and all(t["generated_tokens"] <= 2 for t in turns)
    r, _ = agentcache("run", str(f), *base, "--max-tokens", "3", "--temperature", "0", "--reset", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    turns = json.loads(r.stdout)["turns"]
    assert any(t["generated_tokens"] == 3 for t in turns) and all(t["generated_tokens"] <= 3 for t in turns)


def test_cli_chat_reports_too_long_and_goes_on(tmp_path, tiny_context_model):
    env = dict(os.environ, AGENTCACHE_HOME=str(tmp_path / "home"))
    r = subprocess.run(
        [AGENTCACHE, "chat", "--model", str(tiny_context_model), "--cache-dir", str(tmp_path / "d"), "--max-tokens", "3"],
        input="@b " + "y" * 100 + "\n@../x hi\n@b hello\n/quit\n", env=env, capture_output=True, text=True, timeout=300,
    )
    assert_clean_error(r, 0, "error: agent 'b': prompt of", "exceeds the model's context of 64 tokens", "error: invalid agent name '../x'")
    assert "\nb: " in r.stdout  # the next line got its reply
    assert len(json.loads((tmp_path / "d" / "b.json").read_text())["messages"]) == 2


def test_api_checks_values_before_loading(tmp_path):
    from mlx_agentcache import Runtime

    for kw, needle in [({"max_tokens": 0}, "max_tokens"), ({"temperature": float("nan")}, "temperature"), ({"seed": -1}, "seed"), ({"budget_bytes": float("nan")}, "cache budget")]:
        with pytest.raises(ValueError, match=needle):
            Runtime(model="no-such-model", cache_dir=tmp_path / "d", home=tmp_path / "home", **kw)
    assert not (tmp_path / "home").exists() and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_api_context_checks_on_smollm2(tmp_path, smollm2_path, model_home):
    """SmolLM2 has 8192 tokens of context: a 27K-token prompt, a history holding a
    ~2M-token message, and bad per-turn options all fail at once, losing nothing."""
    from mlx_agentcache import Runtime

    d = tmp_path / "d"
    with Runtime(cache_dir=d, home=model_home, max_tokens=8) as rt:
        assert limits.context_length(rt.runner.config) == 8192
        per_token = limits.max_token_chars(rt.runner.tokenizer)
        for text in [("\n" + " " * 80) * 500, "\n" * 20000, "a" * 20000, "lorem ipsum " * 3000, "日本語のテキスト" * 2000]:
            least = len(text) // (per_token * limits.CHARS_PER_TOKEN_SLACK)
            assert least <= len(rt.runner.tokenizer.encode(text)) // 2  # the bound never refuses a prompt that fits
        a = rt.agent("a", system="You are brief.")
        first = a.chat("Say hi.")
        rt.flush()  # the history file is written by the runtime's writer thread
        before = json.loads((d / "a.json").read_text())
        for kw, needle in [({"max_tokens": -1}, "max_tokens"), ({"temperature": float("nan")}, "temperature"), ({"seed": 2**64}, "seed")]:
            with pytest.raises(ValueError, match=needle):
                a.chat("again", **kw)
        t0 = time.perf_counter()
        with pytest.raises(limits.ContextTooLong, match=r"agent 'a': prompt of \d{5} tokens plus 8 to generate exceeds the model's context of 8192"):
            a.chat("The quick brown fox jumps over the lazy dog. " * 2700)
        with pytest.raises(limits.ContextTooLong, match=r"prompt of 8\d{3} tokens plus 256 .* ask for at most"):
            a.chat("word " * 8000, max_tokens=256)
        assert time.perf_counter() - t0 < 30
        assert json.loads((d / "a.json").read_text()) == before  # refused turns left no trace
        assert a.chat("Say hi.", max_tokens=8).text  # the agent goes on
        assert first.text

    # a history file with a ~2M-token message, as a hand edit or a foreign card would leave
    huge = {"name": "h", "system": None, "messages": [{"role": "user", "content": "lorem ipsum dolor " * 700_000}, {"role": "assistant", "content": "ok"}]}
    (d / "h.json").write_text(json.dumps(huge))
    with Runtime(cache_dir=d, home=model_home, max_tokens=8) as rt:
        t0 = time.perf_counter()
        with pytest.raises(limits.ContextTooLong, match=r"agent 'h': prompt of at least \d{5,} tokens \(12600007 characters\) exceeds the model's context of 8192 tokens; .* reset or rewrite"):
            rt.agent("h").chat("hello")
        assert time.perf_counter() - t0 < 5  # refused from its length, not tokenized for half a minute
        assert not (d / "h.safetensors").exists()
