"""Tools for every model: one generic text format where the chat template has
none, `tool_choice` checks, and reading calls back from a reply.

SmolLM2's and Gemma 3's templates know nothing of tools, so the conversation
is rewritten into plain system/user/assistant text before the template sees
it (`plain_conversation`):

* the tools join the system message as one JSON line each, after a short
  instruction to answer with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
  with `serve --compact-tools`, as one signature line each instead
  (`name(arg: type, optional?: type): first sentence of the description`):
  Claude Code's 24 tools are 16.5K tokens as JSON, more than SmolLM2's
  context, and about a fifteenth of that as signatures. A required call is still
  held to the tool's full JSON Schema (grammar.py);
* an earlier assistant call is rendered in that same form inside the
  assistant's turn (never dropped), a tool result as a user turn holding
  `<tool_response>...</tool_response>`;
* a `system` message after the first turn (Claude Code sends one) joins the
  conversation at its position as a user turn wrapped in `<system>`, since
  templates take a system message only first;
* consecutive turns of one role are joined, as the templates want roles to
  alternate.

The rewritten conversation is what the agent's history stores, so the next
request's prompt starts with the same tokens and the cache is reused. Calls
are read back in the `<tool_call>` form that tool-capable templates (Qwen,
Hermes, SmolLM3) use as well.
"""

from __future__ import annotations

import json
import re
import uuid

from .errors import APIError

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
INSTRUCTION = (
    "# Tools\n"
    "You may call the tools below. To call one, answer with exactly\n"
    '<tool_call>{"name": "TOOL NAME", "arguments": {ARGUMENTS AS JSON}}</tool_call>\n'
    "and nothing after it. A tool's result comes back as <tool_response>...</tool_response>.\n"
    "Available tools, one JSON object each (parameters is the JSON Schema of the arguments):"
)


def compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


COMPACT_INSTRUCTION = INSTRUCTION.split("\nAvailable tools")[0] + (
    "\nAvailable tools, one per line: name(argument: type, ...): what it does; '?' marks an optional argument:")
SENTENCE_RE = re.compile(r"(.+?[.!?])(\s|$)", re.S)
SUMMARY_CHARS = 200


def _type(schema) -> str:
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema and isinstance(schema["enum"], list):
        return "|".join(compact(v) for v in schema["enum"])
    t = schema.get("type", "any")
    if t == "array":
        return _type(schema.get("items")) + "[]"
    return t if isinstance(t, str) else "|".join(map(str, t))


def signature(f: dict) -> str:
    """One tool as `name(arg: type, optional?: type): first sentence of its description`."""
    params = f.get("parameters") or {}
    props = params.get("properties") if isinstance(params, dict) else None
    required = set(params.get("required") or []) if isinstance(params, dict) else set()
    args = ", ".join(f"{k}{'' if k in required else '?'}: {_type(v)}" for k, v in (props or {}).items())
    text = " ".join(str(f.get("description") or "").split())
    m = SENTENCE_RE.match(text)
    summary = (m.group(1) if m else text)[:SUMMARY_CHARS]
    return f"{f['name']}({args})" + (f": {summary}" if summary else "")


def tools_text(tools: list[dict], short: bool = False) -> str:
    """The tools for the system message: full JSON lines, or signatures (`short`)."""
    functions = [t["function"] for t in tools]
    if short:
        return COMPACT_INSTRUCTION + "\n" + "\n".join(signature(f) for f in functions)
    lines = [compact({"name": f["name"], "description": f.get("description", ""), "parameters": f.get("parameters", {})}) for f in functions]
    return INSTRUCTION + "\n" + "\n".join(lines)


def call_text(name: str, arguments) -> str:
    """An earlier call as the model would have written it (arguments already parsed by conversation.py)."""
    return f"<tool_call>{compact({'name': name, 'arguments': arguments})}</tool_call>"


def fold_system(messages: list[dict]) -> list[dict]:
    """Leading system messages as one; a later one as a user turn in `<system>`, at its position."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "system":
            if all(o["role"] == "system" for o in out):
                if out:
                    out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + m["content"]}
                else:
                    out.append(m)
                continue
            m = {"role": "user", "content": f"<system>\n{m['content']}\n</system>"}
        out.append(m)
    return _join_roles(out)


def plain_conversation(messages: list[dict], tools: list[dict], short: bool = False) -> list[dict]:
    """The conversation in the generic tool format (module doc), as plain text turns;
    `short`: tools as signatures."""
    out = []
    for m in messages:
        role, text = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + calls)})
        else:
            out.append({"role": role, "content": text})
    if tools:
        text = tools_text(tools, short)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return fold_system(out)


def _join_roles(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] in ("user", "assistant") and not (out[-1].get("tool_calls") or m.get("tool_calls")):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def required_tools(tools: list[dict], choice, api: str) -> list[dict] | None:
    """The tools a reply must call one of (None: a call is not required).

    OpenAI: "required" or {type: function, function: {name}}; Anthropic: {type: any}
    or {type: tool, name}. A name not among `tools` is a 400."""
    if api == "openai":
        if choice == "required":
            name = None
        elif isinstance(choice, dict) and choice.get("type") == "function":
            name = (choice.get("function") or {}).get("name")
        elif choice in (None, "auto", "none"):
            return None
        else:
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}", param="tool_choice")
    else:
        kind = choice.get("type")
        if kind in (None, "auto", "none"):
            return None
        if kind not in ("any", "tool"):
            raise APIError(400, "tool_choice.type: must be one of auto, any, tool, none")
        name = choice.get("name") if kind == "tool" else None
    if not tools:
        raise APIError(400, "tool_choice requires a tool call but no tools were given", param="tool_choice")
    if name is None:
        return tools
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise APIError(400, f"tool_choice names the tool {name!r}, which is not in tools ({', '.join(t['function']['name'] for t in tools)})",
                       param="tool_choice")
    return chosen


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """Text without its `<tool_call>` blocks, and the complete, valid calls as
    {id, name, arguments}. An unfinished block stays text: never a call."""
    calls = []
    for m in TOOL_CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "name": obj["name"], "arguments": args if isinstance(args, dict) else {}})
    return (TOOL_CALL_RE.sub("", text).strip() if calls else text), calls
