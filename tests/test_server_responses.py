"""`POST /v1/responses` against a real `agentcache serve` running SmolLM2-135M,
through the openai SDK and openai-agents (whose default model path is the
Responses API): plain and streamed replies, `previous_response_id`
continuing the agent's cache, `store: false`, the 404 for an unknown id,
function tools, `text.format` and a handoff between two agents.
"""

import json

import agents
import openai
import pydantic
import pytest

from server_process import KEY, serving

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(smollm2_path, model_home, tmp_path_factory):
    with serving(model_home, tmp_path_factory.mktemp("serve-responses")) as s:
        yield s


def test_plain_response_has_text_and_usage(server):
    r = server.openai().responses.create(model=MODEL, instructions="You are terse.", input="Say hello.", max_output_tokens=6)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.output[0].type == "message"
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    assert r.usage.input_tokens_details.cached_tokens == 0


def test_stream_sends_the_events_the_sdk_parses(server):
    events = list(server.openai().responses.create(model=MODEL, input="Count to three.", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
                     *["response.output_text.delta"] * deltas, "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert deltas >= 1 and final.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.usage.output_tokens == 6


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=150)


def test_stream_helper_parses_a_schema_reply(server):
    with server.openai().responses.stream(model=MODEL, input="Invent a person.", max_output_tokens=40, text_format=Person) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed"
    assert isinstance(final.output_parsed, Person)


def test_previous_response_id_continues_the_agents_cache(server):
    client = server.openai()
    first = client.responses.create(model=MODEL, instructions="You are terse.", input="My name is Ada.", max_output_tokens=8)
    second = client.responses.create(model=MODEL, instructions="You are terse.", input="What is my name?", max_output_tokens=8,
                                     previous_response_id=first.id)
    assert second.x_agentcache["agent"] == first.x_agentcache["agent"]
    assert second.x_agentcache["agent_source"] == "previous_response_id"
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_store_false_keeps_nothing_and_unknown_id_is_a_404(server):
    client = server.openai()
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Again", max_output_tokens=2, previous_response_id=r.id)
    assert e.value.body["code"] == "previous_response_not_found" and r.id in e.value.body["message"]


def test_required_function_tool_returns_a_function_call(server):
    r = server.openai().responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required", max_output_tokens=48)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}


def test_function_call_streams_as_arguments_events(server):
    events = list(server.openai().responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                                   max_output_tokens=48, stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.function_call_arguments.delta", "response.function_call_arguments.done",
                                        "response.output_item.done", "response.completed"]
    (call,) = events[-1].response.output
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}


def test_json_schema_text_format_parses_and_fits(server):
    r = server.openai().responses.create(model=MODEL, input="Invent a person.", max_output_tokens=40,
                                         text={"format": {"type": "json_schema", "name": "person", "schema": Person.model_json_schema(), "strict": True}})
    Person.model_validate_json(r.output_text)


def test_openai_agents_runs_a_function_tool(server):
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "sunny"

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0), use_for_tracing=False)
    agent = agents.Agent(name="forecaster", instructions="Answer with the weather tool.", model=MODEL, tools=[get_weather],
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=48, temperature=0))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert len(calls) == 1 and isinstance(calls[0], str)
    # the call's output went back as a function_call_output item and the model then answered in text
    assert [i.type for i in result.new_items] == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert isinstance(result.final_output, str) and result.final_output


class Forecast(pydantic.BaseModel):
    rain: bool
    summary: str = pydantic.Field(max_length=30)


def test_openai_agents_hands_off_to_a_second_agent_that_answers(server):
    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0), use_for_tracing=False)
    # a short structured answer: the grammar ends the reply, where free text from a 135M model may run to max_tokens
    specialist = agents.Agent(name="specialist", instructions="You answer questions about weather.", model=MODEL, output_type=Forecast,
                              model_settings=agents.ModelSettings(max_tokens=48, temperature=0))
    triage = agents.Agent(name="triage", instructions="Hand weather questions to the specialist.", model=MODEL, handoffs=[specialist],
                          model_settings=agents.ModelSettings(tool_choice="transfer_to_specialist", max_tokens=48, temperature=0))
    result = agents.Runner.run_sync(triage, "Will it rain in Paris?", max_turns=3)
    assert [i.type for i in result.new_items] == ["handoff_call_item", "handoff_output_item", "message_output_item"]
    assert result.last_agent is specialist
    assert isinstance(result.final_output, Forecast)
