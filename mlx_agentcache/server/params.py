"""Reading request bodies: size limit, JSON, and typed fields with 400s that
name the parameter, so a bad request never reaches the model."""

from __future__ import annotations

import asyncio
import json

from .errors import APIError

MISSING = object()


async def read_body(request, limit: int) -> bytes:
    """The raw body, refusing (413) more than `limit` bytes even without a Content-Length."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


PARSE_ON_LOOP = 64 << 10  # larger bodies are parsed on a worker thread: the event loop keeps serving


async def read_json(request, limit: int) -> dict:
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw) if len(raw) <= PARSE_ON_LOOP else await asyncio.to_thread(json.loads, raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, MISSING)
    if v is MISSING or v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false", param=name)
    return v


def stops(body: dict, name: str, most: int = 16) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > most:
        raise APIError(400, f"'{name}' must be a string or a list of at most {most} strings", param=name)
    return [s for s in v if s]


def ignored(body: dict, known: set[str]) -> list[str]:
    """Top-level fields this server does not act on (reported, never refused:
    clients such as Claude Code send fields of newer API versions)."""
    return sorted(k for k in body if k not in known)
