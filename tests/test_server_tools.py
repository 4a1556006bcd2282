"""Tool calls, structured output and the requests Claude Code sends, against a
real `agentcache serve` running SmolLM2-135M, whose chat template knows no
tools (so every tool goes through the generic format of server/tools.py).

Greedy replies of a few dozen tokens; what is checked is that constrained
output always parses and fits its schema, that calls come back in each API's
shape, that earlier calls reach the prompt, and that Claude Code's extra
fields and limits are accepted, clamped or refused with a clear message.
"""

import json

import anthropic
import httpx
import openai
import pytest

from server_process import KEY, serving

MODEL = "smollm2-135m"

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                          "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def server(smollm2_path, model_home, tmp_path_factory):
    with serving(model_home, tmp_path_factory.mktemp("serve-tools")) as s:
        yield s


def fits_person(obj) -> bool:
    return set(obj) == {"name", "age"} and isinstance(obj["name"], str) and len(obj["name"]) <= 20 and type(obj["age"]) is int and 0 <= obj["age"] <= 150


def test_head_root_answers_without_a_key(server):
    assert httpx.head(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_required_tool_call_is_a_valid_call_in_openai_shape(server):
    r = server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                                tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=48)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city"} and isinstance(args["city"], str)
    else:
        assert call.function.name == "get_time" and args in ({"tz": "UTC"}, {"tz": "CET"})
    assert r.x_agentcache["tools"] == "generic"


def test_named_tool_call_streams_as_tool_call_deltas(server):
    stream = server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], tools=[WEATHER, CLOCK],
                                                     tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=48, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        deltas += d.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [d.function.name for d in deltas] == ["get_time"]
    assert json.loads(deltas[0].function.arguments)["tz"] in ("UTC", "CET")


def test_tool_choice_naming_an_absent_tool_is_a_400(server):
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                                                tool_choice={"type": "function", "function": {"name": "launch"}}, max_tokens=8)


def test_unfinished_call_ends_with_length_and_is_never_a_call(server):
    r = server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                                                tool_choice="required", max_tokens=6)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith("<tool_call>")


def test_earlier_calls_and_results_are_rendered_into_the_prompt(server):
    def prompt_tokens(city: str) -> int:
        messages = [{"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                           "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        r = server.openai().chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=1)
        return r.usage.prompt_tokens

    short, long = prompt_tokens("Paris"), prompt_tokens("Paris " * 60)
    assert long - short >= 50  # the call's 60 words of arguments are in the prompt


def test_json_schema_output_parses_and_fits(server):
    for i in range(3):
        r = server.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Invent person number {i}."}], max_tokens=40, temperature=0.9, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        assert fits_person(json.loads(r.choices[0].message.content))


def test_json_object_output_is_an_object(server):
    r = server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "List two colours."}], max_tokens=40,
                                                response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_schema_that_does_not_compile_is_a_400_naming_its_path(server):
    bad = {"type": "object", "properties": {"age": {"type": "integr"}}}
    with pytest.raises(openai.BadRequestError, match="/properties/age"):
        server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})


def test_anthropic_tool_use_and_structured_output(server):
    client = server.anthropic()
    tool = {"name": "get_weather", "description": "Current weather", "input_schema": WEATHER["function"]["parameters"]}
    m = client.messages.create(model=MODEL, max_tokens=48, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[tool],
                               tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"}
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}, timeout=300, json={
        "model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": "Invent a person."}],
        "output_config": {"format": {"type": "json_schema", "schema": PERSON}}})
    assert r.status_code == 200, r.text
    assert fits_person(json.loads(r.json()["content"][0]["text"]))


def test_claude_code_request_shape_is_accepted(server):
    """Claude Code 2.1's first request: a system message inside `messages`,
    max_tokens 32000 (over SmolLM2's 8K context), and newer fields."""
    body = {"model": MODEL, "max_tokens": 32000, "stream": False,
            "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi"}]},
                         {"role": "system", "content": "Available agent types: general-purpose."}],
            "thinking": {"type": "adaptive"}, "context_management": {"edits": []}, "output_config": {"effort": "low"},
            "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})}}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
               "X-Claude-Code-Session-Id": "session-1"}
    r = httpx.post(server.url + "/v1/messages?beta=true", headers=headers, json=body, timeout=300)
    assert r.status_code == 200, r.text
    x = r.json()["x_agentcache"]
    assert x["agent"] == "session-1" and x["agent_source"] == "x-claude-code-session-id"
    assert x["ignored"] == ["context_management", "output_config", "thinking", "?beta", "anthropic-beta"]
    prompt = r.json()["usage"]["cache_creation_input_tokens"] + r.json()["usage"]["cache_read_input_tokens"]
    assert x["max_tokens_clamped"] == {"requested": 32000, "granted": 8192 - prompt}
    assert r.headers["x-agentcache-max-tokens"] == f"{8192 - prompt}; requested=32000"
    history = server.get("/v1/agents/session-1").json()["messages"]
    assert "<system>\nAvailable agent types: general-purpose.\n</system>" in history[0]["content"]


def test_prompt_that_cannot_fit_is_a_400_naming_the_counts(server):
    with pytest.raises(anthropic.BadRequestError, match=r"maximum context length is 8192 tokens; the prompt is \d+ tokens"):
        server.anthropic().messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "word " * 9000}])


def test_compact_tools_are_one_signature_line_each():
    """`serve --compact-tools`: each tool as name(arguments): first sentence."""
    from mlx_agentcache.server import tools as tl

    bash = {"name": "Bash", "description": "Executes a bash command and returns its output.\n\nUsage notes: ...",
            "parameters": {"type": "object", "required": ["command"], "properties": {
                "command": {"type": "string"}, "timeout": {"type": "number"}, "mode": {"enum": ["a", "b"]},
                "paths": {"type": "array", "items": {"type": "string"}}}}}
    text = tl.tools_text([{"type": "function", "function": bash}, {"type": "function", "function": {"name": "TaskList"}}], short=True)
    assert text.splitlines()[-2:] == ['Bash(command: string, timeout?: number, mode?: "a"|"b", paths?: string[]): Executes a bash command and returns its output.',
                                      "TaskList()"]
    assert "Usage notes" not in text and tl.tools_text([{"type": "function", "function": bash}]).count("Usage notes") == 1
