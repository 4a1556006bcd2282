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

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import cachefile
from .kvcache import AgentCache
from .pool import NAME_RE, BlockPool, validate_agent_name
from .runner import ModelRunner
from .scheduler import MAX_BATCH, Handle, Scheduler, Turn, TurnStats

__all__ = ["Runtime", "Agent", "Reply", "TurnStats", "Handle"]

DEFAULT_MODEL = "smollm2-135m"


def default_home() -> Path:
    return Path(os.environ.get("AGENTCACHE_HOME") or Path.home() / ".agentcache").expanduser()


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Reply:
    text: str
    stats: TurnStats


class Agent:
    """A named conversation with its own cache. Create through `Runtime.agent`."""

    def __init__(self, runtime: "Runtime", name: str, system: str | None):
        self.runtime = runtime
        self.name = validate_agent_name(name)
        self._history_path = runtime.cache_dir / f"{name}.json"
        self.messages: list[dict] = []
        self.system = system
        if self._history_path.exists():
            saved = json.loads(self._history_path.read_text())
            self.messages = saved.get("messages", [])
            self.system = system if system is not None else saved.get("system")
        self.last_stats: TurnStats | None = None

    @property
    def tier(self) -> str:
        return self.runtime.pool.tier(self.name)

    def prompt_tokens(self, text: str | None, generation: bool = True) -> list[int]:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        if text is not None:
            msgs = msgs + [{"role": "user", "content": text}]
        return list(self.runtime.runner.tokenizer.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=True))

    def extend(self, text: str | None = None, messages: list[dict] | None = None, role: str = "user") -> "TurnStats":
        """Append context for a later phase without generating (tool output, documents,
        another agent's notes). The cache grows by the new tokens only; the next
        phase that starts with this history reuses every cached block."""
        new = list(messages or []) + ([{"role": role, "content": text}] if text is not None else [])
        self.messages += new
        self._save_history()
        return self._sync()

    def rewrite(self, messages: list[dict], system: str | None = None) -> "TurnStats":
        """Replace the history (a phase that summarises or edits it). The cache is
        cut at the first token that differs and only the rest is prefilled."""
        self.messages = list(messages)
        if system is not None:
            self.system = system
        self._save_history()
        return self._sync()

    def _sync(self) -> "TurnStats":
        """Prefill the history into the cache without generating (a turn of 0 tokens)."""
        h = self.runtime.scheduler.submit(
            Turn(self.name, lambda: self.prompt_tokens(None, generation=False), max_tokens=0, finish=lambda h, cache: self._checkin(cache, h.stats))
        )
        try:
            h.wait()
        finally:
            h.stats.ttft_ms = h.stats.total_ms
            self.last_stats = h.stats
        return h.stats

    def _checkin(self, cache, stats: "TurnStats") -> None:
        rt = self.runtime
        try:
            rt.pool.checkin(self.name, cache)
        except cachefile.CacheWriteError as e:
            stats.saved = False
            rt.pool.checkin(self.name, cache, persist=False)
            _warn(f"warning: {e}; agent '{self.name}' stays in memory only")
        stats.cache_tokens = cache.offset
        stats.cache_bytes = cache.nbytes

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
        The prompt is rendered when the turn starts, after this agent's earlier turns."""
        rt = self.runtime
        turn = Turn(
            self.name,
            lambda: self.prompt_tokens(text),
            rt.max_tokens if max_tokens is None else max_tokens,
            rt.temperature if temperature is None else temperature,
            rt.seed if seed is None else seed,
            finish=lambda h, cache: self._finish_turn(text, h, cache),
        )
        return rt.scheduler.submit(turn)

    def _finish_turn(self, text: str, h: Handle, cache: AgentCache) -> None:
        """End of a turn (on the engine thread): record it in the history, return the cache."""
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": h.text}]
        self._save_history()
        h.stats.aligned_tokens = self._align(cache)
        self._checkin(cache, h.stats)

    def _align(self, cache: AgentCache) -> int:
        """End the cache on the rendered history, which the next prompt starts with.

        The sampled reply and its rendering can differ at the end (the template
        closes the turn, trims whitespace, or the text re-tokenizes otherwise).
        Fixing that now, while sliding-window layers still hold their slack in
        memory, means a cache restored from disk (which keeps only `window`
        tokens of such a layer and so cannot be cut back) is reused whole.
        Returns the tokens prefilled to get there."""
        tokens = self.prompt_tokens(None, generation=False)
        n = cache.common_prefix(tokens)
        if n == cache.offset == len(tokens) or not cache.can_trim_to(n):
            return 0
        cache.trim_to(n)
        if n < len(tokens):
            self.runtime.runner.prefill(tokens[n:], cache, logits=False)
        return len(tokens) - n

    def _save_history(self) -> None:
        data = json.dumps({"name": self.name, "system": self.system, "messages": self.messages}, indent=1)
        try:
            cachefile.atomic_write(self._history_path, [data.encode()])
        except cachefile.CacheWriteError as e:
            _warn(f"warning: {e}")

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.messages = []
        self.runtime.scheduler.discard(self.name)
        self.runtime.pool.remove(self.name)
        self._history_path.unlink(missing_ok=True)


class Runtime:
    """One model, one cache directory, any number of named agents."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        kv_bits: int | str = 4,
        mla_mode: str = "latent",
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        budget_bytes: int | None = None,
        home: str | Path | None = None,
        runner: ModelRunner | None = None,
        max_batch: int = MAX_BATCH,
    ):
        """`kv_bits`: 4, 8, 16 or a mode name of kvcache.KV_MODES ("q4k");
        `mla_mode`: DeepSeek-V2's cache, "latent" or "full" (see mla.py);
        `runner`: an already loaded model to use instead of loading `model`."""
        self.home = Path(home) if home else default_home()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.home
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.runner = runner or ModelRunner.load(model, self.home, kv_bits=kv_bits, mla_mode=mla_mode)
        self.model_name = model if runner is None else (runner.path.name if runner.path else "custom")
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.pool = BlockPool(self.cache_dir, self.runner.fingerprint, self.runner.new_cache, budget_bytes, warn=_warn, model=self.model_name)
        self._agents: dict[str, Agent] = {}
        self.scheduler = Scheduler(self.runner, self.pool, max_batch)

    def agent(self, name: str, system: str | None = None) -> Agent:
        if name not in self._agents:
            self._agents[name] = Agent(self, name, system)
        elif system is not None:
            self._agents[name].system = system
        return self._agents[name]

    def submit(self, agent: str, text: str, **options) -> Handle:
        """One turn for `agent` (created if new); turns of different agents run batched."""
        return self.agent(agent).submit(text, **options)

    def prefetch(self, agent: str) -> bool:
        """Hint that `agent` speaks next: start reading its cache from disk now."""
        return self.scheduler.prefetch(agent)

    def flush(self) -> dict[str, str]:
        """Wait until every finished turn is on disk; returns {agent: error} for failed saves."""
        return self.pool.flush()

    def close(self) -> None:
        """Finish queued turns, then pending saves."""
        self.scheduler.close()
        self.pool.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def agents(self) -> list[dict]:
        """Every agent known in the cache directory, with tier, tokens and bytes."""
        names = set(self.pool.known()) | set(self._agents)
        names |= {p.stem for p in self.cache_dir.glob("*.json") if NAME_RE.match(p.stem)}
        return [self.pool.describe(n) for n in sorted(names)]
