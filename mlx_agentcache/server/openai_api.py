"""OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`.

Usage counts are exact per turn: `prompt_tokens` is the rendered prompt,
`prompt_tokens_details.cached_tokens` the part restored from the agent's
cache (hot or from disk), the rest was prefilled now. Streams end with
`data: [DONE]`; with `stream_options.include_usage` a last chunk with empty
`choices` carries the usage.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from . import conversation as conv
from . import grammar as gr
from . import tools as tl
from ..limits import MAX_TOKENS
from .errors import APIError
from .params import boolean, ignored, number, read_json, stops


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(prompt: list[int], run) -> dict:
    s = run.stats
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": s.generated_tokens,
        "total_tokens": len(prompt) + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.restored_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _common(state, request, body: dict, rt, n_prompt_hint: int | None = None) -> dict:
    """Parameters both endpoints share."""
    number(body, "n", 1, 1, 1, integer=True)
    number(body, "top_p", 1.0, 0.0, 1.0)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    seed = number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    return {
        "temperature": number(body, "temperature", None, 0.0, 2.0),
        "seed": None if seed is None else seed % (2**32),
        "stream": boolean(body, "stream"),
        "include_usage": bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options") or {}, dict) else False,
    }


CHAT_FIELDS = {"model", "messages", "tools", "tool_choice", "response_format", "n", "top_p", "logprobs", "top_logprobs", "seed", "temperature",
               "stream", "stream_options", "stop", "max_tokens", "max_completion_tokens", "user", "prompt_cache_key", "metadata"}


def _max_tokens(rt, body: dict, n_prompt: int, default: int) -> tuple[int, int | None]:
    m = number(body, "max_completion_tokens", None, 1, MAX_TOKENS, integer=True)
    if m is None:
        m = number(body, "max_tokens", None, 1, MAX_TOKENS, integer=True)
    return conv.fit_max_tokens(rt, n_prompt, m, default)


def _call(c: dict, index: int | None = None) -> dict:
    out = {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
    return out if index is None else {"index": index, **out}


async def chat_completions(request: Request):
    state = request.app.state.server
    body = await read_json(request, state.config.max_body_bytes)
    rt = state.rt()
    model = state.check_model(body.get("model"))
    messages = conv.openai_messages(body.get("messages"))
    tools = conv.openai_tools(body.get("tools"))
    choice = body.get("tool_choice")
    required = tl.required_tools(tools, choice, "openai")
    if choice == "none":
        tools = []
    grammar = gr.tool_call_grammar(required) if required else gr.response_format_grammar(body.get("response_format"))
    opts = _common(state, request, body, rt)
    stop = stops(body, "stop", 4)
    prompt, rendered, tools_mode = await asyncio.to_thread(conv.render, rt, messages, tools)
    max_tokens, clamped = _max_tokens(rt, body, len(prompt), state.config.default_max_tokens)
    agent, source = state.pick_agent(request, body, rendered)
    state.limit(agent)
    run = await state.start_turn(request, agent, source, prompt, messages=rendered, max_tokens=max_tokens, temperature=opts["temperature"],
                                 seed=opts["seed"], stop=stop, tools=tools_mode == "template", grammar=grammar)
    run.note(tools=tools_mode, max_tokens_clamped=clamped and {"requested": clamped, "granted": max_tokens}, ignored=ignored(body, CHAT_FIELDS))
    rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    def finish_reason(calls) -> str:
        return "tool_calls" if calls else ("length" if run.finish == "length" else "stop")

    def remember(text: str) -> None:
        state.remember_anonymous(agent, rendered + [{"role": "assistant", "content": text}])

    if not opts["stream"]:
        text = await run.collect(request)
        if run.error is not None:
            raise APIError(500, f"the turn failed: {run.error}")
        remember(text)
        calls = []
        if tools_mode:
            text, calls = tl.parse_calls(text)
        message = {"role": "assistant", "content": text if (text or not calls) else None, "refusal": None}
        if calls:
            message["tool_calls"] = [_call(c) for c in calls]
        return JSONResponse(
            {"id": rid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
             "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(calls)}],
             "usage": _usage(prompt, run), "x_agentcache": run.info()},
            headers=run.headers(),
        )

    first = await run.watching(request, run.first())
    if run.error is not None and first is None:
        raise APIError(500, f"the turn failed: {run.error}")

    def chunk(delta: dict, finish=None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        text, calls = first or "", []
        if tools_mode:  # a tool call is known only once the reply is complete
            async for piece in run.rest():
                text += piece
            text, calls = tl.parse_calls(text)
            if text:
                yield chunk({"content": text})
            for i, c in enumerate(calls):
                yield chunk({"tool_calls": [_call(c, i)]})
        else:
            if first:
                yield chunk({"content": first})
            async for piece in run.rest():
                text += piece
                yield chunk({"content": piece})
        if run.error is not None:
            yield _sse({"error": {"message": f"the turn failed: {run.error}", "type": "server_error", "param": None, "code": None}})
            return
        remember(run.text)
        yield chunk({}, finish_reason(calls))
        if opts["include_usage"]:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
                        "choices": [], "usage": _usage(prompt, run), "x_agentcache": run.info()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**run.headers(), "cache-control": "no-cache"})


async def completions(request: Request):
    state = request.app.state.server
    body = await read_json(request, state.config.max_body_bytes)
    rt = state.rt()
    model = state.check_model(body.get("model"))
    prompt_text = body.get("prompt")
    if isinstance(prompt_text, list) and len(prompt_text) == 1 and isinstance(prompt_text[0], str):
        prompt_text = prompt_text[0]
    if not isinstance(prompt_text, str) or not prompt_text:
        raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
    if body.get("suffix"):
        raise APIError(400, "'suffix' is not supported", param="suffix")
    number(body, "best_of", 1, 1, 1, integer=True)
    opts = _common(state, request, body, rt)
    echo = boolean(body, "echo")
    stop = stops(body, "stop", 4)
    prompt = await asyncio.to_thread(rt.encode, prompt_text)
    max_tokens, clamped = _max_tokens(rt, body, len(prompt), 16)
    agent, source = state.pick_agent(request, body, prompt_text)
    state.limit(agent)
    run = await state.start_turn(request, agent, source, prompt, messages=None, max_tokens=max_tokens, temperature=opts["temperature"],
                                 seed=opts["seed"], stop=stop)
    run.note(max_tokens_clamped=clamped and {"requested": clamped, "granted": max_tokens})
    rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

    def finish_reason() -> str:
        return "length" if run.finish == "length" else "stop"

    def body_of(text: str, finish) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    if not opts["stream"]:
        text = await run.collect(request)
        if run.error is not None:
            raise APIError(500, f"the turn failed: {run.error}")
        state.remember_anonymous(agent, prompt_text + text)
        out = body_of((prompt_text if echo else "") + text, finish_reason())
        out.update(usage=_usage(prompt, run), x_agentcache=run.info())
        return JSONResponse(out, headers=run.headers())

    first = await run.watching(request, run.first())
    if run.error is not None and first is None:
        raise APIError(500, f"the turn failed: {run.error}")

    async def events():
        if echo:
            yield _sse(body_of(prompt_text, None))
        if first:
            yield _sse(body_of(first, None))
        async for piece in run.rest():
            yield _sse(body_of(piece, None))
        if run.error is not None:
            yield _sse({"error": {"message": f"the turn failed: {run.error}", "type": "server_error", "param": None, "code": None}})
            return
        state.remember_anonymous(agent, prompt_text + run.text)
        yield _sse(body_of("", finish_reason()))
        if opts["include_usage"]:
            yield _sse({**body_of("", None), "choices": [], "usage": _usage(prompt, run), "x_agentcache": run.info()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**run.headers(), "cache-control": "no-cache"})
