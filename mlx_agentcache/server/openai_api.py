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
from ..limits import MAX_CHOICES, MAX_TOKENS, MAX_TOP_LOGPROBS
from .errors import APIError
from .params import boolean, ignored, number, read_json, stops
from .state import TurnRequest


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error(run) -> str:
    """A stream's last event when the turn failed after its first token."""
    return _sse({"error": {"message": run.failure, "type": "server_error", "param": None, "code": None}})


def _usage(prompt: list[int], run) -> dict:
    generated = sum(r.stats.generated_tokens for r in run.choices)  # every choice's tokens, as OpenAI counts them
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": generated,
        "total_tokens": len(prompt) + generated,
        "prompt_tokens_details": {"cached_tokens": run.stats.restored_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _common(state, request, body: dict, rt, n_prompt_hint: int | None = None) -> dict:
    """Parameters both endpoints share."""
    number(body, "top_p", 1.0, 0.0, 1.0)
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
    """(granted, requested when more than fits) from max_completion_tokens or max_tokens."""
    m = number(body, "max_completion_tokens", None, 1, MAX_TOKENS, integer=True)
    if m is None:
        m = number(body, "max_tokens", None, 1, MAX_TOKENS, integer=True)
    return conv.fit_max_tokens(rt, n_prompt, m, default)


def _sampling(body: dict) -> tuple[int, int | None]:
    """(n, top_logprobs or None): choices sampled from the one prompt, and the
    alternatives reported per token when `logprobs` is true."""
    n = number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    top = number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if not boolean(body, "logprobs"):
        if top is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return n, None
    return n, top or 0


def _logprobs(tokenizer, items) -> list[dict]:
    """OpenAI's `logprobs.content` entries from the scheduler's (token, logprob, top) records."""
    def one(t: int, lp: float) -> dict:
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]} for t, lp, top in items]


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
    n, top_logprobs = _sampling(body)
    stop = stops(body, "stop", 4)
    prompt, rendered, tools_mode = await asyncio.to_thread(conv.render, rt, messages, tools, state.config.compact_tools)
    max_tokens, clamped = _max_tokens(rt, body, len(prompt), state.config.default_max_tokens)
    turn = TurnRequest(prompt, rendered, max_tokens, clamped, opts["temperature"], opts["seed"], stop, tools_mode, grammar, n, top_logprobs)
    run = await state.begin(request, body, turn, rendered, ignored=ignored(body, CHAT_FIELDS))
    rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    tokenizer = rt.runner.tokenizer

    def finish_reason(r, calls) -> str:
        return "tool_calls" if calls else ("length" if r.finish == "length" else "stop")

    def logprobs(r, start: int = 0) -> dict | None:
        """The choice's token log-probabilities from token `start` on (None unless asked for)."""
        return None if top_logprobs is None else {"content": _logprobs(tokenizer, r.handle.logprobs[start:]), "refusal": None}

    if not opts["stream"]:
        texts = await asyncio.gather(*(r.collect(request) for r in run.choices))
        failed = next((r for r in run.choices if r.error is not None), None)
        if failed is not None:
            raise APIError(500, failed.failure)
        out = []
        for i, (r, text) in enumerate(zip(run.choices, texts)):
            text, calls = run.split(text)
            message = {"role": "assistant", "content": text if (text or not calls) else None, "refusal": None}
            if calls:
                message["tool_calls"] = [_call(c) for c in calls]
            out.append({"index": i, "message": message, "logprobs": logprobs(r), "finish_reason": finish_reason(r, calls)})
        return JSONResponse(
            {"id": rid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
             "choices": out, "usage": _usage(prompt, run), "x_agentcache": run.info()},
            headers=run.headers(),
        )

    first = await run.opening(request)

    def chunk(i: int, delta: dict, finish=None, lp=None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
                     "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    async def choice_events(i: int, r, pieces):
        """One choice's chunks; the choices of `n` > 1 follow one another (all were decoded together)."""
        yield chunk(i, {"role": "assistant", "content": ""})
        text, calls, sent = "", [], 0
        if tools_mode:  # a tool call is known only once the reply is complete
            async for piece in pieces:
                text += piece
            text, calls = run.split(text)
            if text:
                yield chunk(i, {"content": text}, lp=logprobs(r))
                sent = len(r.handle.logprobs)
            for k, c in enumerate(calls):
                yield chunk(i, {"tool_calls": [_call(c, k)]})
        else:
            async for piece in pieces:
                lp, sent = logprobs(r, sent), len(r.handle.logprobs)
                yield chunk(i, {"content": piece}, lp=lp)
        if r.error is None:
            rest = logprobs(r, sent) if sent < len(r.handle.logprobs) else None
            yield chunk(i, {}, finish_reason(r, calls), lp=rest)

    async def branch_pieces(r):
        async for piece in r.pieces():
            yield piece
        await r.settle()

    async def events():
        try:
            for i, r in enumerate(run.choices):
                async for event in choice_events(i, r, run.stream(first) if i == 0 else branch_pieces(r)):
                    yield event
                if r.error is not None:
                    yield _error(r)
                    return
            if opts["include_usage"]:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
                            "choices": [], "usage": _usage(prompt, run), "x_agentcache": run.info()})
            yield "data: [DONE]\n\n"
        finally:  # an error, or the client went away: the other choices stop too
            for r in run.branches:
                r.cancel()

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
    number(body, "n", 1, 1, 1, integer=True)
    if body.get("logprobs") is not None and body.get("logprobs") is not False:  # 0 too: it asks for them
        raise APIError(400, "logprobs are served on /v1/chat/completions only", param="logprobs")
    opts = _common(state, request, body, rt)
    echo = boolean(body, "echo")
    stop = stops(body, "stop", 4)
    prompt = await asyncio.to_thread(rt.encode, prompt_text)
    max_tokens, clamped = _max_tokens(rt, body, len(prompt), 16)
    run = await state.begin(request, body, TurnRequest(prompt, None, max_tokens, clamped, opts["temperature"], opts["seed"], stop), prompt_text)
    rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

    def finish_reason() -> str:
        return "length" if run.finish == "length" else "stop"

    def body_of(text: str, finish) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    if not opts["stream"]:
        text = await run.reply(request)
        out = body_of((prompt_text if echo else "") + text, finish_reason())
        out.update(usage=_usage(prompt, run), x_agentcache=run.info())
        return JSONResponse(out, headers=run.headers())

    first = await run.opening(request)

    async def events():
        if echo:
            yield _sse(body_of(prompt_text, None))
        async for piece in run.stream(first):
            yield _sse(body_of(piece, None))
        if run.error is not None:
            yield _error(run)
            return
        yield _sse(body_of("", finish_reason()))
        if opts["include_usage"]:
            yield _sse({**body_of("", None), "choices": [], "usage": _usage(prompt, run), "x_agentcache": run.info()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**run.headers(), "cache-control": "no-cache"})
