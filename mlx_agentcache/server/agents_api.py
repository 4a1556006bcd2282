"""The agent routes: list, show, prefetch, evict, pin, unpin and delete agents,
and move them as files: agent archives (the whole agent) and cache cards (a
token range of its context, cards.py)."""

from __future__ import annotations

import asyncio
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse

from ..pool import PinError
from ..store.container import CacheFileError
from ..store.layout import ARCHIVE_SUFFIX, CACHE_CARD_SUFFIX, is_agent_name
from .errors import APIError, public
from .params import read_body

router = APIRouter()


def _agent_name(name: str) -> str:
    if not is_agent_name(name):
        raise APIError(400, f"invalid agent id {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit", code="invalid_agent_id")
    return name


def _known(rt, name: str) -> dict:
    info = rt.describe(name)
    if info["tier"] == "cold" and not any(a["name"] == name for a in rt.agents()):
        raise APIError(404, f"no agent '{name}'", code="agent_not_found")
    return info


def _existing(request: Request, name: str):
    """(server state, runtime) for a request about agent `name`, which must be valid and known (else 400, 404)."""
    state = request.app.state.server
    rt = state.rt()
    _known(rt, _agent_name(name))
    return state, rt


def _idle(state, name: str) -> None:
    if state.busy(name):
        raise APIError(409, f"agent '{name}' is answering a request now; try again when it is done", code="agent_busy")


@asynccontextmanager
async def _uploaded(request: Request, name: str, suffix: str):
    """The request body as a temporary file named `upload{suffix}`, once agent `name` may take it."""
    state = request.app.state.server
    _agent_name(name)
    _idle(state, name)
    data = await read_body(request, state.config.max_upload_bytes)
    with tempfile.TemporaryDirectory(prefix="agentcache-upload-") as d:
        path = Path(d) / f"upload{suffix}"
        path.write_bytes(data)
        yield path


def _download(path: Path, headers: dict | None = None) -> FileResponse:
    """Send a file written into its own temporary folder, and remove both once sent."""
    def cleanup():
        path.unlink(missing_ok=True)
        path.parent.rmdir()

    return FileResponse(path, media_type="application/octet-stream", filename=path.name, headers=headers, background=BackgroundTask(cleanup))


@router.get("/v1/agents")
async def list_agents(request: Request):
    state = request.app.state.server
    rt = state.rt()
    agents = await asyncio.to_thread(rt.agents)
    scope = request.scope.get("agentcache.scope")
    agents = [a for a in agents if scope is None or a["name"].startswith(scope)]
    for a in agents:
        a["busy"] = state.busy(a["name"])
    return {"object": "list", "data": agents, "memory": await asyncio.to_thread(rt.memory)}


@router.get("/v1/agents/{name}")
async def show_agent(request: Request, name: str):
    state = request.app.state.server
    rt = state.rt()
    info = _known(rt, _agent_name(name))
    a = rt.agent(name)
    return {**info, "unsaved": name in rt.unsaved(), "busy": state.busy(name), "system": a.system, "messages": a.messages}


@router.post("/v1/agents/{name}/prefetch")
async def prefetch(request: Request, name: str):
    _, rt = _existing(request, name)
    started = rt.prefetch(name)
    return {"name": name, "prefetching": started, "tier": rt.describe(name)["tier"]}


@router.post("/v1/agents/{name}/evict")
async def evict(request: Request, name: str):
    state, rt = _existing(request, name)
    _idle(state, name)
    try:
        evicted = await asyncio.to_thread(rt.evict, name)
    except PinError as e:
        raise APIError(409, str(e), code="agent_pinned") from None
    except OSError as e:
        raise APIError(500, public(e)) from None
    return {"name": name, "evicted": evicted, "tier": rt.describe(name)["tier"]}


@router.post("/v1/agents/{name}/pin")
async def pin(request: Request, name: str):
    _, rt = _existing(request, name)
    try:
        info = await asyncio.to_thread(rt.pin, name)
    except PinError as e:  # no cache yet, or pins would take over half the budget
        raise APIError(409, str(e), code="pin_refused") from None
    return {"name": name, "pinned": True, "tier": info["tier"]}


@router.post("/v1/agents/{name}/unpin")
async def unpin(request: Request, name: str):
    _, rt = _existing(request, name)
    was = await asyncio.to_thread(rt.unpin, name)
    return {"name": name, "pinned": False, "was_pinned": was, "tier": rt.describe(name)["tier"]}


@router.delete("/v1/agents/{name}")
async def delete(request: Request, name: str):
    state, rt = _existing(request, name)
    _idle(state, name)
    try:
        await asyncio.to_thread(rt.delete, name)
    except OSError as e:  # a read-only directory: the agent stays as it was, in memory and on disk
        raise APIError(500, f"could not delete agent '{name}': {public(e)}", code="delete_failed") from None
    state.anon.pop(name, None)
    return {"name": name, "deleted": True}


# -- agent archives: the whole agent in one file (`/card` is the former name of `/archive`, kept as an alias)
@router.get("/v1/agents/{name}/archive")
@router.get("/v1/agents/{name}/card")
async def export_archive(request: Request, name: str):
    _, rt = _existing(request, name)
    tmp = Path(tempfile.mkdtemp(prefix="agentcache-archive-")) / f"{name}{ARCHIVE_SUFFIX}"
    try:
        path = await asyncio.to_thread(rt.export_archive, name, tmp)
    except FileNotFoundError as e:
        raise APIError(404, public(e), code="agent_not_found") from None
    except (ValueError, OSError) as e:
        raise APIError(500, f"could not export agent '{name}': {public(e)}") from None
    return _download(path)


@router.put("/v1/agents/{name}/archive")
@router.put("/v1/agents/{name}/card")
async def import_archive(request: Request, name: str):
    rt = request.app.state.server.rt()
    async with _uploaded(request, name, ARCHIVE_SUFFIX) as archive:
        try:
            got = await asyncio.to_thread(rt.import_archive, archive, name)
        except FileExistsError as e:
            raise APIError(409, public(e), code="agent_exists") from None
        except (ValueError, OSError) as e:  # a damaged archive, another model's, or not an archive
            raise APIError(400, f"archive refused: {public(e)}", code="invalid_archive") from None
    return JSONResponse({"name": got, "imported": True, **rt.describe(got)}, status_code=201)


# -- cache cards (cards.py): a token range of one agent's context, to inject into another
@router.get("/v1/agents/{name}/cachecard")
async def download_cachecard(request: Request, name: str, bits: float = 4.0, range: str = "all", uniform: bool = False):
    state, rt = _existing(request, name)
    _idle(state, name)
    if range not in ("all", "last-turn"):
        raise APIError(400, f"range must be 'all' or 'last-turn', got {range!r}")
    if not 1 <= bits <= 16:  # also refuses inf and nan
        raise APIError(400, f"bits must be a number from 1 to 16, got {bits}", param="bits")
    tmp = Path(tempfile.mkdtemp(prefix="agentcache-cachecard-")) / f"{name}{CACHE_CARD_SUFFIX}"
    try:
        card = await asyncio.to_thread(rt.agent(name).export_card, tmp, bits, range, "uniform" if uniform else "mixed")
    except ValueError as e:  # a budget below the minimum, nothing to hand over
        tmp.parent.rmdir()
        raise APIError(400, public(e), code="invalid_card_request") from None
    return _download(tmp, {"x-card-tokens": str(card.n), "x-card-avg-bits": f"{card.avg_bits:.4f}", "x-card-hops": str(card.hops)})


@router.post("/v1/agents/{name}/cachecard")
async def upload_cachecard(request: Request, name: str):
    rt = request.app.state.server.rt()
    async with _uploaded(request, name, CACHE_CARD_SUFFIX) as card:
        try:
            stats = await asyncio.to_thread(rt.agent(name).inject, card)
        except (ValueError, OSError, CacheFileError) as e:  # damaged, truncated, another model's, or not a card
            rt.drop_if_empty(name)
            raise APIError(400, f"card refused: {public(e)}", code="invalid_card") from None
    a = rt.agent(name)
    return JSONResponse({"name": name, "injected": True, "context_tokens": len(a.context["tokens"]), **stats.as_dict()}, status_code=201)
