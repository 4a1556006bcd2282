"""The ASGI application: routes, the API-key and body-size gate, errors in
each API's shape, model loading in the background.

`/health` and `/` (Claude Code probes `HEAD /`) answer without a key (`/health` names unsaved agents only to a key holder);
`/health`: 503 while the model loads, 200 once it serves, 500 if loading failed. Every other route needs a key when any is
set (`Authorization: Bearer KEY` or `x-api-key: KEY`); a key scoped to a
name prefix sees only those agents. Without a key, writes must be JSON (or
octet-stream uploads) and Host must name this server (docs/server.md,
"Security").
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from . import agents_api, anthropic_api, openai_api, responses_api
from .errors import APIError, error_body, error_response, public
from .state import ServerConfig, ServerState, parse_keys

OPEN_PATHS = ("/", "/health")
# file uploads: an agent archive (`card` is the archive route's former name, kept as an alias) or a cache card
UPLOAD_ROUTE = re.compile(r"^/v1/agents/[^/]+/(archive|card|cachecard)$")
AGENT_ROUTE = re.compile(r"^/v1/agents/([^/]+)")


def _route_label(path: str) -> str:
    """Metric label: agent names folded so labels stay few."""
    return re.sub(r"^/v1/agents/[^/]+", "/v1/agents/{id}", path)


class Gate:
    """Pure ASGI middleware (streams and disconnects pass through untouched):
    API key, declared body size, and request counting."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        self.keys = parse_keys(state.config.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}  # values as bytes: keys may be UTF-8
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._check(scope, path, scope["method"], headers)
            if error is not None:
                await error_response(path, error)(scope, receive, counted_send)
                return
            await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.request(_route_label(path), status["code"])

    def _check(self, scope: dict, path: str, method: str, headers: dict) -> APIError | None:
        cfg = self.state.config
        upload = UPLOAD_ROUTE.match(path)
        if self.keys:
            auth = headers.get("authorization") or b""
            given = [headers.get("x-api-key") or b""] + ([auth[7:].strip()] if auth[:7].lower() == b"bearer " else [])
            # either header, whichever holds a key; every key compared (no early exit)
            found = [prefix for key, prefix in self.keys if any([hmac.compare_digest(g, key) for g in given])]
            scope["agentcache.keyed"] = bool(found)  # open paths answer either way, and say less without a key
            if found and None not in found:  # a scoped key: only agents named with its prefix exist for it
                scope["agentcache.scope"] = found[0]
        if self.keys and path not in OPEN_PATHS:
            if not found:
                return APIError(401, "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)", code="invalid_api_key")
            if None not in found:
                named = AGENT_ROUTE.match(path)
                if named and not named.group(1).startswith(found[0]):
                    return APIError(404, f"no agent '{named.group(1)}'", code="agent_not_found")
        elif not self.keys:
            error = _keyless(cfg.host, method, headers, bool(upload))
            if error is not None:
                return error
        limit = cfg.max_upload_bytes if upload else cfg.max_body_bytes
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            return APIError(400, "bad Content-Length")
        if length > limit:
            return APIError(413, f"request body of {length} bytes is over the {limit} byte limit")
        return None


LOOPBACK = {"localhost", "127.0.0.1", "::1"}
ANY_ADDRESS = {"", "0.0.0.0", "::"}


def _keyless(bound: str, method: str, headers: dict, upload: bool) -> APIError | None:
    """Without a key a browser is the threat: a page's cross-origin request carries no
    custom header, so writes must carry a content type no form can send, and the
    Host header must name this server (a DNS-rebinding page names its own domain)."""
    host = (headers.get("host") or b"").decode("latin-1").strip().lower()
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if bound not in ANY_ADDRESS and host and name not in LOOPBACK | {bound.lower()}:
        return APIError(403, f"Host {host!r} is not this server's address; without --api-key only requests to {bound} or loopback are served",
                        code="host_not_allowed")
    if method in ("POST", "PUT", "PATCH"):
        ctype = (headers.get("content-type") or b"").decode("latin-1").split(";", 1)[0].strip().lower()
        want = "application/octet-stream" if upload else "application/json"
        if ctype != want:
            return APIError(415, f"without --api-key a {method} must be sent as Content-Type: {want}", code="unsupported_media_type")
    return None


def create_app(config: ServerConfig | None = None, load: bool = True) -> FastAPI:
    state = ServerState(config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app):
        if load:
            state.start_loading()
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="agentcache", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(request.url.path, e)

    @app.exception_handler(404)
    async def not_found(request: Request, e):
        return error_response(request.url.path, APIError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def not_allowed(request: Request, e):
        return error_response(request.url.path, APIError(405, f"method {request.method} not allowed on {request.url.path}"))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        return JSONResponse(error_body(request.url.path, APIError(500, f"internal error: {type(e).__name__}: {public(e)}")), status_code=500)

    # -- service -------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request):
        if state.runtime is not None:
            # on the loop: a few dict reads, while worker threads may all be busy tokenizing
            unsaved = sorted(state.runtime.unsaved())
            if request.scope.get("agentcache.keyed", True) is False:  # agent names are for key holders only
                return {"status": "ok", "model": state.runtime.model_name, "unsaved_count": len(unsaved)}
            scope = request.scope.get("agentcache.scope")
            unsaved = [n for n in unsaved if scope is None or n.startswith(scope)]
            return {"status": "ok", "model": state.runtime.model_name, "unsaved": unsaved, "unsaved_count": len(unsaved)}
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
        return JSONResponse({"status": "loading", "model": state.config.model}, status_code=503, headers={"Retry-After": "2"})

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        return {"status": "ok" if state.runtime is not None else "loading", "service": "agentcache"}

    @app.get("/metrics")
    async def metrics():
        rt = state.runtime
        memory = await asyncio.to_thread(rt.memory) if rt is not None else None
        unsaved = len(await asyncio.to_thread(rt.unsaved)) if rt is not None else 0
        return PlainTextResponse(state.metrics.render(memory, len(state.runs), rt is not None, unsaved), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        created = int(time.time())
        if "anthropic-version" in request.headers:
            data = [{"type": "model", "id": n, "display_name": n, "created_at": "1970-01-01T00:00:00Z"} for n in state.model_names]
            return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "agentcache"} for n in state.model_names]}

    app.add_api_route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", openai_api.completions, methods=["POST"])
    app.add_api_route("/v1/responses", responses_api.responses, methods=["POST"])
    app.state.responses = responses_api.ResponseStore()
    app.add_api_route("/v1/messages", anthropic_api.messages, methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", anthropic_api.count_tokens, methods=["POST"])

    app.include_router(agents_api.router)

    return Gate(app, state)
