"""Cache cards: one agent's context handed to another without prefilling it again.

A `CacheCard` holds the keys and values (DeepSeek MLA: the latent) of a
token range of an agent's cache, each token at its own bit width
(bitalloc.py), with the token ids, their positions, the model fingerprint
and a readable header: source agent, created, tokens, average bits, hops.
It is one checked container file (store/container.py: CRC per tensor, of the
tensor table and of the metadata, atomic write) and needs nothing else.

    layers.<i>.<k|v>.w<b>.<j>   the tokens of layer i stored at b bits, in
                                token order: j = 0 codes, 1 scales, 2 biases
                                (affine groups of `group_size` along the head
                                dimension, as the cache's q4/q8 blocks);
                                b = 16: one fp16 tensor
    tokens, positions, widths   int32, int32, uint8: one per token

Sliding-window layers (Gemma 3) keep only the last `window` tokens of the
range: no later query can see the others.

Injection appends the tokens after the receiver's context. Keys carry RoPE
for the positions they were computed at; RoPE is a rotation, so moving a
key from position p to p + d is the same rotation again by d, applied with
the layer's own rope module of the model (its frequencies, scaling and
layout). For the MLA latent only the rope part (the last
`qk_rope_head_dim` values) rotates. The receiver's layers re-encode the
result in their own KV mode.

A card exported again after a hop is re-quantized only where the new budget
needs it: each token's previous width caps its new one (the receiver cannot
have more precision than it was given), so at the same budget every token
keeps its width. MLX's affine quantizer snaps a grid once when it quantizes
decoded values again (a few values move by one step); from then on a hop
reproduces the card exactly. `hops` counts the handoffs.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import bitalloc, limits
from .kvcache import AgentCache
from .store import container, numbers
from .store.container import CacheFileError

FORMAT = "agentcache-card"
CARD_VERSION = 1
WIDTHS = (2, 3, 4, 5, 6, 8, 16)
MODES = ("mixed", "uniform")
IMPORTANCE = ("energy", "flat")


class CardError(ValueError):
    """A card that cannot be made or used here; the message says why. Nothing was changed."""


@dataclass
class CacheCard:
    """A token range of one agent's cache, quantized per token (see module doc)."""

    header: dict
    tokens: list[int]
    widths: np.ndarray
    layers: list[dict]  # per layer: {"first": index of its first stored token, "k": {b: parts}, "v": {b: parts} | None}
    path: Path | None = None
    nbytes: int = 0  # file size once written or read
    _dense: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def first(self) -> int:
        """The position of the card's first token in the source agent."""
        return int(self.header["first"])

    @property
    def hops(self) -> int:
        return int(self.header["hops"])

    @property
    def avg_bits(self) -> float:
        return float(self.header["avg_bits"])

    def dense(self, i: int) -> tuple[mx.array, mx.array | None]:
        """Layer i's stored tokens as float16 (H, n_i, D) keys and values (None: a latent)."""
        layer = self.layers[i]
        sel = self.widths[layer["first"] :]
        g = int(self.header["group_size"])
        return _dequantize(layer["k"], sel, g), (None if layer["v"] is None else _dequantize(layer["v"], sel, g))

    def summary(self) -> dict:
        """What `agentcache card show` prints."""
        h = self.header
        counts = {str(b): int((self.widths == b).sum()) for b in WIDTHS if (self.widths == b).any()}
        return {
            "source": h.get("source"), "model": h.get("model"), "created": h.get("created"),
            "tokens": self.n, "bytes": self.nbytes, "avg_bits": round(self.avg_bits, 4), "budget": h.get("budget"),
            "hops": self.hops, "mode": h.get("mode"), "first_position": self.first, "widths": counts,
            "layers": len(self.layers), "messages": len(h.get("messages") or []), "path": str(self.path) if self.path else None,
        }


# -- quantization ----------------------------------------------------------------


def _quantize(x: mx.array, width: int, g: int) -> tuple:
    if width == 16:
        return (x.astype(mx.float16),)
    return tuple(mx.quantize(x.astype(mx.float16), group_size=g, bits=width))


def _dequantize(parts: dict, widths: np.ndarray, g: int) -> mx.array:
    """Per-width tensors back to one (H, n, D) float16 array in token order."""
    chunks, order = [], []
    for b, t in sorted(parts.items()):
        idx = np.nonzero(widths == b)[0]
        x = t[0] if b == 16 else mx.dequantize(*t, group_size=g, bits=b)
        chunks.append(x.astype(mx.float16))
        order.append(idx)
    if len(chunks) == 1:
        return chunks[0]
    x = mx.concatenate(chunks, axis=-2)
    inverse = np.argsort(np.concatenate(order), kind="stable")
    return x[..., mx.array(inverse.astype(np.int32)), :]


# -- RoPE ------------------------------------------------------------------------


def _attention_modules(runner) -> list:
    layers = getattr(runner.model, "layers", None)
    if layers is None:
        raise CardError("this model does not expose its layers; cards need each layer's RoPE")
    return [getattr(layer, "self_attn", None) or getattr(layer, "attention") for layer in layers]


def shift_keys(attn, keys: mx.array, delta: int) -> mx.array:
    """(H, n, D) keys computed at positions p moved to p + delta, with `attn`'s own RoPE."""
    if delta == 0:
        return keys
    rope = attn.rope
    H, n, D = keys.shape
    part = getattr(attn, "qk_rope_head_dim", None)  # DeepSeek: keys are [latent or nope part | rope part]
    x = keys.astype(mx.float32)
    head, tail = (x[..., : D - part], x[..., D - part :]) if part else (None, x)
    rows = tail.reshape(H * n, 1, tail.shape[-1])  # one position per row: every row turns by delta
    turned = rope(rows, offset=delta) / float(getattr(rope, "mscale", 1.0))  # YaRN scales its input
    turned = turned.reshape(H, n, tail.shape[-1])
    out = turned if head is None else mx.concatenate([head, turned], axis=-1)
    return out.astype(keys.dtype)


# -- export ------------------------------------------------------------------------


def _importance(dense: list[tuple[int, mx.array, mx.array | None]], n: int, kind: str) -> np.ndarray:
    """One score per token. "energy": per layer, each token's squared key and value norms over
    that layer's mean (an affine grid's error grows with its range, and attention
    logits with the key); summed over the layers that store it. "flat": all equal."""
    if kind == "flat":
        return np.ones(n)
    if kind != "energy":
        raise CardError(f"importance must be one of {IMPORTANCE}, got {kind!r}")
    score = np.zeros(n)
    for lo, k, v in dense:
        e = (k.astype(mx.float32) ** 2).sum(axis=(0, 2))
        if v is not None:
            e = e + (v.astype(mx.float32) ** 2).sum(axis=(0, 2))
        e = np.array(e)
        score[lo:] += e / max(float(e.mean()), 1e-12)
    return score


def _quantize_layers(dense: list, widths: np.ndarray, g: int) -> list[dict]:
    layers = []
    for lo, k, v in dense:
        sel = widths[lo:]
        parts = {"k": {}, "v": None if v is None else {}}
        for b in sorted(set(sel.tolist())):
            idx = mx.array(np.nonzero(sel == b)[0].astype(np.int32))
            parts["k"][b] = _quantize(k[..., idx, :], b, g)
            if v is not None:
                parts["v"][b] = _quantize(v[..., idx, :], b, g)
        layers.append({"first": lo, **parts})
    mx.eval([x for layer in layers for part in ("k", "v") if layer[part] for t in layer[part].values() for x in t])
    return layers


def export(
    cache: AgentCache,
    first: int,
    last: int,
    budget: float,
    source: str = "",
    hops: int = 1,
    cap: np.ndarray | None = None,
    mode: str = "mixed",
    importance: str = "energy",
    messages: list[dict] | None = None,
    protect_first: int = 4,
    protect_last: int = 16,
    model: str = "",
    fingerprint: str = "",
    levels: tuple[int, ...] = bitalloc.LEVELS,
) -> CacheCard:
    """Tokens [first, last) of `cache` as a card of at most `budget` average bits
    per stored value (every scale and bias counted). `cap`: previous widths of the
    tokens (a card re-exported after a hop)."""
    if mode not in MODES:
        raise CardError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= first < last <= cache.offset:
        raise CardError(f"token range [{first}, {last}) is not in the agent's context of {cache.offset} tokens")
    n = last - first
    dense, spans = [], []
    for i, layer in enumerate(cache.layers):
        lo = first if layer.window is None else max(first, last - layer.window)
        if lo < layer.start or last > layer.offset:
            raise CardError(f"layer {i} no longer holds positions [{lo}, {last}) (it keeps [{layer.start}, {layer.offset}))")
        k, v = layer.dense(lo, last)
        dense.append((lo - first, k, v))
        spans.append(lo - first)
    dims = {int(k.shape[-1]) for _, k, _ in dense} | {int(v.shape[-1]) for _, _, v in dense if v is not None}
    if len(dims) != 1:
        raise CardError(f"layers of different head sizes {sorted(dims)} are not supported")
    D = dims.pop()
    weights = np.zeros(n, dtype=np.int64)
    for lo, k, v in dense:
        weights[lo:] += int(k.shape[0]) + (0 if v is None else int(v.shape[0]))
    if mode == "uniform":
        width, g = bitalloc.uniform(budget, D)
        widths = np.full(n, width, dtype=np.int64)
        if cap is not None:
            widths = np.minimum(widths, np.asarray(cap))
        layers = _quantize_layers(dense, widths, g)
    else:
        g = bitalloc.GROUP_SIZE
        widths = bitalloc.allocate(_importance(dense, n, importance), budget, D, protect_first, protect_last, weights, cap, g, levels)
        layers = _quantize_layers(dense, widths, g)
    avg = bitalloc.bits_per_value(widths, D, g, weights)
    header = {
        "card_version": CARD_VERSION, "source": source, "model": model, "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokens": n, "first": first, "avg_bits": avg, "budget": budget, "hops": int(hops), "mode": mode,
        "importance": importance if mode == "mixed" else None, "levels": list(levels) if mode == "mixed" else None, "group_size": g, "head_dim": D,
        "layers": [{"first": lo, "heads": int(k.shape[0]), "values": v is not None} for lo, k, v in dense],
        "messages": messages or [],
    }
    return CacheCard(header, list(cache.tokens[first:last]), np.asarray(widths, dtype=np.int64), layers)


# -- file ------------------------------------------------------------------------


def _name(i: int, part: str, b: int, j: int) -> str:
    return f"layers.{i}.{part}.w{b}.{j}"


def write(card: CacheCard, path: Path | str, fingerprint: str) -> Path:
    """Write the card atomically as one checked file; returns its path."""
    path = Path(path)
    tensors = {
        "tokens": np.asarray(card.tokens, dtype=np.int32),
        "positions": np.arange(card.first, card.first + card.n, dtype=np.int32),
        "widths": card.widths.astype(np.uint8),
    }
    for i, layer in enumerate(card.layers):
        for part in ("k", "v"):
            for b, t in (layer[part] or {}).items():
                for j, x in enumerate(t):
                    tensors[_name(i, part, b, j)] = np.array(x, copy=False)
    meta = {"format": FORMAT, "fingerprint": fingerprint, "model": card.header.get("model") or "", "card": json.dumps(card.header)}
    container.write_tensors(path, tensors, meta)
    card.path, card.nbytes = path, path.stat().st_size
    return path


def _parse_header(path: Path, meta: dict) -> dict:
    try:
        h = json.loads(meta["card"])
        if not isinstance(h, dict) or h.get("card_version") != CARD_VERSION:
            raise ValueError(f"card version {h.get('card_version') if isinstance(h, dict) else '?'} (expected {CARD_VERSION})")
        n = numbers.count(h["tokens"], "tokens", 1, container.MAX_DIM)
        numbers.count(h["first"], "first", 0, container.MAX_DIM - n)
        numbers.count(h["hops"], "hops", 0, 1 << 20)
        numbers.real(h["avg_bits"], "avg_bits", 0, 16)
        numbers.count(h["group_size"], "group_size", 1, 1 << 16)
        numbers.count(h["head_dim"], "head_dim", 1, 1 << 16)
        if not isinstance(h["layers"], list):
            raise ValueError("no layer list")
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CacheFileError(f"{path.name}: not a usable cache card ({e})") from None
    return h


def read(path: Path | str, fingerprint: str | None = None, model: str = "") -> CacheCard:
    """Read and verify a card: every checksum, then its structure. With
    `fingerprint`, a card of another model is refused before its tensors are read."""
    path = Path(path)

    def same_model(meta: dict) -> None:
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            theirs = meta.get("model") or meta.get("fingerprint")
            raise CardError(f"{path.name} was made by another model ({theirs}); this agent runs {model or fingerprint}")

    if not path.exists():
        raise FileNotFoundError(f"no card at {path}")
    arrays, meta = container.read_arrays(path, (FORMAT,), same_model)
    h = _parse_header(path, meta)
    try:
        card = _build(h, arrays)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CacheFileError(f"{path.name}: card data inconsistent ({e})") from None
    card.path, card.nbytes = path, path.stat().st_size
    return card


def _build(h: dict, arrays: dict) -> CacheCard:
    tokens, positions, widths = arrays.pop("tokens"), arrays.pop("positions"), arrays.pop("widths")
    n, first, g, D = int(h["tokens"]), int(h["first"]), int(h["group_size"]), int(h["head_dim"])
    if tokens.shape != (n,) or positions.shape != (n,) or widths.shape != (n,) or tokens.dtype != mx.int32:
        raise ValueError("token, position and width lists disagree with the header")
    if n < 1 or positions.tolist() != list(range(first, first + n)):
        raise ValueError("positions are not the consecutive range the header names")
    w = np.array(widths).astype(np.int64)
    if not np.isin(w, WIDTHS).all() or g not in (32, 64, 128) or D % g:
        raise ValueError("unsupported widths or group size")
    layers = []
    for i, spec in enumerate(h["layers"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), bool):
            raise ValueError(f"layer {i} is not a layer description")
        lo, heads = numbers.count(spec["first"], f"layer {i} first", 0, n - 1), numbers.count(spec["heads"], f"layer {i} heads", 1, 1 << 16)
        sel = w[lo:]
        layer = {"first": lo, "k": {}, "v": {} if spec["values"] else None}
        for part in ("k", "v"):
            if layer[part] is None:
                continue
            for b in sorted(set(sel.tolist())):
                count = int((sel == b).sum())
                t = tuple(arrays.pop(_name(i, part, b, j)) for j in range(1 if b == 16 else 3))
                want = [(heads, count, D, mx.float16)] if b == 16 else [
                    (heads, count, D * b // 32, mx.uint32), (heads, count, D // g, mx.float16), (heads, count, D // g, mx.float16)]
                for x, (hh, c, d, dt) in zip(t, want):
                    if tuple(x.shape) != (hh, c, d) or x.dtype != dt:
                        raise ValueError(f"layer {i} {part} at {b} bits has shape {tuple(x.shape)}, expected {(hh, c, d)}")
                layer[part][b] = t
        layers.append(layer)
    if arrays:
        raise ValueError(f"unexpected tensors {sorted(arrays)[:3]}")
    return CacheCard(h, tokens.tolist(), w, layers)


# -- the receiver's history --------------------------------------------------------

_PAD = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


def continuation(tokenizer, messages: list[dict], system: str | None, generation: bool) -> list[int]:
    """Token ids of `messages` rendered by the chat template as they continue a
    conversation (after handed-over tokens): the rendering of a stand-in exchange
    plus the messages, less that of the exchange alone. `system`, when the
    context does not hold it yet, comes first; a template that takes a system
    prompt only at the very start (Gemma 3) gets it at the head of the next
    user message, where it would put it itself."""
    msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
    if not msgs and not generation:
        return []

    def render(m: list[dict], gen: bool) -> list[int]:
        pad = _PAD[:1] if m and m[0]["role"] == "assistant" else _PAD
        return list(tokenizer.apply_chat_template(pad + m, add_generation_prompt=gen, tokenize=True)), pad

    try:
        full, pad = render(msgs, generation)
    except Exception:
        if not system:
            raise
        rest = list(messages)
        if not rest:
            return continuation(tokenizer, [], None, generation)
        if rest[0]["role"] != "user":
            raise
        rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
        full, pad = render(rest, generation)
    head = list(tokenizer.apply_chat_template(pad, add_generation_prompt=False, tokenize=True))
    if full[: len(head)] != head:
        raise CardError("this chat template does not render a conversation as a continuation of its start")
    return full[len(head) :]


# -- inject ----------------------------------------------------------------------

_DIMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_dims(runner) -> list[tuple[int, int, bool]]:
    """(kv heads, head dim, has values) per layer of the model, read off a one-token fp16 prefill."""
    if runner not in _DIMS:
        cache = AgentCache([type(layer)(16, layer.window) for layer in runner.new_cache().layers])
        runner.prefill([0], cache, logits=False)
        dims = []
        for layer in cache.layers:
            k, v = layer.dense(0, 1)
            dims.append((int(k.shape[0]), int(k.shape[-1]), v is not None))
        _DIMS[runner] = dims
    return _DIMS[runner]


def inject(card: CacheCard, cache: AgentCache, runner) -> int:
    """Append the card's tokens after `cache`'s context, keys moved to their new
    positions; returns the position they start at. Everything is decoded and
    checked before the cache is touched."""
    at = cache.offset
    if any(layer.offset != at for layer in cache.layers):
        raise CardError("the receiving cache does not end on its token list")
    context = limits.context_length(runner.config)
    if context is not None and (card.first + card.n > context or at + card.n > context):
        raise CardError(f"the card's positions [{card.first}, {card.first + card.n}) moved to [{at}, {at + card.n}) do not fit this "
                        f"model's context of {context} tokens")
    if len(card.layers) != len(cache.layers):
        raise CardError(f"the card has {len(card.layers)} layers, this model {len(cache.layers)}")
    attn = _attention_modules(runner)
    dims = model_dims(runner)
    delta = at - card.first
    ready = []
    for i, (layer, spec) in enumerate(zip(cache.layers, card.layers)):
        k, v = card.dense(i)
        heads, dim, has_v = dims[i]
        if (int(k.shape[0]), int(k.shape[-1]), v is not None) != (heads, dim, has_v):
            raise CardError(f"layer {i} of the card holds {tuple(k.shape)} keys; this model stores {heads} heads of {dim}")
        want = card.n if layer.window is None else min(card.n, layer.window)
        if layer.window is None and spec["first"] != 0 or card.n - spec["first"] < want:
            raise CardError(f"layer {i} of the card holds too few tokens for this model")
        ready.append((shift_keys(attn[i], k, delta), v, at + spec["first"]))
    mx.eval([x for k, v, _ in ready for x in (k, v) if x is not None])
    for layer, (k, v, pos) in zip(cache.layers, ready):
        if pos > layer.offset:  # a window layer: what lies before its last `window` tokens is never read
            layer.skip_to(pos)
        layer.append_dense(k, v)
    cache.tokens.extend(card.tokens)
    cache.foreign_from = cache.own_tokens(at)
    mx.eval([(s.keys, s.values) for layer in cache.layers for s in layer.segments[-2:]])
    return at
