"""The Python API: a Runtime holds one model and many named agents.

    rt = Runtime()                       # default model, ~/.agentcache
    planner = rt.agent("planner", system="You plan.")
    reply = planner.chat("Plan a picnic.")
    print(reply.text, reply.stats.ttft_ms, reply.stats.tier)
    for piece in planner.stream("Shorter, please."):
        print(piece, end="")

Each turn renders the conversation with the model's chat template, reuses
the longest cached token prefix (hot in memory or restored from disk), and
prefills only what is new.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from . import cachefile
from .pool import NAME_RE, BlockPool, validate_agent_name
from .runner import ModelRunner

DEFAULT_MODEL = "smollm2-135m"


def default_home() -> Path:
    return Path(os.environ.get("AGENTCACHE_HOME") or Path.home() / ".agentcache").expanduser()


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class TurnStats:
    """What one turn cost and where its context came from."""

    ttft_ms: float = 0.0
    total_ms: float = 0.0
    restored_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    cache_tokens: int = 0
    cache_bytes: int = 0
    tier: str = "cold"
    decode_tokens_per_s: float = 0.0
    saved: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


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

    def _prepare(self, cache, prompt: list[int], stats: "TurnStats") -> list[int]:
        """Reuse what the cache (or a shared prefix) already holds; return the tokens left to prefill."""
        self.runtime.pool.adopt_prefix(cache, prompt)
        reuse = cache.reusable_prefix(prompt)
        cache.trim_to(reuse)
        stats.restored_tokens = reuse
        stats.prefilled_tokens = len(prompt) - reuse
        return prompt[reuse:]

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
        rt = self.runtime
        t0 = time.perf_counter()
        prompt = self.prompt_tokens(None, generation=False)
        cache, tier = rt.pool.checkout(self.name)
        stats = TurnStats(tier=tier)
        try:
            if prompt:
                rt.runner.prefill(self._prepare(cache, prompt, stats), cache)
        finally:
            self._checkin(cache, stats)
            stats.total_ms = stats.ttft_ms = (time.perf_counter() - t0) * 1000
            self.last_stats = stats
        return stats

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
        pieces = list(self.stream(text, **options))
        return Reply("".join(pieces), self.last_stats)

    def stream(
        self,
        text: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the reply in text pieces; `last_stats` is set when it ends."""
        rt = self.runtime
        max_tokens = rt.max_tokens if max_tokens is None else max_tokens
        temperature = rt.temperature if temperature is None else temperature
        key = mx.random.key(rt.seed if seed is None else seed)
        t0 = time.perf_counter()
        prompt = self.prompt_tokens(text)
        cache, tier = rt.pool.checkout(self.name)
        stats = TurnStats(tier=tier)
        out_tokens: list[int] = []
        detok = rt.runner.tokenizer.detokenizer
        detok.reset()
        try:
            logits = rt.runner.prefill(self._prepare(cache, prompt, stats), cache)
            for i in range(max_tokens):
                key, sub = mx.random.split(key)
                tok = rt.runner.sample(logits, temperature, sub)
                if i == 0:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1000
                    t_first = time.perf_counter()
                if tok in rt.runner.eos_ids:
                    break
                out_tokens.append(tok)
                detok.add_token(tok)
                if detok.last_segment:
                    yield detok.last_segment
                if i + 1 < max_tokens:
                    logits = rt.runner.decode([tok], [cache])[0]
            detok.finalize()
            if detok.last_segment:
                yield detok.last_segment
        finally:
            reply = rt.runner.tokenizer.decode(out_tokens)
            if out_tokens:
                stats.decode_tokens_per_s = (len(out_tokens) - 1) / max(time.perf_counter() - t_first, 1e-9)
            stats.generated_tokens = len(out_tokens)
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
            self._save_history()
            self._checkin(cache, stats)
            stats.total_ms = (time.perf_counter() - t0) * 1000
            self.last_stats = stats

    def _save_history(self) -> None:
        data = json.dumps({"name": self.name, "system": self.system, "messages": self.messages}, indent=1)
        try:
            cachefile.atomic_write(self._history_path, [data.encode()])
        except cachefile.CacheWriteError as e:
            _warn(f"warning: {e}")

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.messages = []
        self.runtime.pool.remove(self.name)
        self._history_path.unlink(missing_ok=True)


class Runtime:
    """One model, one cache directory, any number of named agents."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        kv_bits: int = 4,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        budget_bytes: int | None = None,
        home: str | Path | None = None,
        runner: ModelRunner | None = None,
    ):
        """`runner`: an already loaded model to use instead of loading `model`."""
        self.home = Path(home) if home else default_home()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.home
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.runner = runner or ModelRunner.load(model, self.home, kv_bits=kv_bits)
        self.model_name = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.pool = BlockPool(self.cache_dir, self.runner.fingerprint, self.runner.new_cache, budget_bytes, warn=_warn, model=model)
        self._agents: dict[str, Agent] = {}

    def agent(self, name: str, system: str | None = None) -> Agent:
        if name not in self._agents:
            self._agents[name] = Agent(self, name, system)
        elif system is not None:
            self._agents[name].system = system
        return self._agents[name]

    def flush(self) -> dict[str, str]:
        """Wait until every finished turn is on disk; returns {agent: error} for failed saves."""
        return self.pool.flush()

    def close(self) -> None:
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
