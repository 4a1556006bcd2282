"""The conversation history file of an agent: `{"name", "system", "messages"}` as JSON
(and `context`, the token ids of cache cards it was handed, see cards.py).

A history is small and rewritten whole, atomically, after each turn; the
cache can always be rebuilt from it. A history that is not UTF-8 JSON of
that shape is refused with `HistoryError` naming the file and the reason;
the caller moves it aside (never deletes it) and starts a new conversation.
"""

from __future__ import annotations

import json
from pathlib import Path

from .container import atomic_write
from .layout import HISTORY_SUFFIX

MAX_HISTORY_BYTES = 256 << 20


class HistoryError(ValueError):
    """A history file that must not be used; the message names it and says why."""


def check(data: object, where: str = "history") -> dict:
    """`data` as a history: {"system": str | None, "messages": [{"role": str, "content": str}, ...]}."""
    if not isinstance(data, dict):
        raise HistoryError(f"{where}: not a JSON object")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise HistoryError(f"{where}: 'system' is not a string")
    messages = data.get("messages", [])
    if not isinstance(messages, list):
        raise HistoryError(f"{where}: 'messages' is not a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise HistoryError(f"{where}: message {i} is not a {{'role': str, 'content': str}} object")
    context = data.get("context")
    if context is not None:
        _check_context(context, len(messages), where)
    return {**data, "system": system, "messages": messages, "context": context}


def _check_context(c: object, n_messages: int, where: str) -> None:
    """An injected context (cards.py): {"tokens": [int], "covers": own messages it
    includes, "system": whether it includes the system prompt, "marks": where each
    of those messages starts, "cards": [{"at", "hops", "widths", ...}]}."""
    ok = (
        isinstance(c, dict)
        and isinstance(c.get("tokens"), list)
        and all(type(t) is int and t >= 0 for t in c["tokens"])
        and type(c.get("covers")) is int
        and 0 <= c["covers"] <= n_messages
        and isinstance(c.get("system"), bool)
        and isinstance(c.get("marks"), list)
        and len(c["marks"]) == c["covers"] + 1
        and all(type(t) is int and 0 <= t <= len(c["tokens"]) for t in c["marks"])
        and isinstance(c.get("cards"), list)
        and all(
            isinstance(k, dict) and type(k.get("at")) is int and type(k.get("hops")) is int and isinstance(k.get("widths"), list)
            and all(w in (2, 3, 4, 5, 6, 8, 16) and type(w) is int for w in k["widths"])
            for k in c["cards"]
        )
    )
    if not ok:
        raise HistoryError(f"{where}: 'context' is not a valid injected context")


def load(path: Path) -> dict | None:
    """The saved history for an agent that continues it; None when there is none.
    Raises HistoryError when the file cannot be used."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HistoryError(f"{p.name}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_HISTORY_BYTES:
        raise HistoryError(f"{p.name}: {len(raw)} bytes, over the {MAX_HISTORY_BYTES}-byte limit")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, empty
        raise HistoryError(f"{p.name}: not UTF-8 JSON ({e.__class__.__name__})") from None
    data = check(data, p.name)
    if data.get("name") is not None and data["name"] != p.name[: -len(HISTORY_SUFFIX)]:
        raise HistoryError(f"{p.name}: holds the history of agent {str(data['name'])[:64]!r}, not of this one")
    return data


def read(path: Path) -> dict | None:
    """The saved history for a listing: None when there is none or it cannot be used."""
    try:
        return load(path)
    except HistoryError:
        return None


def encode(name: str, system: str | None, messages: list[dict], context: dict | None = None) -> bytes:
    data = {"name": name, "system": system, "messages": messages}
    if context is not None:  # tokens handed over by cache cards (cards.py)
        data["context"] = context
    return json.dumps(data, indent=1).encode()


def write(path: Path, name: str, system: str | None, messages: list[dict], context: dict | None = None) -> None:
    """Replace the history atomically (raises CacheWriteError)."""
    atomic_write(Path(path), [encode(name, system, messages, context)])


def write_dict(path: Path, data: dict) -> None:
    atomic_write(Path(path), [json.dumps(data, indent=1).encode()])
