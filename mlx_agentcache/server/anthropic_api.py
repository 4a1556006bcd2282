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
from . import grammar as gr
from . import tools as tl
from ..limits import MAX_TOKENS
from .errors import APIError
from .params import boolean, ignored, number, read_json, stops
from .state import TurnRequest

EARLY_HEADERS = ("x-agentcache-agent", "x-agentcache-max-tokens")  # known before the turn starts
PING_S = 5.0  # seconds between pings while a stream waits for its first token
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}


def _event(kind: str, obj: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n"


def _marks_cache(body: dict) -> bool:
    """Whether the request asks for prompt caching anywhere (a `cache_control` key)."""
    return '"cache_control"' in json.dumps([body.get("system"), body.get("messages"), body.get("tools")])


FIELDS = {"model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k", "stream", "stop_sequences", "metadata", "tools",
          "tool_choice", "output_format"}


async def _parse(state, body: dict):
    rt = state.rt()
    model = state.check_model(body.get("model"))
    messages = conv.anthropic_messages(body.get("system"), body.get("messages"))
    tools = conv.anthropic_tools(body.get("tools"))
    choice = body.get("tool_choice") or {}
    if not isinstance(choice, dict):
        raise APIError(400, "tool_choice: must be an object such as {type: auto}")
    required = tl.required_tools(tools, choice, "anthropic")
    if choice.get("type") == "none":
        tools = []
    prompt, rendered, tools_mode = await asyncio.to_thread(conv.render, rt, messages, tools, state.config.compact_tools)
    return rt, model, rendered, prompt, tools_mode, required


def _grammar(body: dict, required) -> str | None:
    """A required tool call, or structured output: `output_config.format` or the
    older `output_format`, both `{type: json_schema, schema}`."""
    if required:
        return gr.tool_call_grammar(required)
    config = body.get("output_config")
    fmt = body.get("output_format") or (config.get("format") if isinstance(config, dict) else None)
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "output_config.format: must be {type: json_schema, schema: {...}}")
    return gr.json_schema_grammar(fmt["schema"], "output_config.format.schema")


async def count_tokens(request: Request):
    state = request.app.state.server
    body = await read_json(request, state.config.max_body_bytes)
    prompt = (await _parse(state, body))[3]
    return JSONResponse({"input_tokens": len(prompt)})


async def messages(request: Request):
    state = request.app.state.server
    body = await read_json(request, state.config.max_body_bytes)
    rt, model, msgs, prompt, tools_mode, required = await _parse(state, body)
    if "max_tokens" not in body:
        raise APIError(400, "max_tokens: Field required")
    max_tokens, clamped = conv.fit_max_tokens(rt, len(prompt), number(body, "max_tokens", None, 1, MAX_TOKENS, integer=True), 0)
    temperature = number(body, "temperature", None, 0.0, 1.0)
    number(body, "top_p", None, 0.0, 1.0)
    number(body, "top_k", None, 0, 1 << 31, integer=True)
    stream = boolean(body, "stream")
    stop = stops(body, "stop_sequences", 64)
    grammar = _grammar(body, required)
    creation = _marks_cache(body)
    turn = TurnRequest(prompt, msgs, max_tokens, clamped, temperature, stop=stop, tools_mode=tools_mode, grammar=grammar)
    run = await state.begin(request, body, turn, msgs, ignored=ignored(body, FIELDS) + [f"?{k}" for k in request.query_params]
                            + (["anthropic-beta"] if "anthropic-beta" in request.headers else []))
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

    def blocks(text: str) -> tuple[list[dict], str]:
        text, calls = run.split(text)
        out = [{"type": "text", "text": text}] if text or not calls else []
        out += [{"type": "tool_use", "id": "toolu_" + c["id"][5:], "name": c["name"], "input": c["arguments"]} for c in calls]
        return out, ("tool_use" if calls else STOP_REASONS[run.finish])

    if not stream:
        content, reason = blocks(await run.reply(request))
        return JSONResponse(
            {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content, "stop_reason": reason,
             "stop_sequence": run.stop_hit, "usage": usage(), "x_agentcache": run.info()},
            headers=run.headers(),
        )

    def error() -> str:
        return _event("error", {"type": "error", "error": {"type": "api_error", "message": run.failure}})

    async def events():
        # The stream opens at once and pings while the prompt is read: a long
        # prompt on a CPU takes minutes, longer than clients wait for a first byte.
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": usage(final=False)}})
        waiting = asyncio.ensure_future(run.first())
        try:
            while not (await asyncio.wait({waiting}, timeout=PING_S))[0]:
                yield _event("ping", {"type": "ping"})
        finally:
            if not waiting.done():  # the client went away: the turn stops
                waiting.cancel()
                run.cancel()
        first = waiting.result()
        if run.error is not None and first is None:
            yield error()
            return
        if tools_mode:  # tool calls are known only once the reply is complete
            text = "".join([piece async for piece in run.stream(first)])
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
            async for piece in run.stream(first):
                yield _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
            yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            reason = STOP_REASONS[run.finish]
        if run.error is not None:
            yield error()
            return
        yield _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": run.stop_hit},
                                       "usage": usage(), "x_agentcache": run.info()})
        yield _event("message_stop", {"type": "message_stop"})

    return StreamingResponse(events(), media_type="text/event-stream", headers={**{k: v for k, v in run.headers().items() if k in EARLY_HEADERS}, "cache-control": "no-cache"})
