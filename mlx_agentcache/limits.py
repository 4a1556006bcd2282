"""The values a turn may ask for, checked once, before any model loads.

The command line, the Python API and workflow files share these checks so a
bad `max_tokens`, `temperature`, `seed` or cache budget gets the same one-line
`ValueError` everywhere, naming the option and the accepted range, instead of
failing (or silently doing nothing) deep inside a turn. The context check
compares a rendered prompt plus the tokens to generate with the model's
context length before prefill starts: a prompt that cannot fit is refused,
never truncated.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from typing import Callable, Iterable

MAX_TOKENS = 131072  # most tokens generated in one turn; the model's context bounds it further
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-4  # smaller ones sample greedily anyway; far smaller overflow float32 logits / temperature
MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed
MAX_BUDGET_BYTES = 1 << 50  # 1 PiB
MAX_CHOICES = 8  # replies sampled from one prompt (`n`): each is a row of the batch (scheduler.MAX_BATCH)
MAX_TOP_LOGPROBS = 20  # alternatives reported per token, as OpenAI allows

# A token covers at most as many characters as its longest vocabulary entry is long
# (byte-level BPE: one character per byte; SentencePiece: one per character); the
# factor leaves room for normalizers that merge characters.
CHARS_PER_TOKEN_SLACK = 2

# Keys a model config uses for its context length, in order of preference.
CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "max_seq_len", "seq_length", "n_positions", "n_ctx")

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_SIZE = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*")


class LimitError(ValueError):
    """A value outside what the runtime accepts; the message names it and the range."""


class ContextTooLong(LimitError):
    """A prompt (with the tokens to generate) that does not fit the model's context."""


def show(value: object, width: int = 40) -> str:
    """A short, one-line picture of a bad value for an error message."""
    if isinstance(value, (dict, list, tuple, set)):
        return {dict: "a mapping", list: "a list", tuple: "a list", set: "a set"}[type(value)]
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _integer(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise LimitError(f"{name} must be an integer between {low} and {high}, got {show(value)}")
    return int(value)


def max_tokens(value: object, name: str = "max_tokens") -> int:
    """Tokens to generate in one turn: 1..MAX_TOKENS."""
    return _integer(value, name, 1, MAX_TOKENS)


def choices(value: object, name: str = "n") -> int:
    """Replies to sample from one prompt: 1..MAX_CHOICES."""
    return _integer(value, name, 1, MAX_CHOICES)


def top_logprobs(value: object, name: str = "top_logprobs") -> int:
    """Most likely alternatives reported per token: 0..MAX_TOP_LOGPROBS."""
    return _integer(value, name, 0, MAX_TOP_LOGPROBS)


def seed(value: object, name: str = "seed") -> int:
    """Sampling seed: what `mx.random.key` accepts (0..2**64-1)."""
    return _integer(value, name, 0, MAX_SEED)


def temperature(value: object, name: str = "temperature") -> float:
    """0 (greedy), or a finite number in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        return float(value)
    raise LimitError(f"{name} must be 0 (greedy) or a number between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {show(value)}")


def budget_bytes(value: object, name: str = "cache budget") -> int | float | None:
    """Memory for hot caches: None (the default), a positive byte count up to
    1 PiB, or float('inf') from the Python API for no bound at all."""
    if value is None or value == math.inf:
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and 1 <= value <= MAX_BUDGET_BYTES:
        return int(value)
    raise LimitError(f"{name} must be between 1 byte and 1 PiB, got {show(value)}")


def parse_size(text: str | None, name: str = "--cache-budget") -> int | None:
    """'2GiB', '512MiB', '512MB', '1e9' -> bytes (None for no text); finite, positive, at most 1 PiB."""
    if text is None or not str(text).strip():
        return None
    m = _SIZE.fullmatch(str(text).lower())
    if not m:
        raise LimitError(f"{name} must be a size such as 2GiB, 512MiB or 1e9, got {show(text)}")
    number = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not math.isfinite(number) or not 1 <= number <= MAX_BUDGET_BYTES:
        raise LimitError(f"{name} must be between 1 byte and 1 PiB, got {show(text)}")
    return int(number)


def options(max_tokens_: object = None, temperature_: object = None, seed_: object = None) -> None:
    """Check the per-turn options that are given (None means 'use the default')."""
    if max_tokens_ is not None:
        max_tokens(max_tokens_)
    if temperature_ is not None:
        temperature(temperature_)
    if seed_ is not None:
        seed(seed_)


def context_length(config: dict) -> int | None:
    """The model's context length from its config (a nested `text_config` too), if it says."""
    for cfg in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = cfg.get(key) if isinstance(cfg, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_context(prompt: list[int], generate: int, context: int | None, agent: str = "") -> list[int]:
    """Refuse a prompt that, with `generate` more tokens, runs past `context`; returns the prompt."""
    if context is not None and len(prompt) + generate > context:
        who = f"agent '{agent}': " if agent else ""
        room = context - len(prompt)
        hint = (f"ask for at most {room} tokens (--max-tokens / max_tokens)" if room > 0
                else "shorten the message, or reset or rewrite the agent's history")
        raise ContextTooLong(f"{who}prompt of {len(prompt)} tokens plus {generate} to generate exceeds the model's context of {context} tokens; {hint}")
    return prompt


@functools.lru_cache(maxsize=16)
def max_token_chars(tokenizer) -> int | None:
    """Length of the tokenizer's longest vocabulary entry (None if it has no vocabulary)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, TypeError, NotImplementedError):
        return None
    return max((len(k) for k in vocab), default=None) if isinstance(vocab, dict) else None


def _chars(parts: Iterable[object]) -> int:
    """Characters in strings and in messages' string `content`."""
    total = 0
    for p in parts:
        if isinstance(p, dict):
            p = p.get("content")
        if isinstance(p, str):
            total += len(p)
    return total


def _quiet_length_warning(tokenizer) -> None:
    """This check replaces transformers' one-time "sequence length is longer than the
    specified maximum" warning, which would print a second line beside our error."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the HF one
    warned = getattr(inner, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True


def fit_context(render: Callable[[], list[int]], parts: Iterable[object], generate: int, runner, agent: str = "") -> list[int]:
    """`render()` an agent's prompt and refuse it if, with `generate` more tokens, it
    cannot fit the model's context (`runner.config`). `parts` are what it is rendered
    from (system prompt, messages, new text): a history far too long for the context
    is refused from its length in characters, before spending seconds tokenizing it."""
    context = context_length(getattr(runner, "config", None) or {})
    if context is None:
        return render()
    _quiet_length_warning(runner.tokenizer)
    per_token = max_token_chars(runner.tokenizer)
    if per_token:
        chars = _chars(parts)
        least = chars // (per_token * CHARS_PER_TOKEN_SLACK)
        if least + generate > context:
            who = f"agent '{agent}': " if agent else ""
            raise ContextTooLong(
                f"{who}prompt of at least {least} tokens ({chars} characters) exceeds the model's context of "
                f"{context} tokens; shorten the message, or reset or rewrite the agent's history"
            )
    return check_context(render(), generate, context, agent)
