"""The conversation history file of an agent: `{"name", "system", "messages"}` as JSON.

A history is small and rewritten whole, atomically, after each turn; the
cache can always be rebuilt from it. A history that is not UTF-8 JSON of
that shape is refused with `HistoryError` naming the file and the reason;
the caller moves it aside (never deletes it) and starts a new conversation.
"""

from __future__ import annotations

import json
from pathlib import Path

from .container import atomic_write

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
    return {**data, "system": system, "messages": messages}


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
    return check(data, p.name)


def read(path: Path) -> dict | None:
    """The saved history for a listing: None when there is none or it cannot be used."""
    try:
        return load(path)
    except HistoryError:
        return None


def encode(name: str, system: str | None, messages: list[dict]) -> bytes:
    return json.dumps({"name": name, "system": system, "messages": messages}, indent=1).encode()


def write(path: Path, name: str, system: str | None, messages: list[dict]) -> None:
    """Replace the history atomically (raises CacheWriteError)."""
    atomic_write(Path(path), [encode(name, system, messages)])


def write_dict(path: Path, data: dict) -> None:
    atomic_write(Path(path), [json.dumps(data, indent=1).encode()])
