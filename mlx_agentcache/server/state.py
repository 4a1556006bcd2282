"""What the server holds: the Runtime (loaded in the background), who is
talking to which agent, rate limits, and the bridge from the scheduler's
turn handles to asyncio.

Agent selection (first match wins): the `X-Agent-Id` header, then the body's
`prompt_cache_key`, `user`, the `X-Session-Id` and `X-Claude-Code-Session-Id`
headers, then `metadata.user_id` (Claude Code sends one per user, the session
header per session). `X-Agent-Id` must be a valid agent name
(else 400); the others are used as they are when valid and otherwise mapped
to `id-<hash>`. With none, a chat continues the anonymous agent whose stored
conversation is the longest prefix of the request's messages (a completion:
whose text is the longest prefix of the prompt), or starts a new `anon-...`
agent; at most `anon_agents` anonymous agents are kept, the least recently
used are deleted first.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_KV, DEFAULT_MODEL
from ..store.layout import is_agent_name
from ..turnlock import TurnBusyError
from . import tools as tl
from .errors import APIError
from .metrics import Metrics, now
from .saves import Resaver

AGENT_HEADER = "x-agent-id"
SESSION_HEADERS = ("x-session-id", "x-claude-code-session-id")
ANON_PREFIX = "anon-"


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL
    cache_dir: Path | None = None
    budget_bytes: int | None = None
    kv: str = DEFAULT_KV
    mla: str = "latent"
    api_key: str | list[str] | None = None  # one key, or several: `KEY` (every agent) or `KEY:PREFIX*` (agents named PREFIX...)
    temperature: float = 0.0
    seed: int = 0
    default_max_tokens: int = 256
    max_body_bytes: int = 8 << 20
    max_upload_bytes: int = 1 << 30  # an agent archive or a cache card
    agent_rpm: float | None = None  # requests per minute per agent
    global_rpm: float | None = None
    aliases: list[str] = field(default_factory=list)
    anon_agents: int = 64
    host: str = "127.0.0.1"  # the bound address: requests without a key must name it (or loopback) in Host
    max_connections: int = 512  # open at once; beyond: 503 and closed (connections.py)
    header_timeout: float = 10.0  # seconds to send a complete request head
    compact_tools: bool = False  # tools as signatures in the generic format (tools.py)


def parse_keys(api_key: str | list[str] | None) -> list[tuple[bytes, str | None]]:
    """[(key as UTF-8, agent-name prefix or None for every agent)] from `--api-key` values."""
    out = []
    for k in [api_key] if isinstance(api_key, str) else (api_key or []):
        key, scope = (k[:-1].rsplit(":", 1) if k.endswith("*") and ":" in k else (k, None))
        if not key:
            raise ValueError(f"--api-key {k!r}: the key part is empty")
        if scope and not is_agent_name(scope + "x"):
            raise ValueError(f"--api-key {k!r}: {scope!r} does not start agent names")
        out.append((key.encode(), scope or None))
    return out


class RateLimiter:
    """Token buckets: `rpm` requests a minute, bursts of up to `rpm`."""

    def __init__(self, rpm: float):
        self.rate = rpm / 60.0
        self.burst = max(rpm, 1.0)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if allowed, else seconds until the next request would be."""
        with self.lock:
            t = time.monotonic()
            level, last = self.buckets.get(key, (self.burst, t))
            level = min(self.burst, level + (t - last) * self.rate)
            if level >= 1:
                self.buckets[key] = (level - 1, t)
                return 0.0
            self.buckets[key] = (level, t)
            return (1 - level) / self.rate


@dataclass
class TurnRequest:
    """One turn as every API asks for it, once its own request shape is parsed."""

    prompt: list[int]  # the rendered prompt's tokens
    messages: list[dict] | None  # what the prompt renders (the agent's history after the turn); None: a raw completion
    max_tokens: int
    clamped: int | None = None  # the max_tokens asked for, when more than the context leaves
    temperature: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    tools_mode: str | None = None  # how tools were rendered: "template", "generic", "compact", or None (no tools)
    grammar: str | None = None  # a Lark grammar the reply must follow (server/grammar.py)
    n: int = 1
    top_logprobs: int | None = None


def derived_name(value: str) -> str:
    """An identity from a body field or session header, as an agent name."""
    if is_agent_name(value):
        return value
    return "id-" + hashlib.sha256(value.encode()).hexdigest()[:24]


class TurnRun:
    """One turn on the scheduler, read from the event loop.

    A thread drains the handle's (blocking) stream into an asyncio queue. Stop
    strings are applied here: text that could be the start of one is held back,
    and once one appears the turn is cancelled and the text cut before it."""

    def __init__(self, state: "ServerState", agent: str, source: str, handle, max_tokens: int, stop: list[str], bytes_before: int,
                 main: bool = True):
        self.state = state
        self.main = main  # False: choice 1.. of `n`, a fork that holds no agent (`branches`)
        self.agent = agent
        self.source = source
        self.handle = handle
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.bytes_before = bytes_before
        self.need = 0  # bytes the ledger admitted this turn with
        self.saved: bool | None = None  # the turn's history is on disk (known once `settle` returned)
        self.text = ""
        self.stop_hit: str | None = None
        self.error: BaseException | None = None
        self.notes: dict = {}  # reported in x_agentcache: tools, max_tokens_clamped, ignored
        self.conversation = None  # what the prompt renders; remembered with the reply for anonymous agents
        self.tools_mode: str | None = None  # tools were offered: the reply may hold calls
        self.branches: list[TurnRun] = []  # the other choices of an `n` > 1 request
        self._sent = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()
        threading.Thread(target=self._pump, name=f"agentcache-http-{agent}", daemon=True).start()

    def _pump(self) -> None:
        error = None
        try:
            for piece in self.handle:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)
        except BaseException as e:  # the turn failed: reported to the client
            error = e
        self._loop.call_soon_threadsafe(self._ended_on_loop, error)

    def _ended_on_loop(self, error) -> None:
        """The turn is over (whether or not anyone still reads it)."""
        self.error = error
        self._queue.put_nowait(None)
        self._ended.set()
        if self.main:
            self.state.turn_ended(self)

    @property
    def stats(self):
        return self.handle.stats

    @property
    def choices(self) -> list["TurnRun"]:
        return [self, *self.branches]

    def cancel(self) -> None:
        if not self.handle.done:
            self.handle.cancel()

    async def pieces(self):
        """Text as it is generated, stop strings applied; ends when the turn ends.
        Closing it early (the client went away) cancels the turn."""
        hold = max((len(s) for s in self.stop), default=1) - 1
        try:
            while True:
                piece = await self._queue.get()
                if piece is None:
                    break
                if self.stop_hit is not None:
                    continue
                self.text += piece
                cut = [(self.text.find(s), s) for s in self.stop if s in self.text]
                if cut:
                    i, s = min(cut)
                    self.text, self.stop_hit = self.text[:i], s
                    self.cancel()
                safe = len(self.text) if self.stop_hit is not None else max(len(self.text) - hold, self._sent)
                if safe > self._sent:
                    out, self._sent = self.text[self._sent : safe], safe
                    yield out
            if self._sent < len(self.text):
                out, self._sent = self.text[self._sent :], len(self.text)
                yield out
        finally:
            if not self._ended.is_set():
                self.cancel()

    async def first(self) -> str | None:
        """Wait for the first piece of text (None if the turn ended without any)."""
        self._iter = self.pieces()
        try:
            return await self._iter.__anext__()
        except StopAsyncIteration:
            return None

    async def rest(self):
        """The rest of the reply; ends once it is saved (or failed to be)."""
        async for piece in self._iter:
            yield piece
        await self.settle()

    async def collect(self, request) -> str:
        """The whole reply, once it is saved (or failed to be); cancels the turn if
        the client goes away meanwhile."""
        text = await self.watching(request, _drain(self.pieces()))
        await self.settle()
        return text

    # -- what every API does with a reply: collect it, or stream it ------------------
    @property
    def failure(self) -> str:
        return f"the turn failed: {self.error}"

    async def reply(self, request) -> str:
        """The whole reply once saved (the answer to a request that does not stream);
        a 500 if the turn failed."""
        text = await self.collect(request)
        if self.error is not None:
            raise APIError(500, self.failure)
        return text

    async def opening(self, request) -> str | None:
        """The first piece of a streamed reply, awaited before the response starts so
        that a turn that fails before any text is still a plain 500."""
        first = await self.watching(request, self.first())
        if self.error is not None and first is None:
            raise APIError(500, self.failure)
        return first

    async def stream(self, first: str | None):
        """A streamed reply's text: `first`, then the rest as it comes; ends once saved."""
        if first:
            yield first
        async for piece in self.rest():
            yield piece

    def split(self, text: str) -> tuple[str, list[dict]]:
        """The reply's text and its tool calls ({id, name, arguments}); calls are
        parsed only when tools were offered."""
        return tl.parse_calls(text) if self.tools_mode else (text, [])

    async def settle(self) -> bool:
        """Wait until the turn's history is written (or failed to be): `saved`."""
        if not self.main:  # a fork: nothing of it is saved
            await self._ended.wait()
            return True
        if self.saved is None:
            await self._ended.wait()
            self.saved = await asyncio.to_thread(self.state.runtime.saved, self.agent)
            if not self.saved:
                self.state.save_failed(self.agent)
            if self.error is None and self.conversation is not None:
                c = self.conversation
                self.state.remember_anonymous(self.agent, c + self.text if isinstance(c, str) else c + [{"role": "assistant", "content": self.text}])
        return self.saved

    async def watching(self, request, coro):
        """Await `coro`; if the client disconnects meanwhile, cancel the turn."""
        task = asyncio.ensure_future(coro)
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    self.cancel()
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    @property
    def finish(self) -> str:
        """stop, length (max_tokens reached) or stop_sequence."""
        if self.stop_hit is not None:
            return "stop_sequence"
        if self.stats.generated_tokens >= self.max_tokens:
            return "length"
        return "stop"

    @property
    def bytes_read(self) -> int:
        return self.bytes_before if self.stats.tier == "warm" else 0

    def note(self, **notes) -> None:
        """Facts about the request worth telling the client; empty ones are left out."""
        self.notes.update({k: v for k, v in notes.items() if v})

    def info(self) -> dict:
        s = self.stats
        return {
            "agent": self.agent,
            "agent_source": self.source,
            "tier": s.tier,
            "restore_ms": round(s.load_ms, 3),
            "bytes_read": self.bytes_read,
            "cached_tokens": s.restored_tokens,
            "prefilled_tokens": s.prefilled_tokens,
            "generated_tokens": s.generated_tokens,
            "queue_ms": round(s.queue_ms, 3),
            "ttft_ms": round(s.ttft_ms, 3),
            "prefetched": s.prefetched,
            "saved": self.saved,
            **self.notes,
        }

    def headers(self) -> dict:
        s = self.stats
        out = {
            "x-agentcache-agent": self.agent,
            "x-agentcache-tier": s.tier,
            "x-agentcache-restore-ms": f"{s.load_ms:.3f}",
            "x-agentcache-bytes-read": str(self.bytes_read),
            "x-agentcache-cached-tokens": str(s.restored_tokens),
            **({} if self.saved is None else {"x-agentcache-saved": "true" if self.saved else "false"}),
        }
        clamp = self.notes.get("max_tokens_clamped")
        if clamp:
            out["x-agentcache-max-tokens"] = f"{clamp['granted']}; requested={clamp['requested']}"
        return out


async def _drain(gen) -> str:
    out = []
    async for piece in gen:
        out.append(piece)
    return "".join(out)


class ClientGone(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the request")


async def until_disconnect(request, coro):
    """Await `coro`, giving up (ClientGone) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


class Admission:
    """Waits, in order, until the residency ledger admits a turn (`Ledger.admit`: the turns
    in flight, the memory no eviction can free and this turn's reservation fit the cache
    budget). The arithmetic is the ledger's; this only parks requests on the event loop
    and wakes them when a turn ends."""

    def __init__(self):
        self._cond = asyncio.Condition()

    async def acquire(self, ledger, need: int) -> int:
        async with self._cond:
            await self._cond.wait_for(lambda: ledger.admit(need))
        return need

    def release(self, ledger, need: int) -> None:
        ledger.release(need)
        asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()


class ServerState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.runtime = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.resaver = Resaver(self.metrics)
        self.admission = Admission()
        self.inflight: dict[str, int] = {}
        self.runs: set[TurnRun] = set()
        self.agent_limiter = RateLimiter(config.agent_rpm) if config.agent_rpm else None
        self.global_limiter = RateLimiter(config.global_rpm) if config.global_rpm else None
        self.anon: OrderedDict[str, object] = OrderedDict()  # name -> messages list or text, LRU first
        self._anon_lock = threading.Lock()
        self._loader: threading.Thread | None = None

    # -- model -------------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="agentcache-model-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        from ..kvcache import kv_mode
        from ..runtime import Runtime

        try:
            kv_mode(self.config.kv)
            rt = Runtime(model=self.config.model, cache_dir=self.config.cache_dir, kv_bits=self.config.kv, mla_mode=self.config.mla,
                         max_tokens=self.config.default_max_tokens, temperature=self.config.temperature, seed=self.config.seed,
                         budget_bytes=self.config.budget_bytes)
            self._index_anonymous(rt)
            self.runtime = rt
            self.resaver.start(rt)
        except Exception as e:  # reported by /health and every route
            self.load_error = f"{type(e).__name__}: {e}"
        finally:
            import mlx.core as mx

            mx.synchronize()
            mx.clear_streams()  # this thread's MLX stream must not outlive it

    def rt(self):
        if self.runtime is not None:
            return self.runtime
        if self.load_error:
            raise APIError(500, f"the model failed to load: {self.load_error}")
        raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "2"})

    def close(self) -> None:
        if self._loader is not None:
            self._loader.join()
        for run in list(self.runs):
            run.cancel()
        if self.runtime is not None:
            self.runtime.close()
            self.resaver.close()

    def save_failed(self, agent: str) -> None:
        self.resaver.failed(agent)

    @property
    def model_names(self) -> list[str]:
        names = [self.config.model] + [a for a in self.config.aliases if a != self.config.model]
        if self.runtime is not None and self.runtime.model_name not in names:
            names.insert(1, self.runtime.model_name)
        return names

    def check_model(self, model) -> str:
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required (a string)", param="model")
        if model not in self.model_names:
            raise APIError(404, f"The model '{model}' does not exist here; this server runs {', '.join(self.model_names)}", code="model_not_found", param="model")
        return model

    # -- who is talking ------------------------------------------------------------
    def pick_agent(self, request, body: dict, conversation) -> tuple[str, str]:
        """(agent name, where the identity came from); see the module doc."""
        explicit = request.headers.get(AGENT_HEADER)
        if explicit is not None:
            if not is_agent_name(explicit):
                raise APIError(400, f"invalid X-Agent-Id {explicit!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit, without '..'",
                               code="invalid_agent_id")
            return explicit, "x-agent-id"
        meta = body.get("metadata")
        candidates = [("prompt_cache_key", body.get("prompt_cache_key")), ("user", body.get("user"))]
        candidates += [(h, request.headers.get(h)) for h in SESSION_HEADERS]  # a session is narrower than the user it belongs to
        candidates.append(("metadata.user_id", meta.get("user_id") if isinstance(meta, dict) else None))
        for source, value in candidates:
            if isinstance(value, str) and value:
                return derived_name(value), source
        return self._anonymous(conversation), "anonymous"

    def _index_anonymous(self, rt) -> None:
        for info in rt.agents():
            if info["name"].startswith(ANON_PREFIX):
                a = rt.agent(info["name"])
                self.anon[info["name"]] = ([{"role": "system", "content": a.system}] if a.system else []) + list(a.messages)

    def _anonymous(self, conversation) -> str:
        """The anonymous agent whose stored conversation is the longest prefix of this one."""
        with self._anon_lock:
            best, best_len = None, -1
            for name, stored in self.anon.items():
                if name in self.inflight or type(stored) is not type(conversation) or len(stored) >= len(conversation):
                    continue
                if conversation[: len(stored)] == stored and len(stored) > best_len:
                    best, best_len = name, len(stored)
            if best is None:
                best = ANON_PREFIX + uuid.uuid4().hex[:16]
            self.anon[best] = conversation  # claimed; updated when the turn ends
            self.anon.move_to_end(best)
            return best

    def _trim_anonymous(self) -> None:
        rt = self.runtime
        with self._anon_lock:
            extra = [n for n in self.anon if n not in self.inflight][: max(len(self.anon) - self.config.anon_agents, 0)]
            for n in extra:
                self.anon.pop(n)
        for n in extra:
            rt.delete(n)

    # -- turns -------------------------------------------------------------------------
    def limit(self, agent: str) -> None:
        for limiter, key, what in ((self.global_limiter, "*", "server"), (self.agent_limiter, agent, f"agent '{agent}'")):
            if limiter is None:
                continue
            wait = limiter.take(key)
            if wait > 0:
                self.metrics.rate_limited += 1
                raise APIError(429, f"rate limit of this {what} reached; retry in {math.ceil(wait)} s", code="rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait))})

    async def begin(self, request, body: dict, turn: TurnRequest, conversation, agent: tuple[str, str] | None = None, **notes) -> TurnRun:
        """What every API does once its request is parsed: pick the agent (unless
        `agent` = (name, source) is known), apply the rate limits, start the turn,
        and note what the client should know (x_agentcache)."""
        name, source = agent or self.pick_agent(request, body, conversation)
        self.limit(name)
        run = await self.start_turn(request, name, source, turn)
        run.conversation, run.tools_mode = conversation, turn.tools_mode
        run.note(tools=turn.tools_mode, max_tokens_clamped=turn.clamped and {"requested": turn.clamped, "granted": turn.max_tokens}, **notes)
        return run

    async def start_turn(self, request, agent: str, source: str, turn: TurnRequest) -> TurnRun:
        """Queue the turn on the scheduler once the residency ledger admits it; `n` > 1
        reserves room for each further choice's own tokens too."""
        t = turn
        rt = self.rt()
        scope = request.scope.get("agentcache.scope")
        if scope is not None and not agent.startswith(scope):
            raise APIError(403, f"this key may only use agents whose names start with {scope!r}; name one with X-Agent-Id", code="agent_out_of_scope")
        if agent in self.inflight:  # a second turn would start from the same history and overwrite the first one's
            raise APIError(409, f"agent '{agent}' is answering another request; retry when it is done", code="agent_busy",
                           headers={"Retry-After": "1"})
        self.inflight[agent] = 1  # before any await: anonymous matching and a second turn see it now
        need = 0
        try:
            constraint = None
            if t.grammar is not None:  # the first one builds the model's grammar tokenizer: off the event loop
                from .grammar import Constraint

                constraint = await asyncio.to_thread(Constraint, rt.runner, t.grammar)
            info = await asyncio.to_thread(rt.describe, agent)
            ledger = rt.pool.ledger
            want = max(ledger.turn_bytes(len(t.prompt), t.max_tokens), info.get("file_bytes") or 0) + (t.n - 1) * ledger.turn_bytes(1, t.max_tokens)
            need = await until_disconnect(request, self.admission.acquire(ledger, want))
            # In a thread: the turn may wait for another process's turn on the same agent (turnlock).
            h = await asyncio.to_thread(rt.agent(agent).submit_prompt, t.prompt, t.messages, max_tokens=t.max_tokens,
                                        temperature=t.temperature, seed=t.seed, stop=t.stop, tools=t.tools_mode == "template",
                                        constraint=constraint, n=t.n, top_logprobs=t.top_logprobs)
        except BaseException as e:
            self._release(agent, need)
            if isinstance(e, TurnBusyError):
                raise APIError(409, f"agent '{agent}' is in a turn in another process; retry later", code="agent_busy") from None
            if isinstance(e, ValueError):  # an option the runtime does not accept (limits.LimitError)
                raise APIError(400, str(e)) from None
            raise
        run = TurnRun(self, agent, source, h, t.max_tokens, list(t.stop), info.get("file_bytes", 0))
        run.need = need
        run.branches = [TurnRun(self, agent, source, b, t.max_tokens, list(t.stop), 0, main=False) for b in h.branches]
        self.runs.add(run)
        return run

    def _release(self, agent: str, need: int) -> None:
        n = self.inflight.get(agent, 1) - 1
        if n > 0:
            self.inflight[agent] = n
        else:
            self.inflight.pop(agent, None)
        if need:
            self.admission.release(self.runtime.pool.ledger, need)

    def turn_ended(self, run: TurnRun) -> None:
        self.runs.discard(run)
        self._release(run.agent, run.need)
        live = [(r.handle.t_submit + r.stats.ttft_ms / 1000, now()) for r in self.runs if r.stats.ttft_ms > 0]
        self.metrics.turn(run.stats, run.handle.t_submit, run.bytes_read, live)
        if run.agent.startswith(ANON_PREFIX):
            self._trim_anonymous()

    def remember_anonymous(self, agent: str, conversation) -> None:
        """After a turn: the anonymous agent's conversation now ends with the reply."""
        if agent.startswith(ANON_PREFIX):
            with self._anon_lock:
                self.anon[agent] = conversation
                self.anon.move_to_end(agent)

    def busy(self, agent: str) -> bool:
        return agent in self.inflight
