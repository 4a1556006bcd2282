"""Anthropic's `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Usage: `cache_read_input_tokens` is the part of the prompt restored from the
agent's cache. Every token prefilled now is written to the agent's cache for
its next turn; when the request marks anything with `cache_control` (as
Claude Code does) those tokens are reported as `cache_creation_input_tokens`,
otherwise as `input_tokens`, so that input + cache creation + cache read is
always the whole prompt, as in Anthropic's own accounting.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from . import conversation as conv
from .errors import APIError
from .params import boolean, number, read_json, stops

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}


def _event(kind: str, obj: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n"


def _marks_cache(body: dict) -> bool:
    """Whether the request asks for prompt caching anywhere (a `cache_control` key)."""
    return '"cache_control"' in json.dumps([body.get("system"), body.get("messages"), body.get("tools")])


async def _parse(state, body: dict):
    rt = state.rt()
    model = state.check_model(body.get("model"))
    messages = conv.anthropic_messages(body.get("system"), body.get("messages"))
    tools = conv.anthropic_tools(body.get("tools"))
    choice = body.get("tool_choice") or {}
    if not isinstance(choice, dict):
        raise APIError(400, "tool_choice: must be an object such as {type: auto}")
    if choice.get("type") == "none":
        tools = []
    prompt, tools_mode = await asyncio.to_thread(conv.render, rt, messages, tools, choice.get("type") in ("any", "tool"))
    return rt, model, messages, prompt, tools_mode


async def count_tokens(request: Request):
    state = request.app.state.server
    body = await read_json(request, state.config.max_body_bytes)
    _, _, _, prompt, _ = await _parse(state, body)
    return JSONResponse({"input_tokens": len(prompt)})


async def messages(request: Request):
    state = request.app.state.server
    body = await read_json(request, state.config.max_body_bytes)
    rt, model, msgs, prompt, tools_mode = await _parse(state, body)
    if "max_tokens" not in body:
        raise APIError(400, "max_tokens: Field required")
    max_tokens = number(body, "max_tokens", None, 1, rt.context_length, integer=True)
    conv.check_length(rt, len(prompt), max_tokens)
    temperature = number(body, "temperature", None, 0.0, 1.0)
    number(body, "top_p", None, 0.0, 1.0)
    number(body, "top_k", None, 0, 1 << 31, integer=True)
    stream = boolean(body, "stream")
    stop = stops(body, "stop_sequences", 64)
    creation = _marks_cache(body)
    agent, source = state.pick_agent(request, body, msgs)
    state.limit(agent)
    run = await state.start_turn(request, agent, source, prompt, msgs, max_tokens, temperature, None, stop, tools=tools_mode == "rendered")
    mid = "msg_" + uuid.uuid4().hex[:24]

    def usage(final: bool = True) -> dict:
        s = run.stats
        fresh = len(prompt) - s.restored_tokens
        return {
            "input_tokens": 0 if creation else fresh,
            "cache_creation_input_tokens": fresh if creation else 0,
            "cache_read_input_tokens": s.restored_tokens,
            "output_tokens": s.generated_tokens if final else 0,
        }

    def info():
        out = run.info()
        if tools_mode:
            out["tools"] = tools_mode
        return out

    def blocks(text: str) -> tuple[list[dict], str]:
        calls = []
        if tools_mode == "rendered":
            text, calls = conv.parse_tool_calls(text)
        out = [{"type": "text", "text": text}] if text or not calls else []
        out += [{"type": "tool_use", "id": "toolu_" + c["id"][5:], "name": c["name"], "input": c["arguments"]} for c in calls]
        return out, ("tool_use" if calls else STOP_REASONS[run.finish])

    def remember(text: str) -> None:
        state.remember_anonymous(agent, msgs + [{"role": "assistant", "content": text}])

    if not stream:
        text = await run.collect(request)
        if run.error is not None:
            raise APIError(500, f"the turn failed: {run.error}")
        remember(text)
        content, reason = blocks(text)
        return JSONResponse(
            {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content, "stop_reason": reason,
             "stop_sequence": run.stop_hit, "usage": usage(), "x_agentcache": info()},
            headers=run.headers(),
        )

    first = await run.watching(request, run.first())
    if run.error is not None and first is None:
        raise APIError(500, f"the turn failed: {run.error}")

    async def events():
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": usage(final=False)}})
        if tools_mode == "rendered":  # tool calls are known only once the reply is complete
            text = first or ""
            async for piece in run.rest():
                text += piece
            content, reason = blocks(text)
            for i, b in enumerate(content):
                if b["type"] == "text":
                    yield _event("content_block_start", {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
                    yield _event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": b["text"]}})
                else:
                    yield _event("content_block_start", {"type": "content_block_start", "index": i, "content_block": {**b, "input": {}}})
                    yield _event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                         "delta": {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}})
                yield _event("content_block_stop", {"type": "content_block_stop", "index": i})
        else:
            yield _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            yield _event("ping", {"type": "ping"})
            if first:
                yield _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": first}})
            async for piece in run.rest():
                yield _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
            yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            reason = STOP_REASONS[run.finish]
        if run.error is not None:
            yield _event("error", {"type": "error", "error": {"type": "api_error", "message": f"the turn failed: {run.error}"}})
            return
        remember(run.text)
        yield _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": run.stop_hit},
                                       "usage": usage(), "x_agentcache": info()})
        yield _event("message_stop", {"type": "message_stop"})

    return StreamingResponse(events(), media_type="text/event-stream", headers={**run.headers(), "cache-control": "no-cache"})
