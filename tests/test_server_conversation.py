"""The server's pure pieces: message conversion for the chat template, tool-call
parsing, identities, rate limits and the restore-overlap measure."""

import pytest

from mlx_agentcache.server import conversation as conv
from mlx_agentcache.server import tools as tl
from mlx_agentcache.server.errors import APIError
from mlx_agentcache.server.metrics import _union_overlap
from mlx_agentcache.server.state import RateLimiter, derived_name


def test_openai_messages_join_text_parts_and_map_developer_to_system():
    out = conv.openai_messages([
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ])
    assert out[0] == {"role": "system", "content": "Be kind."}
    assert out[1] == {"role": "user", "content": "Hello"}
    assert out[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert out[3] == {"role": "tool", "content": "2", "tool_call_id": "c1"}


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]])
def test_openai_messages_refuse_what_cannot_be_rendered(bad):
    with pytest.raises(APIError) as e:
        conv.openai_messages(bad)
    assert e.value.status == 400


def test_anthropic_messages_put_system_first_and_split_tool_results():
    out = conv.anthropic_messages([{"type": "text", "text": "Sys"}], [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]}, {"type": "text", "text": "So?"}]},
    ])
    assert out[0] == {"role": "system", "content": "Sys"}
    assert out[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}} and out[2]["content"] == "Let me look."
    assert out[3] == {"role": "tool", "tool_call_id": "t1", "content": "42"} and out[4] == {"role": "user", "content": "So?"}


def test_tool_calls_are_parsed_out_of_the_reply():
    text, calls = tl.parse_calls('Sure. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>')
    assert text == "Sure." and calls[0]["name"] == "get_time" and calls[0]["arguments"] == {"tz": "UTC"}
    assert tl.parse_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_generic_format_renders_tools_calls_results_and_late_system_messages_as_alternating_text():
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    out = tl.plain_conversation(conv.anthropic_messages("Sys", [
        {"role": "user", "content": "Q"},
        {"role": "system", "content": "Late note."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
    ]), tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Sys\n\n# Tools") and '{"name":"f","description":"d","parameters":{"type":"object"}}' in out[0]["content"]
    assert out[1]["content"] == "Q\n\n<system>\nLate note.\n</system>"
    assert out[2]["content"] == '<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>'
    assert out[3]["content"] == "<tool_response>\n42\n</tool_response>"


def test_tool_choice_names_a_given_tool_or_is_refused():
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    assert tl.required_tools(tools, "auto", "openai") is None
    assert tl.required_tools(tools, "required", "openai") == tools
    assert tl.required_tools(tools, {"type": "tool", "name": "b"}, "anthropic") == tools[1:]
    for choice, api in (({"type": "function", "function": {"name": "c"}}, "openai"), ({"type": "tool", "name": "c"}, "anthropic")):
        with pytest.raises(APIError, match="'c', which is not in tools"):
            tl.required_tools(tools, choice, api)


def test_closed_schemas_take_no_unlisted_keys_unless_they_say_so():
    from mlx_agentcache.server.grammar import closed

    schema = {"type": "object", "properties": {"o": {"type": "object", "properties": {"x": {"const": {"properties": {}}}}},
                                               "free": {"type": "object", "properties": {}, "additionalProperties": True}}}
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["o"]["additionalProperties"] is False
    assert out["properties"]["free"]["additionalProperties"] is True
    assert out["properties"]["o"]["properties"]["x"] == {"const": {"properties": {}}}  # values are not schemas


def test_identities_that_are_not_agent_names_are_hashed():
    assert derived_name("sess-1") == "sess-1"
    long = "user_" + "a" * 80 + "_account__session_x"
    assert derived_name(long).startswith("id-") and derived_name(long) == derived_name(long) != derived_name(long + "y")
    assert derived_name("../x").startswith("id-") and derived_name("a@b").startswith("id-")


def test_rate_limiter_allows_a_burst_then_says_how_long_to_wait():
    lim = RateLimiter(2)
    assert lim.take("a") == 0 and lim.take("a") == 0
    wait = lim.take("a")
    assert 25 < wait <= 30  # 2 a minute: the next in about 30 s
    assert lim.take("b") == 0  # buckets are per key


def test_union_overlap_counts_each_instant_once():
    assert _union_overlap(0, 10, [(1, 3), (2, 4), (8, 20)]) == pytest.approx(5)
    assert _union_overlap(0, 10, []) == 0


def test_admission_queues_turns_that_would_overrun_the_budget():
    """The server parks a turn until the residency ledger admits it; the ledger counts the
    turns in flight and the memory no eviction can free (here: shared prefixes)."""
    import asyncio

    from mlx_agentcache.kvcache import AgentCache, LayerCache
    from mlx_agentcache.ledger import Ledger
    from mlx_agentcache.server.state import Admission

    async def scenario():
        held = [0]
        checked = asyncio.Event()

        def shared() -> int:
            checked.set()
            return held[0]

        ledger = Ledger(100, AgentCache([LayerCache("q4c")]), fingerprint="f", shared=shared)
        gate = Admission()

        async def parked(need: int):
            """A turn that must wait: returned once the ledger has checked it against the budget."""
            checked.clear()
            task = asyncio.ensure_future(gate.acquire(ledger, need))
            await asyncio.wait_for(checked.wait(), 1)
            return task

        first = await gate.acquire(ledger, 60)
        second = await parked(60)  # 60 more would be 120 > 100
        assert first == 60 and not second.done()
        gate.release(ledger, first)
        assert await asyncio.wait_for(second, 1) == 60
        gate.release(ledger, 60)
        held[0] = 50  # memory the pool cannot evict
        third = await gate.acquire(ledger, 40)  # alone: always admitted
        fourth = await parked(10)  # 40 + 10 + 50 fits
        assert await asyncio.wait_for(fourth, 1) == 10
        fifth = await parked(20)  # 50 + 20 + 50 does not
        assert not fifth.done()
        gate.release(ledger, third)
        assert await asyncio.wait_for(fifth, 1) == 20
        gate.release(ledger, 10)
        gate.release(ledger, 20)
        alone = await asyncio.wait_for(gate.acquire(ledger, 500), 1)  # over the budget: admitted alone
        late = await parked(1)
        assert alone == 500 and not late.done()
        gate.release(ledger, alone)
        assert await asyncio.wait_for(late, 1) == 1

    asyncio.run(scenario())
