"""Batched multi-agent scheduler: many agents' turns on one model at once.

One engine thread owns all model compute. Each loop it admits queued turns,
runs one prefill chunk of a newcomer, and one batched decode step over every
running agent (`ModelRunner.decode` stacks the agents' Q4 caches without
padding). A newcomer's prefill is cut into chunks that alternate with decode
steps, so agents already streaming keep streaming.

An agent whose cache is on disk (warm) is read by a loader thread: file read,
CRC checks and building the arrays all release the GIL, so the read hides
behind the batch's decode steps; the agent joins the batch when its blocks
are in memory. `prefetch(name)` starts that read before the turn is even
submitted (the caller knows who speaks next).

A turn ends in one place (`_finish`): the reply is handed to the turn's
`record` (the agent's conversation, in memory), the cache is cut back to
where it still matches the rendered history when `record` returns it,
returned to the pool, and the handle gets its result.
Files are written by the pool's and the runtime's writer threads, never on
the engine thread.

Each turn streams into its own unbounded queue: a slow reader never stalls
the engine or the other agents. Sampling uses one key per turn, split once
per token exactly as a lone turn does, so a batched agent samples the same
tokens it would alone (greedy and seeded). See docs/scheduler.md.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

import mlx.core as mx

from .kvcache import AgentCache
from .store.container import CacheWriteError
from .store.workers import Reader, Result

MAX_BATCH = 8
PREFILL_CHUNK = 256  # tokens per prefill slice between two decode steps
MAX_PREFETCH = 2  # prefetched caches kept waiting for their turn
_END = object()
_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """MLX gives each thread its own stream; one still alive at exit aborts the
    process, so engine threads stop (cancelling their turns) before that."""
    for s in list(_LIVE):
        s.close(cancel=True)


@dataclass
class TurnStats:
    """What one turn cost and where its context came from."""

    ttft_ms: float = 0.0  # submit to first token: queueing, loading and prefill included
    total_ms: float = 0.0
    restored_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    cache_tokens: int = 0
    cache_bytes: int = 0
    tier: str = "cold"
    decode_tokens_per_s: float = 0.0
    saved: bool = True
    queue_ms: float = 0.0  # submit to admission into the batch (includes a reload)
    load_ms: float = 0.0  # reading the cache file, if the agent was warm
    prefetched: bool = False  # the reload had started before the turn was submitted
    cancelled: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Turn:
    """What to run: `prompt` is rendered when the turn is admitted, after the
    agent's previous turn finished, so it sees that turn's reply.

    `record(handle)` runs on the engine thread when the turn ended with a
    reply (done or cancelled): it records the reply in memory, does no I/O,
    and returns the rendered history, which the next prompt starts with (the
    cache is cut back to its common prefix with it, `Scheduler._cut_to_history`),
    or None to leave the cache as it is.
    `ended(handle)` runs once when the turn is over, however it ended (the
    runtime releases the agent's turn lock after its saves); no I/O either.
    """

    agent: str
    prompt: list[int] | Callable[[], list[int]]
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    record: Callable[["Handle"], list[int] | None] | None = None
    ended: Callable[["Handle"], None] | None = None  # after the turn closed, however it ended (turnlock.py)
    constraint: object | None = None  # allowed(size) -> bool mask, advance(token), done, fork(): a grammar (server/grammar.py)
    n: int = 1  # replies to sample from the one prompt: the others are `Handle.branches`
    top_logprobs: int | None = None  # record each token's log-probability and this many alternatives (None: none)


class Handle:
    """A submitted turn: iterate for text pieces; `stats`, `text`, `cancel()`."""

    def __init__(self, turn: Turn):
        self.turn = turn
        self.agent = turn.agent
        self.status = "queued"  # queued, loading, prefill, decode, done, cancelled, failed
        self.stats = TurnStats()
        self.tokens: list[int] = []
        self.text = ""
        self.error: BaseException | None = None
        self.token_times: list[float] = []
        # (token, logprob, [(token, logprob), ...] most likely first) per token, when the turn asks for them
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.branches: list[Handle] = []  # choices 1..n-1: rows that fork this turn's cache after its prefill
        self.branch = False
        self.t_submit = time.perf_counter()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = False
        self._admitted = False
        self._wake: Callable[[], None] = lambda: None
        # engine-side state
        self.cache: AgentCache | None = None
        self.prompt: list[int] = []
        self._todo: list[int] = []
        self._key = None
        self._next = 0
        self._detok = None
        self._t_first = 0.0
        self._reused: int | None = None  # set once the pool readied the cache for the prompt

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the turn ended; returns the reply text (raises its error)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"turn of agent '{self.agent}' still running")
        if self.error is not None:
            raise self.error
        return self.text

    def cancel(self, wait: bool = False) -> None:
        """Stop the turn: a queued or loading turn never runs; a running one ends
        now with what it generated, and its cache goes back to the pool."""
        self._cancel = True
        self._wake()
        if wait:
            self._done.wait()


def _logprobs(logits: mx.array, tok: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """The sampled token's log-probability under the (grammar-masked) logits, and the `top` likeliest tokens'."""
    lp = logits - mx.logsumexp(logits)
    best = []
    if top > 0:
        idx = mx.argpartition(-lp, top - 1)[:top]
        vals = lp[idx]
        best = sorted(zip(idx.tolist(), vals.tolist()), key=lambda p: -p[1])
    return tok, float(lp[tok].item()), best


class Scheduler:
    """Runs turns of many agents on one runner and pool (see module doc).

    overlap=False reads warm caches on the engine thread (everything waits):
    the baseline the benchmark compares against.
    """

    def __init__(self, runner, pool, max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK, overlap: bool = True):
        self.runner = runner
        self.pool = pool
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.overlap = overlap
        self.timeline: deque[tuple] = deque(maxlen=200_000)  # (kind, agents, t0, t1)
        self._cv = threading.Condition()
        self._pending: deque[Handle] = deque()
        self._waiting: dict[str, Handle] = {}  # agent -> turn waiting for its load
        self._inflight: set[str] = set()  # loads under way
        self._ready: OrderedDict[str, tuple] = OrderedDict()  # agent -> (cache, tier, load_ms, prefetched)
        self._prefetched: set[str] = set()
        self._busy: set[str] = set()  # agents with a turn admitted
        self._prefill: deque[Handle] = deque()
        self._running: list[Handle] = []
        self._closed = False
        self._loader = Reader(self._loaded, name="agentcache-loader") if overlap else None
        self._thread = threading.Thread(target=self._run, name="agentcache-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # -- API -----------------------------------------------------------------
    def submit(self, turn: Turn) -> Handle:
        h = Handle(turn)
        h._wake = self._notify
        for i in range(1, turn.n):
            c = turn.constraint
            b = Handle(replace(turn, seed=(turn.seed + i) % 2**64, n=1, record=None, ended=None, constraint=c and c.fork()))
            b.branch, b._wake = True, self._notify
            h.branches.append(b)
        with self._cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._pending.append(h)
            self._cv.notify_all()
        return h

    def prefetch(self, name: str) -> bool:
        """Start reading a warm agent's cache now; True if a read was started."""
        if self._loader is None:
            return False
        with self._cv:
            if name in self._inflight or name in self._ready or name in self._busy or self.pool.tier(name) != "warm":
                return False
            self._inflight.add(name)
            self._prefetched.add(name)
        self._load(name)
        return True

    def discard(self, name: str) -> None:
        """Forget a prefetched cache of `name` (its agent was reset or removed)."""
        with self._cv:
            self._ready.pop(name, None)

    def close(self, cancel: bool = False) -> None:
        """Finish (or cancel) queued and running turns, give back prefetched caches, stop the threads."""
        with self._cv:
            self._closed = True
            if cancel:
                for h in [*self._pending, *self._waiting.values(), *self._prefill, *self._running]:
                    h._cancel = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self._loader is not None:
            self._loader.stop()
        for name in list(self._ready):
            self.pool.forget(name)  # unchanged since it was read: its file is current
        self._ready.clear()

    def idle(self) -> bool:
        with self._cv:
            return not (self._pending or self._waiting or self._prefill or self._running)

    # -- engine --------------------------------------------------------------
    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _load(self, name: str) -> None:
        """Read a warm agent's cache on the loader thread (the pool's lock is not held meanwhile)."""
        self._loader.submit(name, lambda: (time.perf_counter(), *self.pool.checkout(name), time.perf_counter()))

    def _loaded(self, r: Result) -> None:
        name = r.key
        if r.ok:
            t0, cache, tier, t1 = r.value
        else:  # the turn fails with the reason; the loader goes on
            t1 = time.perf_counter()
            t0, cache, tier = t1 - r.seconds, None, repr(r.error)
        self.timeline.append(("load", (name,), t0, t1))
        stale = []
        with self._cv:
            self._inflight.discard(name)
            self._ready[name] = (cache, tier, (t1 - t0) * 1000, name in self._prefetched)
            self._prefetched.discard(name)
            unclaimed = [n for n in self._ready if n not in self._waiting]
            stale = unclaimed[: max(len(unclaimed) - MAX_PREFETCH, 0)]  # oldest first
            for n in stale:
                self._ready.pop(n)
            self._cv.notify_all()
        for n in stale:
            self.pool.forget(n)  # read but never used: its file is current

    def _work(self) -> bool:
        if self._prefill or self._running or any(h._cancel for h in self._waiting.values()):
            return True
        if any(n in self._ready for n in self._waiting):
            return True
        return any(h.agent not in self._busy or h._cancel for h in self._pending) and self._slots() > 0

    def _slots(self) -> int:
        return self.max_batch - len(self._running) - len(self._prefill) - len(self._waiting)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            mx.synchronize()
            mx.clear_streams()  # this thread's MLX stream must not outlive it

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._work() or (self._closed and self.idle_locked()))
                if self._closed and self.idle_locked():
                    return
                admit, claimed = self._admit_locked()
            for h in admit:
                self._guard([h], self._start, h)
            for h, got in claimed:
                self._guard([h], self._begin, h, *got)
            self._drop_cancelled()
            if self._prefill:
                self._guard([self._prefill[0]], self._prefill_step, self._prefill[0])
            if self._running:
                self._guard(self._running, self._decode_step)

    def _guard(self, turns: list[Handle], step, *args) -> None:
        """Run one engine step; if it raises, only the turns in it fail."""
        try:
            step(*args)
        except Exception as e:
            for h in list(turns):
                if h in self._prefill:
                    self._prefill.remove(h)
                if h in self._running:
                    self._running.remove(h)
                if not h.done:
                    self._fail(h, e)

    def idle_locked(self) -> bool:
        return not (self._pending or self._waiting or self._prefill or self._running)

    def _admit_locked(self) -> tuple[list[Handle], list]:
        """Under the lock: turns to start now, and waiting turns whose cache arrived."""
        admit, keep = [], deque()
        for h in self._pending:
            if h._cancel:
                self._end(h, "cancelled")
            elif h.agent in self._busy or len(admit) >= self._slots():
                keep.append(h)
            else:
                self._busy.add(h.agent)
                h._admitted = True
                admit.append(h)
        self._pending = keep
        claimed = []
        for name in [n for n in self._waiting if n in self._ready]:
            claimed.append((self._waiting.pop(name), self._ready.pop(name)))
        return admit, claimed

    def _start(self, h: Handle) -> None:
        """Admitted: take its cache now (hot, cold, prefetched) or start reading it (warm)."""
        with self._cv:
            got = self._ready.pop(h.agent, None)
            if got is None and h.agent in self._inflight:
                self._waiting[h.agent] = h
                h.status = "loading"
                return
        if got is not None:
            return self._begin(h, *got)
        if self._loader is not None and self.pool.tier(h.agent) == "warm":
            with self._cv:
                self._inflight.add(h.agent)
                self._waiting[h.agent] = h
            h.status = "loading"
            self._load(h.agent)
            return
        t0 = time.perf_counter()
        cache, tier = self.pool.checkout(h.agent)
        t1 = time.perf_counter()
        if tier == "warm":
            self.timeline.append(("load", (h.agent,), t0, t1))
        self._begin(h, cache, tier, (t1 - t0) * 1000 if tier == "warm" else 0.0, False)

    def _begin(self, h: Handle, cache, tier: str, load_ms: float, prefetched: bool) -> None:
        """The cache is checked out: the pool readies it for the prompt, the rest is queued for prefill."""
        if cache is None:
            return self._fail(h, RuntimeError(f"could not load agent '{h.agent}': {tier}"))
        h.cache = cache
        h.stats.tier, h.stats.load_ms, h.stats.prefetched = tier, load_ms, prefetched
        h.stats.queue_ms = (time.perf_counter() - h.t_submit) * 1000
        if h._cancel:
            return self._end(h, "cancelled")
        try:
            prompt = h.turn.prompt() if callable(h.turn.prompt) else list(h.turn.prompt)
            h.cache, reuse = self.pool.begin_turn(h.agent, prompt, h.turn.max_tokens)
        except Exception as e:
            return self._fail(h, e)
        h._reused = reuse
        h.prompt, h._todo = prompt, prompt[reuse:]
        h.stats.restored_tokens, h.stats.prefilled_tokens = reuse, len(h._todo)
        h._key = mx.random.key(h.turn.seed)
        h._detok = self.runner.tokenizer.detokenizer
        h._detok.reset()
        if not h._todo:  # nothing to read (an empty history)
            return self._end(h, "done")
        h.status = "prefill"
        self._prefill.append(h)

    def _prefill_step(self, h: Handle) -> None:
        part, h._todo = h._todo[: self.prefill_chunk], h._todo[self.prefill_chunk :]
        t0 = time.perf_counter()
        logits = self.runner.prefill(part, h.cache, self.prefill_chunk, logits=not h._todo)
        self.timeline.append(("prefill", (h.agent,), t0, time.perf_counter()))
        if h._todo:
            return
        self._prefill.popleft()
        h.status = "decode"
        if h.turn.max_tokens <= 0:
            return self._end(h, "done")
        for b in h.branches:
            self._fork(h, b, logits)
        if self._emit(h, logits):
            self._running.append(h)

    def _fork(self, h: Handle, b: Handle, logits: mx.array) -> None:
        """Start choice `b` of turn `h` on a fork of its prefilled cache: the prompt
        is read once, and each choice decodes as a row of the batch."""
        if b._cancel:
            return self._end(b, "cancelled")
        b.cache, b.prompt, b.status = h.cache.fork(), h.prompt, "decode"
        b.stats.tier, b.stats.load_ms, b.stats.queue_ms = h.stats.tier, h.stats.load_ms, h.stats.queue_ms
        b.stats.restored_tokens, b.stats.prefilled_tokens = h.stats.restored_tokens, h.stats.prefilled_tokens
        b._key = mx.random.key(b.turn.seed)
        b._detok = self.runner.tokenizer.detokenizer
        b._detok.reset()
        if self._emit(b, logits):
            self._running.append(b)

    def _decode_step(self) -> None:
        batch = self._running
        t0 = time.perf_counter()
        logits = self.runner.decode([h._next for h in batch], [h.cache for h in batch])
        greedy = [h.turn.temperature <= 0 for h in batch]
        picks = mx.argmax(logits, axis=-1).tolist() if any(greedy) else None
        self.timeline.append(("decode", tuple(h.agent for h in batch), t0, time.perf_counter()))
        self._running = [h for i, h in enumerate(batch) if self._emit(h, logits[i], picks[i] if greedy[i] and h.turn.constraint is None else None)]

    def _emit(self, h: Handle, logits: mx.array, pick: int | None = None) -> bool:
        """Sample one token (within the turn's grammar, if any); stream it. False when the turn ended."""
        c = h.turn.constraint
        if c is not None:  # only this row's logits are masked: the batch's step is shared
            logits = mx.where(mx.array(c.allowed(logits.shape[-1])), logits, -mx.inf)
        if pick is not None:
            tok = pick
        elif h.turn.temperature <= 0:
            tok = int(mx.argmax(logits).item())
        else:
            h._key, sub = mx.random.split(h._key)
            tok = self.runner.sample(logits, h.turn.temperature, sub)
        now = time.perf_counter()
        if h._t_first == 0.0:
            h._t_first = now
            h.stats.ttft_ms = (now - h.t_submit) * 1000
        if tok in self.runner.eos_ids:
            self._end(h, "done")
            return False
        if h.turn.top_logprobs is not None:
            h.logprobs.append(_logprobs(logits, tok, h.turn.top_logprobs))
        h.tokens.append(tok)
        h.token_times.append(now)
        h._detok.add_token(tok)
        piece = h._detok.last_segment  # reading it consumes it
        if piece:
            h._queue.put(piece)
        if c is not None:
            c.advance(tok)
            if c.done:  # the grammar is complete: only an end of turn could follow
                self._end(h, "done")
                return False
        if len(h.tokens) >= h.turn.max_tokens:
            self._end(h, "done")
            return False
        if h._cancel:
            self._end(h, "cancelled")
            return False
        h._next = tok
        return True

    def _drop_cancelled(self) -> None:
        for h in [h for h in self._prefill if h._cancel]:
            self._prefill.remove(h)
            self._end(h, "cancelled")
        for h in [h for h in self._running if h._cancel]:
            self._running.remove(h)
            self._end(h, "cancelled")
        with self._cv:
            gone = [h for h in self._waiting.values() if h._cancel]
            for h in gone:
                del self._waiting[h.agent]
        for h in gone:  # its read goes on; the cache is handed back when it arrives
            self._prefetched.add(h.agent)
            self._end(h, "cancelled")

    def _end(self, h: Handle, status: str) -> None:
        self._finish(h, status)

    def _fail(self, h: Handle, e: BaseException) -> None:
        self._finish(h, "failed", e)

    def _finish(self, h: Handle, status: str, error: BaseException | None = None) -> None:
        """The one end of every turn: flush text and stats, let the turn record its
        reply, cut the cache back to it, return the cache to the pool, close the stream.

        A failed turn's cache goes back to the context it started from."""
        if h._detok is not None:
            h._detok.finalize()
            piece = h._detok.last_segment
            if piece:
                h._queue.put(piece)
        s = h.stats
        now = time.perf_counter()
        s.generated_tokens = len(h.tokens)
        s.cancelled = status == "cancelled"
        if len(h.tokens) > 1:
            s.decode_tokens_per_s = (len(h.tokens) - 1) / max(h.token_times[-1] - h._t_first, 1e-9)
        h.text = self.runner.tokenizer.decode(h.tokens) if h.tokens else ""
        h.error = error
        if h.branch:  # a fork of another turn's cache: nothing to record or give back
            if h.cache is not None:
                s.cache_tokens, s.cache_bytes = h.cache.offset, h.cache.nbytes
        elif h.cache is not None:
            try:
                if error is None and h._reused is not None:  # a turn that never started records nothing
                    target = h.turn.record(h) if h.turn.record is not None else None
                    if target is not None:
                        self._cut_to_history(h.cache, target)
                elif h._reused is not None:
                    h.cache.trim_to(h._reused)
            except Exception as e:
                if error is None:
                    h.error, status = e, "failed"
            self._return(h)
        s.total_ms = (now - h.t_submit) * 1000
        if h.error is not None:
            status = "failed"
        self._close(h, status)
        for b in h.branches:  # choices that never forked (the turn ended before its prefill did) end with it
            if b.status == "queued":
                b.stats.cancelled = status == "cancelled"
                b.error = h.error
                self._close(b, status)

    @staticmethod
    def _cut_to_history(cache: AgentCache, tokens: list[int]) -> None:
        """Cut the cache back to its common prefix with the rendered history, which
        the next prompt starts with.

        The sampled reply and its rendering can differ at the end (the template
        closes the turn, trims whitespace, or the text re-tokenizes otherwise).
        Cutting now, while sliding-window layers still hold their slack in
        memory, means a cache restored from disk (which keeps only `window`
        tokens of such a layer and so cannot be cut back) is reused whole. The
        rest of the history (the reply's last token, the template's closing
        tokens) is prefilled with the next message, in the same pass over the
        cache: a separate prefill here cost a second pass (0.6 s of a 2.5 s turn
        at 4K tokens on the 8B geometry, CPU)."""
        n = cache.common_prefix(tokens)
        if n < cache.offset and cache.can_trim_to(n):
            cache.trim_to(n)

    def _return(self, h: Handle) -> None:
        """Give the cache back to the pool; a save that failed at once keeps it in memory only."""
        s = h.stats
        try:
            self.pool.checkin(h.agent, h.cache)
        except CacheWriteError as e:
            s.saved = False
            self.pool.warn(f"warning: {e}; agent '{h.agent}' stays in memory only")
        except Exception as e:  # the file on disk is the last good state
            self.pool.forget(h.agent)
            if h.error is None:
                h.error = e
        s.cache_tokens, s.cache_bytes = h.cache.offset, h.cache.nbytes

    def _close(self, h: Handle, status: str) -> None:
        h.status = status
        h.cache = None
        with self._cv:
            if h._admitted:
                self._busy.discard(h.agent)
            self._cv.notify_all()
        h._queue.put(_END)
        h._done.set()
        if h.turn.ended is not None:
            try:
                h.turn.ended(h)
            except Exception as e:  # the turn is over; the engine goes on
                self.pool.warn(f"warning: after the turn of agent '{h.agent}': {e}")
