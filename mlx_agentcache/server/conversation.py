"""Both APIs' messages as one conversation the chat template renders, tools,
and the context-length fit.

Messages become `{"role", "content"}` dicts (OpenAI's layout, which Hugging
Face chat templates expect): text parts are joined, Anthropic's top-level
`system` becomes the first message and a `system` message inside `messages`
stays at its position, `tool_result` blocks become `tool` messages and
`tool_use` blocks an assistant's `tool_calls`. Images and other media are
refused: the models served here read text only.

Tools go through the chat template when it uses them; otherwise (SmolLM2,
Gemma 3) through the generic text format of tools.py, which also renders
earlier calls and results.
"""

from __future__ import annotations

import json

from . import tools as tl
from .errors import APIError

ROLES = {"system", "developer", "user", "assistant", "tool"}


def content_text(content, where: str) -> str:
    """OpenAI/Anthropic content (a string or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                out.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") in ("thinking", "redacted_thinking"):
                continue
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}: content of type {kind!r} is not supported (this model reads text only)", param="messages")
        return "".join(out)
    raise APIError(400, f"{where}: content must be a string or a list of parts", param="messages")


def openai_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a 'role' of {sorted(ROLES)}", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": content_text(m.get("content"), f"messages[{i}]")}
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise APIError(400, f"messages[{i}].tool_calls must be a list of {{'function': {{'name', 'arguments'}}}} objects", param="messages")
            msg["tool_calls"] = [call_for_template(c) for c in calls]
        if role == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    return out


def call_for_template(call: dict) -> dict:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"type": "function", "id": call.get("id"), "function": {"name": fn.get("name"), "arguments": args}}


def anthropic_messages(system, raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages: must be a non-empty list")
    out = []
    if system:
        out.append({"role": "system", "content": content_text(system, "system")})
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise APIError(400, f"messages.{i}: 'role' must be 'user', 'assistant' or 'system'")
        content = m.get("content")
        if isinstance(content, list):
            text, calls, results = [], [], []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "tool_use":
                    calls.append({"type": "function", "id": part.get("id"), "function": {"name": part.get("name"), "arguments": part.get("input")}})
                elif kind == "tool_result":
                    results.append({"role": "tool", "tool_call_id": str(part.get("tool_use_id")), "content": content_text(part.get("content"), f"messages.{i}")})
                else:
                    text.append(content_text([part], f"messages.{i}"))
            out.extend(results)
            if text or calls or not results:
                msg = {"role": m["role"], "content": "".join(text)}
                if calls:
                    msg["tool_calls"] = calls
                out.append(msg)
        else:
            out.append({"role": m["role"], "content": content_text(content, f"messages.{i}")})
    return out


def openai_tools(raw) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name") for t in raw):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, parameters}}", param="tools")
    return raw


def anthropic_tools(raw) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) and t.get("name") for t in raw):
        raise APIError(400, "tools: must be a list of {name, description, input_schema}")
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""), "parameters": t.get("input_schema", {})}} for t in raw]


def tools_supported(rt) -> bool:
    return "tools" in rt.chat_template


def render(rt, messages: list[dict], tools: list[dict], short_tools: bool = False) -> tuple[list[int], list[dict], str | None]:
    """Prompt tokens, the conversation as rendered (what the agent's history
    keeps), and how tools were rendered: None (none offered), "template",
    "generic" or "compact" (the generic format with signatures: `short_tools`)."""
    mode = ("template" if tools_supported(rt) else "compact" if short_tools else "generic") if tools else None
    if mode == "template":
        conversation = tl.fold_system(messages)
    else:
        conversation = tl.plain_conversation(messages, tools, short_tools)
    try:
        return rt.render(conversation, tools if mode == "template" else None), conversation, mode
    except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template of {rt.model_name} cannot render these messages: {e}", param="messages") from None


def fit_max_tokens(rt, n_prompt: int, requested: int | None, default: int) -> tuple[int, int | None]:
    """(max_tokens granted, the requested value when it was clamped to what the
    context leaves after the prompt, else None). A prompt that leaves no room is a 400."""
    limit = rt.context_length
    room = limit - n_prompt
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt is {n_prompt} tokens, which leaves no room "
                            f"for a reply. Please reduce the length of the messages or tools.", code="context_length_exceeded", param="messages")
    if requested is None:
        return max(1, min(default, room)), None
    return (room, requested) if requested > room else (requested, None)
