"""OpenAI's `POST /v1/responses` (the Responses API that openai-agents and
Codex CLI speak), on the same pipeline as chat completions: the input items
become chat messages (conversation.py), tools go through tools.py, `text.format`
through grammar.py, and the turn runs on the agent's cache.

`previous_response_id` continues the agent that answered that response, with
its conversation: the server keeps, per stored response, the agent's name and
the messages up to and including the reply (in memory, the latest
`STORED_RESPONSES`). The prompt of the next turn then starts with the tokens
already in that agent's cache, so `usage.input_tokens_details.cached_tokens`
counts them. `store: false` keeps nothing under that id; an unknown id is a
404. `instructions` are not carried over (OpenAI's rule): each request's own
become the system message.

Streams send the event sequence the openai SDK parses: response.created,
response.in_progress, then per output item output_item.added, the text or
arguments deltas and their done events, output_item.done, and last
response.completed (response.incomplete when max_output_tokens ran out).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from . import conversation as conv
from . import grammar as gr
from . import tools as tl
from ..limits import MAX_TOKENS
from .errors import APIError
from .params import boolean, ignored, number, read_json
from .state import TurnRequest

STORED_RESPONSES = 1024
FIELDS = {"model", "input", "instructions", "previous_response_id", "store", "stream", "tools", "tool_choice", "text", "max_output_tokens",
          "temperature", "top_p", "user", "prompt_cache_key", "metadata", "parallel_tool_calls", "seed"}


class ResponseStore:
    """Response id -> (agent, conversation without the system message), the latest few, oldest dropped first."""

    def __init__(self, limit: int = STORED_RESPONSES):
        self.limit = limit
        self._items: OrderedDict[str, tuple[str, list[dict]]] = OrderedDict()

    def get(self, rid) -> tuple[str, list[dict]]:
        if not isinstance(rid, str) or rid not in self._items:
            raise APIError(404, f"Previous response with id '{rid}' not found.", param="previous_response_id", code="previous_response_not_found")
        self._items.move_to_end(rid)
        return self._items[rid]

    def put(self, rid: str, agent: str, messages: list[dict]) -> None:
        self._items[rid] = (agent, messages)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)


def input_messages(raw) -> list[dict]:
    """`input` (a string or a list of items) as chat messages: function_call items
    join the assistant turn before them, function_call_output items become tool messages."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'input' must be a string or a non-empty list of items", param="input")
    out: list[dict] = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in conv.ROLES - {"tool"}:
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": conv.content_text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = conv.call_for_template({"id": item.get("call_id"), "function": {"name": item.get("name"), "arguments": item.get("arguments")}})
            if not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "content": ""})
            out[-1] = {**out[-1], "tool_calls": out[-1].get("tool_calls", []) + [call]}
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id")), "content": output if isinstance(output, str) else conv.content_text(output, f"input[{i}]")})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(400, f"input[{i}]: items of type {kind!r} are not supported (message, function_call, function_call_output)", param="input")
    return out


def function_tools(raw) -> tuple[list[dict], list[str]]:
    """Function tools in the chat completions shape, and the types of the other (hosted) tools, which are ignored."""
    if raw is None:
        return [], []
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise APIError(400, "'tools' must be a list of {type: function, name, parameters}", param="tools")
    tools, other = [], []
    for t in raw:
        if t.get("type") != "function":
            other.append(str(t.get("type")))
        elif not isinstance(t.get("name"), str) or not t["name"]:
            raise APIError(400, "a function tool needs a 'name'", param="tools")
        else:
            tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}})
    return tools, other


def chat_tool_choice(choice):
    """Responses' tool_choice ({type: function, name}) in the chat completions shape tools.py reads."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def text_grammar(text) -> str | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
    return gr.response_format_grammar(fmt)


def _usage(prompt: list[int], run) -> dict:
    s = run.stats
    return {"input_tokens": len(prompt), "input_tokens_details": {"cached_tokens": s.restored_tokens, "cache_write_tokens": s.prefilled_tokens},
            "output_tokens": s.generated_tokens, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": len(prompt) + s.generated_tokens}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(text: str, status: str = "completed") -> dict:
    content = [_text_part(text)] if status == "completed" else []
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": status, "role": "assistant", "content": content}


def _function_call(c: dict) -> dict:
    return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": c["id"], "name": c["name"],
            "arguments": json.dumps(c["arguments"]), "status": "completed"}


async def responses(request: Request):
    state = request.app.state.server
    store: ResponseStore = request.app.state.responses
    body = await read_json(request, state.config.max_body_bytes)
    rt = state.rt()
    model = state.check_model(body.get("model"))
    previous = body.get("previous_response_id")
    before_agent, before = store.get(previous) if previous is not None else (None, [])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "'instructions' must be a string", param="instructions")
    messages = before + input_messages(body.get("input"))
    tools, hosted = function_tools(body.get("tools"))
    choice = chat_tool_choice(body.get("tool_choice"))
    required = tl.required_tools(tools, choice, "openai")
    if choice == "none":
        tools = []
    grammar = gr.tool_call_grammar(required) if required else text_grammar(body.get("text"))
    keep = boolean(body, "store", True)
    stream = boolean(body, "stream")
    number(body, "top_p", 1.0, 0.0, 1.0)
    temperature = number(body, "temperature", None, 0.0, 2.0)
    seed = number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    system = [{"role": "system", "content": instructions}] if instructions else []
    prompt, rendered, tools_mode = await asyncio.to_thread(conv.render, rt, system + messages, tools, state.config.compact_tools)
    requested = number(body, "max_output_tokens", None, 1, MAX_TOKENS, integer=True)
    max_tokens, clamped = conv.fit_max_tokens(rt, len(prompt), requested, state.config.default_max_tokens)
    turn = TurnRequest(prompt, rendered, max_tokens, clamped, temperature, None if seed is None else seed % (2**32), tools_mode=tools_mode, grammar=grammar)
    run = await state.begin(request, body, turn, rendered, agent=before_agent and (before_agent, "previous_response_id"),
                            ignored=ignored(body, FIELDS), ignored_tools=hosted)
    agent = run.agent
    rid, created = "resp_" + uuid.uuid4().hex, time.time()

    def response(status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model, "output": output,
                "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": instructions, "previous_response_id": previous, "max_output_tokens": requested,
                "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": True,
                "temperature": temperature, "top_p": body.get("top_p"), "text": body.get("text") or {"format": {"type": "text"}},
                "store": keep, "metadata": body.get("metadata") or {}, "usage": usage, "x_agentcache": run.info() if usage else None}

    def finished(text: str) -> tuple[str, list[dict], str]:
        """The reply's text and calls, and the response status; the conversation is stored under the response id."""
        text, calls = run.split(text)
        reply = {"role": "assistant", "content": text}
        if calls:
            reply["tool_calls"] = [{"type": "function", "id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        if keep:
            store.put(rid, agent, messages + [reply])
        return text, calls, "incomplete" if run.finish == "length" and not calls else "completed"

    if not stream:
        text, calls, status = finished(await run.reply(request))
        output = ([_message(text)] if text or not calls else []) + [_function_call(c) for c in calls]
        return JSONResponse(response(status, output, _usage(prompt, run)), headers=run.headers())

    first = await run.opening(request)
    seq = iter(range(1 << 62))

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n"

    def text_start(index: int, item: dict):
        yield event("response.output_item.added", output_index=index, item={**_message("", "in_progress"), "id": item["id"]})
        yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=_text_part(""))

    def delta(index: int, item: dict, piece: str) -> str:
        return event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0, delta=piece, logprobs=[])

    def text_done(index: int, item: dict):
        text = item["content"][0]["text"]
        yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=item["content"][0])
        yield event("response.output_item.done", output_index=index, item=item)

    async def events():
        yield event("response.created", response=response("in_progress", []))
        yield event("response.in_progress", response=response("in_progress", []))
        text, output = "", []
        if tools_mode:  # a call is known only once the reply is complete
            text = "".join([piece async for piece in run.stream(first)])
        else:
            item = _message("")
            for e in text_start(0, item):
                yield e
            async for piece in run.stream(first):
                text += piece
                yield delta(0, item, piece)
        if run.error is not None:
            failed = response("failed", [], error={"code": "server_error", "message": run.failure})
            yield event("response.failed", response=failed)
            return
        text, calls, status = finished(text)
        if tools_mode:
            if text or not calls:
                item = _message(text)
                for e in text_start(0, item):
                    yield e
                if text:
                    yield delta(0, item, text)
                for e in text_done(0, item):
                    yield e
                output.append(item)
            for c in calls:
                fc, index = _function_call(c), len(output)
                yield event("response.output_item.added", output_index=index, item={**fc, "arguments": "", "status": "in_progress"})
                yield event("response.function_call_arguments.delta", item_id=fc["id"], output_index=index, delta=fc["arguments"])
                yield event("response.function_call_arguments.done", item_id=fc["id"], output_index=index, name=fc["name"], arguments=fc["arguments"])
                yield event("response.output_item.done", output_index=index, item=fc)
                output.append(fc)
        else:
            item["content"] = [_text_part(text)]
            for e in text_done(0, item):
                yield e
            output.append(item)
        yield event(f"response.{status}", response=response(status, output, _usage(prompt, run)))

    return StreamingResponse(events(), media_type="text/event-stream", headers={**run.headers(), "cache-control": "no-cache"})
