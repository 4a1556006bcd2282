"""The Python API: a Runtime holds one model and many named agents.

    rt = Runtime()                       # default model, ~/.agentcache
    planner = rt.agent("planner", system="You plan.")
    reply = planner.chat("Plan a picnic.")
    print(reply.text, reply.stats.ttft_ms, reply.stats.tier)
    for piece in planner.stream("Shorter, please."):
        print(piece, end="")
    h = rt.submit("critic", "Review the plan.")   # returns at once; turns batch
    print(h.wait(), h.stats.ttft_ms)

Each turn renders the conversation with the model's chat template, reuses
the longest cached token prefix (hot in memory or restored from disk), and
prefills only what is new. Every turn runs on the runtime's Scheduler
(scheduler.py), which batches concurrent agents' decoding and reloads warm
caches in the background.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import cards, catalog, limits
from .config import DEFAULT_KV, DEFAULT_MODEL, default_home, warn as _warn
from .models.runner import ModelRunner
from .pool import CachePool
from .scheduler import MAX_BATCH, Handle, Scheduler, Turn, TurnStats
from .store import container, history
from .store.container import CacheFileError, CacheWriteError
from .store.layout import Layout, validate_agent_name
from .store.workers import Writer
from .turnlock import TURN_WAIT_S, TurnBusyError, TurnLocks

__all__ = ["Runtime", "Agent", "Reply", "TurnStats", "Handle", "TurnBusyError"]

def _signature(path: Path) -> tuple | None:
    """Which version of a file is on disk (every save is a new file renamed over the old)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """`text` up to the first occurrence of any stop string (OpenAI's `stop`)."""
    ends = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return text[: min(ends)] if ends else text


@dataclass
class Reply:
    text: str
    stats: TurnStats


class Agent:
    """A named conversation with its own cache. Create through `Runtime.agent`."""

    def __init__(self, runtime: "Runtime", name: str, system: str | None):
        self.runtime = runtime
        self.name = validate_agent_name(name)
        self._history_path = Layout(runtime.cache_dir).history_file(name)
        self.messages: list[dict] = []
        self.context: dict | None = None  # tokens handed over by cache cards (see prompt_tokens, inject)
        self.system = system
        self.own_system = system is not None  # else the saved one, re-read with the history
        self._seen = _signature(self._history_path)  # the history file as this agent last read or wrote it
        saved = self._load_history()
        if saved is not None:
            self.messages = saved.get("messages", [])
            self.context = saved.get("context")
            self.system = system if system is not None else saved.get("system")
        self.last_stats: TurnStats | None = None

    # -- one turn at a time across processes (turnlock.py) ------------------------
    def _hold(self, reload: bool = True) -> None:
        """Take this agent's turn lock (shared with its turns queued here; waits for
        a turn of another process or runtime, else TurnBusyError). The first hold
        continues from the history on disk when someone else saved a newer one; the
        cache is then cut to it by the usual prefix reuse."""
        if self.runtime.turn_locks.hold(self.name) and reload:
            now = _signature(self._history_path)
            if now != self._seen:
                self._seen = now
                saved = self._load_history()
                self.messages = saved.get("messages", []) if saved else []
                self.context = saved.get("context") if saved else None
                if not self.own_system:
                    self.system = saved.get("system") if saved else None

    def _turn_ended(self, h: Handle | None = None) -> None:
        """Release the turn lock once this agent's history and cache are on disk (or failed to be)."""
        rt = self.runtime
        rt.turn_locks.release_after(self.name, lambda: (rt.histories.wait(self.name), rt.pool.flush(self.name)))

    def _load_history(self) -> dict | None:
        """The saved conversation; a damaged one is moved aside (one warning) and the agent starts anew."""
        try:
            return history.load(self._history_path)
        except history.HistoryError as e:
            try:
                moved = container.quarantine(self._history_path)
                where = f"moved to {moved.name}" if moved else "it is gone"
            except OSError as err:
                where = f"left in place (could not move it: {err.strerror or err})"
            _warn(f"warning: history of agent '{self.name}' not used ({e}); {where}; starting a new conversation")
            return None

    @property
    def tier(self) -> str:
        return self.runtime.pool.tier(self.name)

    def prompt_tokens(self, text: str | None, generation: bool = True) -> list[int]:
        """The conversation through the chat template. After a cache card was injected
        (`inject`): the handed-over token ids, then the later messages rendered as
        their continuation, so the cache's prefix reuse finds the card's tokens."""
        msgs = self.messages + ([{"role": "user", "content": text}] if text is not None else [])
        if self.context is None:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + msgs
            return list(self.runtime.runner.tokenizer.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=True))
        c = self.context
        system = None if c["system"] else self.system
        return c["tokens"] + cards.continuation(self.runtime.runner.tokenizer, msgs[c["covers"] :], system, generation)

    def extend(self, text: str | None = None, messages: list[dict] | None = None, role: str = "user") -> "TurnStats":
        """Append context for a later phase without generating (tool output, documents,
        another agent's notes). The cache grows by the new tokens only; the next
        phase that starts with this history reuses every cached block."""
        new = list(messages or []) + ([{"role": role, "content": text}] if text is not None else [])
        self._hold()
        try:
            self.messages += new
            self._save_history()
        except BaseException:
            self._turn_ended()
            raise
        return self._sync()

    def rewrite(self, messages: list[dict], system: str | None = None) -> "TurnStats":
        """Replace the history (a phase that summarises or edits it). The cache is
        cut at the first token that differs and only the rest is prefilled."""
        self._hold()
        try:
            if self.context is not None and (messages[: self.context["covers"]] != self.messages[: self.context["covers"]] or system not in (None, self.system)):
                self.context = None  # the handed-over tokens no longer lead the history
            self.messages = list(messages)
            if system is not None:
                self.system, self.own_system = system, True
            self._save_history()
        except BaseException:
            self._turn_ended()
            raise
        return self._sync()

    def _sync(self) -> "TurnStats":
        """Prefill the history into the cache without generating (a turn of 0 tokens).
        The caller holds the turn lock; the turn releases it."""
        fit = lambda: limits.fit_context(lambda: self.prompt_tokens(None, generation=False), [self.system, *self.messages], 0, self.runtime.runner, self.name)  # noqa: E731
        return self._prefill_turn(fit)

    def _prefill_turn(self, prompt, record=None) -> "TurnStats":
        """Run a turn that generates nothing and wait for it. The caller holds the turn
        lock; the turn releases it (also when it cannot be submitted)."""
        try:
            h = self.runtime.scheduler.submit(Turn(self.name, prompt, 0, record=record, ended=self._turn_ended))
        except BaseException:
            self._turn_ended()
            raise
        try:
            h.wait()
        finally:
            h.stats.ttft_ms = h.stats.total_ms
            self.last_stats = h.stats
        return h.stats

    def chat(self, text: str, **options) -> Reply:
        h = self.submit(text, **options)
        try:
            return Reply(h.wait(), h.stats)
        finally:
            self.last_stats = h.stats

    def stream(
        self,
        text: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the reply in text pieces; `last_stats` is set when it ends.
        Closing the generator early cancels the turn (what was generated is kept)."""
        h = self.submit(text, max_tokens, temperature, seed)
        try:
            yield from h
        finally:
            if not h.done:
                h.cancel(wait=True)
            self.last_stats = h.stats

    def submit(
        self,
        text: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Handle:
        """Queue one turn on the runtime's scheduler and return its handle at once.
        The prompt is rendered when the turn starts, after this agent's earlier turns.
        Bad options, or a prompt that cannot fit the model's context, raise ValueError
        (limits.LimitError) here, before anything is queued. While another process or
        runtime runs a turn of this agent, this waits for it (turnlock.py; TurnBusyError
        after `Runtime(turn_wait=...)` seconds) and then continues its history."""
        rt = self.runtime
        limits.options(max_tokens, temperature, seed)
        n = rt.max_tokens if max_tokens is None else max_tokens
        fit = lambda: limits.fit_context(lambda: self.prompt_tokens(text), [self.system, text, *self.messages], n, rt.runner, self.name)  # noqa: E731
        self._hold()
        try:
            fit()  # now, and again when the turn starts: earlier queued turns may grow the history
            turn = Turn(
                self.name,
                fit,
                n,
                rt.temperature if temperature is None else temperature,
                rt.seed if seed is None else seed,
                record=lambda h: self._record(text, h),
                ended=self._turn_ended,
            )
            return rt.scheduler.submit(turn)
        except BaseException:
            self._turn_ended()
            raise

    def submit_prompt(
        self,
        prompt: list[int],
        messages: list[dict] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        tools: bool = False,
        constraint: object | None = None,
        n: int = 1,
        top_logprobs: int | None = None,
    ) -> Handle:
        """Queue a turn on a prompt the caller rendered (an HTTP client sends the
        whole conversation each time, so the request, not the stored history, is
        the truth). The cache keeps its longest common prefix with `prompt` and
        only the rest is prefilled. With `messages` (what `prompt` renders, a
        system message first if any) the history becomes them plus the reply, cut
        at the first of `stop`, and the cache is cut back to it as after `chat`
        (not when `tools` were rendered into the prompt: the history does not
        hold them); without, the history stays as it is (a raw text completion).
        `constraint` keeps the reply inside a grammar (server/grammar.Constraint).
        `n` > 1 samples that many replies from the one prefill (`Handle.branches`
        hold choices 1..n-1, seeds seed+1...; only choice 0 joins the history);
        `top_logprobs` (0 or more) records each token's log-probability (`Handle.logprobs`).
        Bad options or a prompt that cannot fit raise ValueError before anything is queued."""
        rt = self.runtime
        limits.options(max_tokens, temperature, seed)
        choices = limits.choices(n)
        if top_logprobs is not None:
            limits.top_logprobs(top_logprobs)
        n = rt.max_tokens if max_tokens is None else max_tokens
        limits.check_context(list(prompt), n, limits.context_length(rt.runner.config), self.name)
        self._hold(reload=False)  # the request is the history

        def record(h: Handle) -> list[int] | None:
            if messages is None:
                return None
            reply = cut_at_stop(h.text, stop)
            system = messages[0] if messages and messages[0].get("role") == "system" else None
            self.system, self.own_system = (system["content"] if system else None), True
            self.messages = [m for m in messages if m is not system] + [{"role": "assistant", "content": reply}]
            self.context = None  # the request is the history
            self._queue_history()
            return None if tools else self.prompt_tokens(None, generation=False)

        turn = Turn(
            self.name,
            list(prompt),
            n,
            rt.temperature if temperature is None else temperature,
            rt.seed if seed is None else seed,
            record=record,
            ended=self._turn_ended,
            constraint=constraint,
            n=choices,
            top_logprobs=top_logprobs,
        )
        try:
            return rt.scheduler.submit(turn)
        except BaseException:
            self._turn_ended()
            raise

    def _record(self, text: str, h: Handle) -> list[int]:
        """End of a turn (on the engine thread, no I/O): the exchange joins the
        conversation, its file is saved by the runtime's writer thread, and the
        cache is cut back to the rendered history (`Scheduler._cut_to_history`)."""
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": h.text}]
        self._queue_history()
        return self.prompt_tokens(None, generation=False)

    def _save_history(self) -> None:
        """Save the history now, on this thread (a pending background save is superseded)."""
        self.runtime.histories.cancel(self.name)
        try:
            history.write(self._history_path, self.name, self.system, self.messages, self.context)
            self._seen = _signature(self._history_path)
        except CacheWriteError as e:
            _warn(f"warning: {e}")

    def _queue_history(self) -> None:
        """Save the history on the runtime's writer thread (the latest state wins)."""
        path, name, system, messages, context = self._history_path, self.name, self.system, list(self.messages), self.context

        def save() -> None:
            history.write(path, name, system, messages, context)
            self._seen = _signature(path)

        self.runtime.histories.submit(name, save)

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.messages = []
        self.context = None
        self.runtime.scheduler.discard(self.name)
        self.runtime.pool.remove(self.name)
        self.runtime.histories.cancel(self.name)
        self._history_path.unlink(missing_ok=True)
        self._seen = None

    # -- cache cards (cards.py) ---------------------------------------------------------
    def _position(self, i: int) -> int:
        """Where message i starts in the rendered history (0: the very start)."""
        c = self.context
        if i == 0:
            return 0
        if c is None:
            return len(self.runtime.render(([{"role": "system", "content": self.system}] if self.system else []) + self.messages[:i], generation=False))
        if i <= c["covers"]:
            return c["marks"][i]
        tok = self.runtime.runner.tokenizer
        return len(c["tokens"]) + len(cards.continuation(tok, self.messages[c["covers"] : i], None if c["system"] else self.system, False))

    def _span(self, span: str | tuple[int, int]) -> tuple[int, int, list[dict]]:
        """Token positions [a, b) of a range of the history ("all", "last-turn" or
        messages (i, j)) and the agent's own messages in it."""
        end = len(self.prompt_tokens(None, generation=False)) if (self.messages or self.context) else 0
        if span == "all":
            return 0, end, list(self.messages)
        if span == "last-turn":
            users = [k for k, m in enumerate(self.messages) if m["role"] == "user"]
            if not users:
                raise cards.CardError(f"agent '{self.name}' has no turn to hand over")
            i, j = users[-1], len(self.messages)
        else:
            i, j = span
            if not 0 <= i < j <= len(self.messages):
                raise cards.CardError(f"message span [{i}, {j}) is not in agent '{self.name}''s {len(self.messages)} messages")
        return self._position(i), (end if j == len(self.messages) else self._position(j)), self.messages[i:j]

    def export_card(self, path: str | Path | None = None, bits: float = 4.0, span: str | tuple[int, int] = "all",
                    mode: str = "mixed", importance: str = "energy") -> "cards.CacheCard":
        """A cache card of a range of this agent's context at `bits` average bits per
        value (cards.py), written to `path` when given. Tokens that came from a card
        keep at most their width there, and the card counts one more hop."""
        rt = self.runtime
        out: dict = {}
        self._hold()
        try:
            a, b, msgs = self._span(span)
            if b <= a:
                raise cards.CardError(f"agent '{self.name}' has no context to hand over")
            cap = np.full(b - a, 16)
            hops = 0
            for e in (self.context or {}).get("cards", []):
                lo, hi = max(a, e["at"]), min(b, e["at"] + len(e["widths"]))
                if lo < hi:
                    cap[lo - a : hi - a] = e["widths"][lo - e["at"] : hi - e["at"]]
                    hops = max(hops, e["hops"])

            def record(h: Handle) -> None:
                out["card"] = cards.export(h.cache, a, b, bits, source=self.name, hops=hops + 1, cap=cap, mode=mode,
                                           importance=importance, messages=msgs, model=rt.model_name, fingerprint=rt.runner.fingerprint)
                return None

            h = rt.scheduler.submit(Turn(self.name, self.prompt_tokens(None, generation=False), 0, record=record, ended=self._turn_ended))
        except BaseException:
            self._turn_ended()
            raise
        h.wait()
        card = out["card"]
        if path is not None:
            cards.write(card, path, rt.runner.fingerprint)
        return card

    def inject(self, card: "cards.CacheCard | str | Path") -> TurnStats:
        """Append a cache card's tokens after this agent's context (a new agent: at
        its start, its own system prompt following). The next turn reuses them
        (`restored_tokens`) and prefills only its own message. A card of another
        model, or a damaged one, is refused and nothing changes."""
        rt = self.runtime
        if not isinstance(card, cards.CacheCard):
            card = cards.read(card, rt.runner.fingerprint, rt.model_name)
        elif card.header.get("fingerprint") != rt.runner.fingerprint:
            raise cards.CardError(f"the card was made by another model ({card.header.get('model') or card.header.get('fingerprint')}); this agent runs {rt.model_name}")
        self._hold()
        try:
            old = self.context
            here = self.prompt_tokens(None, generation=False) if (self.messages or old) else []
            limits.check_context(here + card.tokens, 1, limits.context_length(rt.runner.config), self.name)
            marks = [self._position(k) for k in range(len(self.messages))] + [len(here)]
            consumed = (old["system"] or (self.system is not None and len(here) > len(old["tokens"]))) if old else bool(self.messages)

            def record(h: Handle) -> None:
                at = cards.inject(card, h.cache, rt.runner)
                entry = {"at": at, "hops": card.hops, "widths": card.widths.tolist(), "source": card.header.get("source"),
                         "messages": card.header.get("messages") or []}
                self.context = {"tokens": here + card.tokens, "covers": len(self.messages), "system": consumed, "marks": marks,
                                "cards": (old["cards"] if old else []) + [entry]}
                self._queue_history()
                return None
        except BaseException:
            self._turn_ended()
            raise
        return self._prefill_turn(here, record)


class Runtime:
    """One model, one cache directory, any number of named agents."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        kv_bits: int | str = DEFAULT_KV,
        mla_mode: str = "latent",
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        budget_bytes: int | None = None,
        home: str | Path | None = None,
        runner: ModelRunner | None = None,
        max_batch: int = MAX_BATCH,
        turn_wait: float = TURN_WAIT_S,
    ):
        """`kv_bits`: a mode name of kvcache.KV_MODES (default "q4c") or 4, 8, 16;
        `mla_mode`: DeepSeek-V2's cache, "latent" or "full" (see mla.py);
        `runner`: an already loaded model to use instead of loading `model`;
        `turn_wait`: seconds a turn waits for a turn of the same agent in another
        process or runtime before it fails with TurnBusyError (turnlock.py)."""
        limits.options(max_tokens, temperature, seed)  # before the model loads
        budget_bytes = limits.budget_bytes(budget_bytes)
        self.home = Path(home) if home else default_home()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.home
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.runner = runner or ModelRunner.load(model, self.home, kv_bits=kv_bits, mla_mode=mla_mode)
        self.model_name = model if runner is None else (runner.path.name if runner.path else "custom")
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.pool = CachePool(self.cache_dir, self.runner.fingerprint, self.runner.new_cache, budget_bytes, warn=_warn, model=self.model_name)
        self.histories = Writer(_warn, lambda name, e: f"warning: {getattr(e, 'strerror', None) or e}", name="agentcache-history")
        self.turn_locks = TurnLocks(Layout(self.cache_dir).turn_lock_file, turn_wait)
        self._agents: dict[str, Agent] = {}
        self.scheduler = Scheduler(self.runner, self.pool, max_batch)

    def agent(self, name: str, system: str | None = None) -> Agent:
        if name not in self._agents:
            self._agents[name] = Agent(self, name, system)
        elif system is not None:
            self._agents[name].system, self._agents[name].own_system = system, True
        return self._agents[name]

    def submit(self, agent: str, text: str, **options) -> Handle:
        """One turn for `agent` (created if new); turns of different agents run batched."""
        return self.agent(agent).submit(text, **options)

    def prefetch(self, agent: str) -> bool:
        """Hint that `agent` speaks next: start reading its cache from disk now."""
        return self.scheduler.prefetch(agent)

    def flush(self) -> dict[str, str]:
        """Wait until every finished turn is on disk (caches and histories);
        returns {agent: error} for failed saves."""
        self.histories.wait()
        return {**self.histories.errors(), **self.pool.flush()}

    def saved(self, name: str) -> bool:
        """Whether the agent's conversation is on disk as memory holds it (waits for
        its pending history write). The history is the durable record of a turn:
        a cache can always be rebuilt from it."""
        self.histories.wait(name)
        return not self.histories.errors(name)

    def unsaved(self) -> dict[str, str]:
        """{agent: last error} of agents whose memory is newer than their files: a
        history or a cache whose save failed. `retry_saves` writes them again."""
        out = {n: e for n, e in self.pool.save_errors().items()}
        out.update({n: e for n, e in self.histories.errors().items() if n in self._agents})
        return out

    def retry_saves(self, wait: bool = False) -> dict[str, str]:
        """Queue a new save of every unsaved agent (history and cache); with `wait`,
        until the writes are done. Returns what is still unsaved."""
        for name in list(self.histories.errors()):
            agent = self._agents.get(name)
            if agent is not None:
                agent._queue_history()
        self.pool.retry_saves()
        if wait:
            self.histories.wait()
            self.pool.flush()
        return self.unsaved()

    def close(self) -> None:
        """Finish queued turns, then pending saves."""
        self.scheduler.close()
        self.histories.wait()
        self.pool.close()
        self.turn_locks.wait()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what a server needs: rendering, limits, per-agent cache control ----------
    def render(self, messages: list[dict], tools: list[dict] | None = None, generation: bool = True) -> list[int]:
        """Token ids of `messages` (system first if any) through the model's chat template."""
        kw = {"tools": tools} if tools else {}
        return list(self.runner.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, **kw))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no chat template)."""
        return list(self.runner.tokenizer.encode(text))

    @property
    def chat_template(self) -> str:
        """The model's chat template source ('' when it has none)."""
        t = getattr(self.runner.tokenizer, "chat_template", None)
        return t if isinstance(t, str) else ""

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus reply) the model takes."""
        return limits.context_length(self.runner.config) or int(getattr(self.runner.tokenizer, "model_max_length", 2048))

    def describe(self, name: str) -> dict:
        """One agent: tier, tokens, bytes, model and last use, without loading its tensors."""
        return self.pool.describe(validate_agent_name(name))

    def memory(self) -> dict:
        """Pool counters and state: hits by tier, bytes read and written, hot bytes, budget."""
        return self.pool.summary()

    def pin(self, name: str) -> dict:
        """Keep the agent's cache in memory: it is never evicted (a warm agent is
        kept once its next turn loads it). Pins last for this runtime's life.
        Raises pool.PinError when it has no cache yet or pinned agents would hold
        more than half the cache budget."""
        self.pool.pin(validate_agent_name(name))
        return self.pool.describe(name)

    def unpin(self, name: str) -> bool:
        """Let the agent be evicted again; False if it was not pinned."""
        return self.pool.unpin(validate_agent_name(name))

    def evict(self, name: str) -> bool:
        """Write an idle hot agent's cache to disk and free its memory (hot -> warm).
        False if it was not hot; raises CacheWriteError if it could not be saved,
        pool.PinError if it is pinned (unpin it first)."""
        return self.pool.evict(validate_agent_name(name), before=lambda: self.scheduler.discard(name))

    def delete(self, name: str) -> None:
        """Forget an agent: history, cache in memory and on disk. Raises OSError, and
        changes nothing, when its files cannot be removed (a read-only directory)."""
        a = self.agent(validate_agent_name(name))
        for p in (self.pool.path(name), a._history_path):
            if p.exists() and not os.access(p.parent, os.W_OK):
                raise OSError(errno.EROFS, f"cannot remove {p.name}: its directory is not writable")
        a.reset()
        self._agents.pop(name, None)

    def drop_if_empty(self, name: str) -> None:
        """Forget an agent object that holds nothing (no messages, no context, no
        cache): what a refused first upload leaves behind."""
        a = self._agents.get(name)
        if a is not None and not a.messages and a.context is None and not self.pool.describe(name).get("tokens"):
            self.delete(name)

    def export_archive(self, name: str, out: str | Path) -> Path:
        """Write the agent's archive, its whole cache and history (as `agentcache agents export`), after pending saves."""
        self.flush()
        return catalog.export_archive(self.cache_dir, validate_agent_name(name), Path(out))

    def import_archive(self, archive: str | Path, name: str | None = None) -> str:
        """Install an agent archive as a new agent (as `agentcache agents import`); an agent
        of that name already here, or an archive made by another model, is refused and
        nothing changes."""
        if name is not None and self.pool.tier(validate_agent_name(name)) == "hot":
            raise FileExistsError(f"agent '{name}' already exists (delete it first, or pick another name)")
        try:
            got = catalog.import_archive(self.cache_dir, Path(archive), name, model=(self.runner.fingerprint, self.runner.new_cache().layers))
        except CacheFileError as e:  # damaged, truncated, or not an archive
            raise ValueError(str(e)) from e
        info = catalog.describe(self.cache_dir, got)
        if info.get("fingerprint") != self.runner.fingerprint:
            catalog.remove(self.cache_dir, got)
            raise ValueError(f"the archive was made by another model or cache mode ({info.get('model') or info.get('fingerprint')}), not {self.model_name}")
        self._agents.pop(got, None)  # its history is the archive's now
        return got

    def handoff(self, source: str, target: str, bits: float = 4.0, span: str | tuple[int, int] = "all", mode: str = "mixed") -> TurnStats:
        """Hand `source`'s context (or a range of it) to `target` as a cache card
        (cards.py): no file, no re-prefill. Returns the injection's stats."""
        return self.agent(target).inject(self.agent(source).export_card(bits=bits, span=span, mode=mode))

    def agents(self) -> list[dict]:
        """Every agent known in the cache directory, with tier, tokens and bytes."""
        listed = {i["name"]: i for i in catalog.listing(self.cache_dir)}
        names = set(listed) | set(self.pool.known()) | set(self._agents)
        return [self.pool.describe(n, listed.get(n)) for n in sorted(names)]
