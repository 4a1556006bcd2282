"""`agentcache serve` driven by the official `openai` and `anthropic` SDKs.

Every test talks over loopback to a real server process running the real
SmolLM2-135M model (converted once under $AGENTCACHE_TEST_HOME or
$AGENTCACHE_HOME). Replies are greedy and short (max_tokens 8) so the
module stays fast; what is checked is the plumbing: which agent a request
reaches, exact cached-token counts, tiers, archives, errors, cancellation.
"""

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)

import json
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import forge
from server_process import KEY, REQUEST_TIMEOUT_S, Server

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def home(smollm2_path, model_home) -> Path:
    return model_home  # smollm2_path converts the model once, before any server starts


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    s = Server(home, d / "cache", d / "server.log").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tight(home, tmp_path_factory):
    """A server whose cache budget holds nothing: every agent goes to disk after
    its turn. Also a small body limit and a per-agent rate limit."""
    d = tmp_path_factory.mktemp("serve-tight")
    s = Server(home, d / "cache", d / "server.log", "--cache-budget", "1", "--max-body", "64KiB", "--agent-rate-limit", "3").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path))


def rendered(tokenizer, messages: list[dict]) -> int:
    """Tokens of a conversation as the cache holds it after a turn (no generation prompt)."""
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=False))


def chat(client, agent: str | None, messages: list[dict], **kw):
    """One non-streaming chat turn: (reply text, usage, x_agentcache, headers)."""
    headers = {"X-Agent-Id": agent} if agent else {}
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=8, extra_headers=headers, **kw)
    r = raw.parse()
    return r.choices[0].message.content, r.usage, r.model_extra["x_agentcache"], raw.headers


def count_tokens(server, messages: list[dict], system: str | None = None) -> int:
    kw = {"system": system} if system else {}
    return server.anthropic().messages.count_tokens(model=MODEL, messages=messages, **kw).input_tokens


# -- service ---------------------------------------------------------------------
def test_health_answers_503_while_loading_then_200_without_key(server):
    assert server.health_seen[0] == 503 and server.health_seen[-1] == 200  # the socket is up before the model
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL, "unsaved_count": 0}  # names: key holders only
    assert httpx.get(server.url + "/health", headers={"x-api-key": KEY}).json() == {"status": "ok", "model": MODEL, "unsaved": [], "unsaved_count": 0}


def test_models_in_both_shapes(server):
    assert [m.id for m in server.openai().models.list()] == [MODEL]
    r = server.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert r.json()["data"][0]["type"] == "model" and r.json()["data"][0]["id"] == MODEL


# -- OpenAI ---------------------------------------------------------------------------
def test_chat_then_continuation_reports_exact_cached_tokens(server, tokenizer):
    client = server.openai()
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    text, usage, info, headers = chat(client, "oa-1", msgs)
    assert text and 1 <= usage.completion_tokens <= 8  # max_tokens 8, or the model's end of turn
    assert usage.prompt_tokens == count_tokens(server, msgs[1:], system=msgs[0]["content"])
    assert usage.prompt_tokens_details.cached_tokens == 0 and info["tier"] == "cold" and info["agent"] == "oa-1"
    assert headers["x-agentcache-tier"] == "cold" and headers["x-agentcache-agent"] == "oa-1"

    history = msgs + [{"role": "assistant", "content": text}]
    msgs2 = history + [{"role": "user", "content": "Another one."}]
    text2, usage2, info2, headers2 = chat(client, "oa-1", msgs2)
    # the first prompt and the reply the model fed back come from the cache (every reply token
    # when it ended on its own end-of-turn token); the template's closing marker and the new turn
    # are prefilled
    cached = usage2.prompt_tokens_details.cached_tokens
    assert usage.prompt_tokens <= cached <= usage.prompt_tokens + usage.completion_tokens < rendered(tokenizer, history)
    assert cached == info2["cached_tokens"] and usage2.prompt_tokens == cached + info2["prefilled_tokens"]
    assert info2["tier"] == "hot" and headers2["x-agentcache-cached-tokens"] == str(cached)


def test_streaming_equals_non_streaming_and_ends_with_usage_and_done(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Count to five."}]
    text, usage, _, _ = chat(client, "oa-plain", msgs)
    pieces, last = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}, extra_headers={"X-Agent-Id": "oa-stream"}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        last = chunk
    assert "".join(pieces) == text  # greedy: same reply either way
    assert last.usage.prompt_tokens == usage.prompt_tokens and last.usage.completion_tokens == 8
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": msgs, "max_tokens": 4, "stream": True}, timeout=REQUEST_TIMEOUT_S) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_cut_the_reply_in_both_modes_and_in_the_history(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Describe the sea in one sentence."}]
    full, *_ = chat(client, "stop-ref", msgs)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]  # cut before the third word
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, stop=[stop], extra_headers={"X-Agent-Id": "stop-1"})
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, stop=[stop], stream=True, extra_headers={"X-Agent-Id": "stop-2"}) if c.choices)
    assert streamed == cut
    assert server.get("/v1/agents/stop-1").json()["messages"][-1] == {"role": "assistant", "content": cut}


def test_completions_endpoint_continues_raw_text(server):
    client = server.openai()
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, extra_headers={"X-Agent-Id": "raw-1"})
    assert r.choices[0].text and r.usage.completion_tokens == 4 and r.usage.prompt_tokens_details.cached_tokens == 0
    prompt2 = "The capital of France is" + r.choices[0].text + " and"
    r2 = client.completions.create(model=MODEL, prompt=prompt2, max_tokens=4, extra_headers={"X-Agent-Id": "raw-1"})
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                                                            stream=True, extra_headers={"X-Agent-Id": "raw-2"}) if c.choices)
    assert streamed == r.choices[0].text


def test_two_agents_alternating_keep_their_own_histories(server):
    client = server.openai()
    convs = {"alt-a": [{"role": "system", "content": "Your codeword is PELICAN."}],
             "alt-b": [{"role": "system", "content": "Your codeword is WALRUS."}]}
    cached = {name: [] for name in convs}
    for turn in range(2):
        for name, msgs in convs.items():
            msgs.append({"role": "user", "content": f"Turn {turn}: say something."})
            text, usage, info, _ = chat(client, name, msgs)
            msgs.append({"role": "assistant", "content": text})
            cached[name].append(usage.prompt_tokens_details.cached_tokens)
            assert info["agent"] == name
    for name, msgs in convs.items():
        assert cached[name][0] == 0 and cached[name][1] > 0
        stored = server.get(f"/v1/agents/{name}").json()
        assert stored["system"] == msgs[0]["content"] and stored["messages"] == msgs[1:]
    assert "WALRUS" not in json.dumps(server.get("/v1/agents/alt-a").json())


def test_concurrent_clients_each_reach_only_their_own_agent(server):
    from concurrent.futures import ThreadPoolExecutor

    client = server.openai()

    def converse(i: int) -> list[dict]:
        msgs = [{"role": "system", "content": f"Your codeword is CW{i}X{i * 37}."}]
        for turn in range(2):
            msgs.append({"role": "user", "content": f"Turn {turn}, say anything."})
            text, usage, info, _ = chat(client, f"par-{i}", msgs)
            assert info["agent"] == f"par-{i}" and (turn == 0 or usage.prompt_tokens_details.cached_tokens > 0)
            msgs.append({"role": "assistant", "content": text})
        return msgs

    with ThreadPoolExecutor(4) as ex:
        convs = list(ex.map(converse, range(4)))
    for i, msgs in enumerate(convs):
        stored = server.get(f"/v1/agents/par-{i}").json()
        assert stored["system"] == msgs[0]["content"] and stored["messages"] == msgs[1:]


def test_identity_from_body_fields_and_session_headers(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Hi."}]
    _, _, info, _ = chat(client, None, msgs, extra_body={"prompt_cache_key": "pck-1"}, user="user-1")
    assert info["agent"] == "pck-1" and info["agent_source"] == "prompt_cache_key"
    _, _, info, _ = chat(client, None, msgs, user="alice@example.com")
    assert info["agent_source"] == "user" and info["agent"].startswith("id-")  # not a valid name: hashed
    r = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=2, extra_headers={"X-Session-Id": "sess-9"})
    assert r.headers["x-agentcache-agent"] == "sess-9"


def test_anonymous_requests_continue_the_conversation_they_extend(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Tell me about owls."}]
    text, usage, info, _ = chat(client, None, msgs)
    assert info["agent_source"] == "anonymous" and info["agent"].startswith("anon-")
    msgs2 = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
    _, usage2, info2, _ = chat(client, None, msgs2)
    assert info2["agent"] == info["agent"] and usage2.prompt_tokens_details.cached_tokens > usage.prompt_tokens
    _, _, info3, _ = chat(client, None, [{"role": "user", "content": "Something else entirely."}])
    assert info3["agent"] != info["agent"]  # a conversation that does not extend it gets its own agent


# -- Anthropic ---------------------------------------------------------------------------
def test_anthropic_messages_usage_and_stream(server, tokenizer):
    client = server.anthropic()
    msgs = [{"role": "user", "content": "Name a fruit."}]
    m = client.messages.create(model=MODEL, max_tokens=8, system="Be brief.", messages=msgs, metadata={"user_id": "an-1"})
    assert m.content[0].type == "text" and m.content[0].text and m.stop_reason == "max_tokens"
    total = count_tokens(server, msgs, system="Be brief.")
    assert m.usage.input_tokens == total and m.usage.cache_read_input_tokens == 0 and m.usage.output_tokens == 8
    assert m.model_extra["x_agentcache"]["agent"] == "an-1"

    msgs2 = msgs + [{"role": "assistant", "content": m.content[0].text}, {"role": "user", "content": "Another."}]
    with client.messages.stream(model=MODEL, max_tokens=8, system="Be brief.", messages=msgs2, metadata={"user_id": "an-1"}) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    u = final.usage
    assert total <= u.cache_read_input_tokens <= total + 8 - 1 < rendered(tokenizer, [{"role": "system", "content": "Be brief."}] + msgs2[:2])
    assert u.input_tokens + u.cache_read_input_tokens == count_tokens(server, msgs2, system="Be brief.")
    # with cache_control marks, the tokens written to the cache are reported as cache creation
    m3 = client.messages.create(model=MODEL, max_tokens=4, messages=msgs,
                                system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}], extra_headers={"X-Agent-Id": "an-2"})
    assert m3.usage.input_tokens == 0 and m3.usage.cache_creation_input_tokens == total


def test_anthropic_errors_have_anthropic_shape(server):
    client = server.anthropic()
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nonexistent", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        server.anthropic(key="wrong").messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])


# -- security and bad input ---------------------------------------------------------
def test_every_route_but_health_needs_the_key(server):
    for path in ("/v1/models", "/v1/agents", "/metrics", "/v1/agents/oa-1", "/v1/agents/oa-1/archive", "/v1/agents/oa-1/card"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
    with pytest.raises(openai.AuthenticationError):
        server.openai(key="wrong").models.list()
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Hi."}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=8)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "../etc/passwd", msgs)
    assert e.value.body["code"] == "invalid_agent_id"
    for bad in (0, -3, 10**9):
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}], max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=7)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=8)
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY}, content=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert chat(client, "still-up", msgs)[0]


def test_n_choices_come_from_one_prefill_and_choice_0_joins_the_history(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Tell me a fact about cats."}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=8, n=3, temperature=1.0, seed=5,
                                                           logprobs=True, extra_headers={"X-Agent-Id": "many"})
    r = raw.parse()
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # three seeds, three samples
    info = r.model_extra["x_agentcache"]
    assert info["prefilled_tokens"] == r.usage.prompt_tokens  # the prompt was read once, not three times
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    stored = server.get("/v1/agents/many").json()["messages"]
    assert stored == msgs + [{"role": "assistant", "content": r.choices[0].message.content}]

    # streamed, the same choices (same seeds, another agent), one after the other, each with its finish
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, n=3, temperature=1.0, seed=5, stream=True,
                                            extra_headers={"X-Agent-Id": "many-streamed"})
    texts, finishes = ["", "", ""], {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == [c.message.content for c in r.choices]
    assert finishes == {c.index: c.finish_reason for c in r.choices}


def test_logprobs_rank_the_greedy_token_first_streamed_or_not(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Name three colors."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3, extra_headers={"X-Agent-Id": "lp"})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    assert "".join(t.token for t in content).strip() == r.choices[0].message.content.strip()
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3, stream=True,
                                            extra_headers={"X-Agent-Id": "lp-streamed"})
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, extra_headers={"X-Agent-Id": "lp-none"})
    assert plain.choices[0].logprobs is None


def test_bad_sampling_and_tool_requests_leave_the_agents_history_and_cache(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Name a color."}]
    text, usage, _, _ = chat(client, "kept", msgs)
    before = server.get("/v1/agents/kept").json()
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    follow = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "Another."}]
    for kw, match in (({"n": 9}, "between 1 and 8"), ({"top_logprobs": 2}, "needs 'logprobs'"), ({"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
                      ({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "not in tools")):
        with pytest.raises(openai.BadRequestError, match=match):
            chat(client, "kept", follow, **kw)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Again", max_output_tokens=2, previous_response_id="resp_unknown",
                                extra_headers={"X-Agent-Id": "kept"})
    for kw in ({"n": 2}, {"logprobs": 0}):  # text completions take neither
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_headers={"X-Agent-Id": "kept"}, **kw)
    after = server.get("/v1/agents/kept").json()
    assert before["tokens"] > 0 and (after["messages"], after["tokens"]) == (before["messages"], before["tokens"])
    _, usage2, _, _ = chat(client, "kept", follow)
    assert usage2.prompt_tokens_details.cached_tokens >= usage.prompt_tokens


def test_oversize_body_is_refused_with_413(tight):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    r = httpx.post(tight.url + "/v1/chat/completions", headers={"x-api-key": KEY}, content=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

    def chunked():  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(tight.url + "/v1/messages", headers={"x-api-key": KEY}, content=chunked())
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert httpx.get(tight.url + "/health").status_code == 200


def test_per_agent_rate_limit_answers_429_with_retry_after(tight):
    client = tight.openai()
    msgs = [{"role": "user", "content": "Hi."}]
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, extra_headers={"X-Agent-Id": "limited"})
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, extra_headers={"X-Agent-Id": "limited"})
    assert int(e.value.response.headers["retry-after"]) >= 1
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, extra_headers={"X-Agent-Id": "not-limited"})


# -- caches ----------------------------------------------------------------------------
def test_full_pool_goes_to_disk_and_answers_warm(tight):
    client = tight.openai()
    convs = {n: [{"role": "user", "content": f"I am {n}. Say hello."}] for n in ("pool-a", "pool-b")}
    for name, msgs in convs.items():
        text, *_ = chat(client, name, msgs)
        msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again."}]
    for name, msgs in convs.items():
        _, usage, info, headers = chat(client, name, msgs)
        assert info["tier"] == "warm" and usage.prompt_tokens_details.cached_tokens > 0
        assert info["bytes_read"] > 0 and int(headers["x-agentcache-bytes-read"]) == info["bytes_read"]
    assert tight.metric("agentcache_hot_bytes") <= tight.metric("agentcache_budget_bytes")
    assert tight.metric("agentcache_bytes_restored_total") > 0


def test_agent_endpoints_list_evict_prefetch_delete(server):
    client = server.openai()
    msgs = [{"role": "user", "content": "Remember: blue."}]
    text, *_ = chat(client, "ops-1", msgs)
    listed = {a["name"]: a for a in server.get("/v1/agents").json()["data"]}
    assert listed["ops-1"]["tier"] == "hot" and listed["ops-1"]["tokens"] > 0 and listed["ops-1"]["bytes"] > 0
    post = lambda path: httpx.post(server.url + path, headers={"x-api-key": KEY}, timeout=REQUEST_TIMEOUT_S)  # noqa: E731
    r = post("/v1/agents/ops-1/evict")
    assert r.status_code == 200 and r.json() == {"name": "ops-1", "evicted": True, "tier": "warm"}
    assert post("/v1/agents/ops-1/prefetch").json()["prefetching"] is True
    _, usage, info, _ = chat(client, "ops-1", msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "Which color?"}])
    assert info["tier"] == "warm" and info["prefetched"] is True and usage.prompt_tokens_details.cached_tokens > 0
    r = post("/v1/agents/ops-1/pin")
    assert r.status_code == 200 and r.json() == {"name": "ops-1", "pinned": True, "tier": "hot"}
    assert server.get("/v1/agents/ops-1").json()["pinned"] is True
    assert {a["name"]: a["pinned"] for a in server.get("/v1/agents").json()["data"]}["ops-1"] is True
    r = post("/v1/agents/ops-1/evict")
    assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]
    assert post("/v1/agents/ops-1/unpin").json() == {"name": "ops-1", "pinned": False, "was_pinned": True, "tier": "hot"}
    assert server.get("/v1/agents/ops-1").json()["pinned"] is False
    r = httpx.delete(server.url + "/v1/agents/ops-1", headers={"x-api-key": KEY})
    assert r.status_code == 200 and server.get("/v1/agents/ops-1").status_code == 404
    assert post("/v1/agents/no-such-agent/evict").status_code == 404
    assert post("/v1/agents/bad..name/evict").status_code == 400


def same_archive(a: bytes, b: bytes) -> bool:
    """Two safetensors archives hold the same tensors and metadata, apart from when they were
    written (the time, and the checksum and header length that follow from it)."""
    def parts(raw: bytes):
        header, meta, body = forge.split(raw)
        about = json.loads(meta.pop("archive"))
        about.pop("exported_at")
        for volatile in ("saved_at", "meta_crc32"):
            meta.pop(volatile)
        return header, meta, about, body
    return parts(a) == parts(b)


def test_archive_exported_from_one_agent_imported_as_another(server):
    client = server.openai()
    msgs = [{"role": "system", "content": "You know the secret number 7341."}, {"role": "user", "content": "Acknowledge."}]
    text, usage, _, _ = chat(client, "arc-src", msgs)
    r = server.get("/v1/agents/arc-src/archive")
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('filename="arc-src.archive.safetensors"')
    archive = r.content
    put = lambda name, data, route="archive": httpx.put(f"{server.url}/v1/agents/{name}/{route}", headers={"x-api-key": KEY},  # noqa: E731
                                                        content=data, timeout=REQUEST_TIMEOUT_S)
    r = put("arc-dst", archive)
    assert r.status_code == 201 and r.json()["name"] == "arc-dst" and r.json()["tier"] == "warm"
    assert put("arc-dst", archive).status_code == 409  # never overwrites an agent
    bad = put("arc-bad", archive[: len(archive) // 2])
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_archive" and "archive refused" in bad.json()["error"]["message"]
    assert server.get("/v1/agents/arc-bad").status_code == 404  # nothing installed
    follow = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "What is the number?"}]
    _, usage2, info2, _ = chat(client, "arc-dst", follow)
    assert info2["tier"] == "warm" and usage2.prompt_tokens_details.cached_tokens >= usage.prompt_tokens
    assert server.get("/v1/agents/arc-dst").json()["messages"][0]["content"] == "Acknowledge."
    # `/card`, the route's former name, is an alias of `/archive`
    old = server.get("/v1/agents/arc-src/card")
    assert old.status_code == 200 and same_archive(old.content, archive)
    assert put("arc-old", old.content, route="card").status_code == 201


def test_client_disconnect_cancels_the_turn(server):
    before = server.metric("agentcache_turns_cancelled_total")
    body = {"model": MODEL, "max_tokens": 3000, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to fly, in many chapters."}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S,
                      headers={"x-api-key": KEY, "X-Agent-Id": "gone-1"}) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first real piece of text: hang up
    deadline = time.time() + 120
    while time.time() < deadline and server.metric("agentcache_turns_cancelled_total") == before:
        time.sleep(0.2)
    assert server.metric("agentcache_turns_cancelled_total") == before + 1
    stored = server.get("/v1/agents/gone-1").json()
    assert stored["busy"] is False and stored["tokens"] < 1000  # stopped long before 3000 tokens
    assert chat(server.openai(), "gone-1", body["messages"])[0]  # the agent still answers


def test_client_that_gives_up_on_a_non_streaming_request_cancels_it(server):
    before = server.metric("agentcache_turns_cancelled_total")
    body = {"model": MODEL, "max_tokens": 3000, "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY, "X-Agent-Id": "gone-2"}, timeout=2)
    deadline = time.time() + 120
    while time.time() < deadline and server.metric("agentcache_turns_cancelled_total") == before:
        time.sleep(0.2)
    assert server.metric("agentcache_turns_cancelled_total") == before + 1
    assert server.get("/v1/agents/gone-2").json()["busy"] is False


def test_restart_keeps_the_cache(home, tmp_path):
    s = Server(home, tmp_path / "cache", tmp_path / "server.log").start()
    msgs = [{"role": "user", "content": "Let us plan a picnic."}]
    try:
        text, usage, _, _ = chat(s.openai(), "restart-1", msgs)
    finally:
        s.stop()
    s.start()
    try:
        follow = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "What food?"}]
        _, usage2, info2, headers = chat(s.openai(), "restart-1", follow)
    finally:
        s.stop()
    assert info2["tier"] == "warm" and usage2.prompt_tokens_details.cached_tokens >= usage.prompt_tokens
    assert info2["bytes_read"] > 0 and float(headers["x-agentcache-restore-ms"]) > 0
