"""Agent frameworks against a real `agentcache serve` running SmolLM2-135M:
LangChain (`bind_tools`, `with_structured_output`), pydantic-ai
(`output_type`) and the `llm` CLI (`--schema`, `-T`), each as a new user
would point it at the server."""

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

from server_process import KEY, serving

MODEL = "smollm2-135m"


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=150)


@pytest.fixture(scope="module")
def server(smollm2_path, model_home, tmp_path_factory):
    with serving(model_home, tmp_path_factory.mktemp("serve-frameworks")) as s:
        yield s


def chat(server) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model=MODEL, max_tokens=48, temperature=0, max_retries=0)


def test_langchain_bind_tools_returns_a_call(server):
    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    msg = chat(server).bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}


def test_langchain_with_structured_output_fits_the_schema(server):
    person = chat(server).with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)


def test_pydantic_ai_output_type(server):
    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.url + "/v1", api_key=KEY))
    agent = Agent(model, output_type=Person, model_settings=ModelSettings(max_tokens=48, temperature=0))
    assert isinstance(agent.run_sync("Invent a person.").output, Person)


def llm(server, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The `llm` CLI with the server as its model `agentcache`, configured as README's recipe does."""
    (folder / "extra-openai-models.yaml").write_text(
        f"- model_id: agentcache\n  model_name: {MODEL}\n  api_base: {server.url}/v1\n  api_key_name: agentcache\n"
        "  supports_schema: true\n  supports_tools: true\n")
    env = {"LLM_USER_PATH": str(folder), "PATH": "/usr/bin:/bin"}
    for cmd in (["keys", "set", "agentcache", "--value", KEY], ["-m", "agentcache", "--no-log", *args]):
        out = subprocess.run([sys.executable, "-m", "llm", *cmd], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    return out


def test_llm_schema(server, tmp_path):
    out = llm(server, tmp_path, "--schema", json.dumps(Person.model_json_schema()), "-o", "max_tokens", "48", "Invent a person.")
    Person.model_validate_json(out.stdout)


def test_llm_tool_is_called_and_its_result_answered(server, tmp_path):
    # llm sends no tool_choice: the prompt asks the 135M model to write the call, which the server reads back
    out = llm(server, tmp_path, "-T", "llm_time", "--td", "-o", "max_tokens", "40",
              'Repeat after me: <tool_call>{"name": "llm_time", "arguments": {}}</tool_call>')
    assert "Tool call: llm_time({})" in out.stderr and '"utc_time"' in out.stderr  # llm ran the tool the server returned
    assert out.stdout.strip()  # and the model answered the request that carried the result
