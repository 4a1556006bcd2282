"""An agent's KV cache as container tensors, and back.

Two kinds of file share the container (container.py):

* agent files (`FORMAT`): `tokens` (int32) and, per layer `i`,
  `layers.i.k.j` / `layers.i.v.j` (j = 0 packed codes, 1 fp16 scales,
  2 fp16 biases; one fp16 tensor for 16-bit caches; q4c values have codes
  and scales only). A q4c layer holds runs of several encodings (fp16
  the q4c body and the q8 tail, see kvcache.py): its span lists them
  as `runs` [[encoding, tokens], ...] and run r > 0 is stored under
  `layers.i.r.k.j`; its exact attention sinks (`sinks` in the span: how many)
  under `layers.i.sinks.k` / `.v` (fp16). `kv_mode` names the mode. Version 1 files
  (`FORMAT_V1`, modes fp16/q8/q4/q4k, one run per layer) still load. When the agent uses a
  shared prefix, `prefix` in the metadata names it and the layer tensors hold
  only the tokens after it.
* prefix block files (`BLOCK_FORMAT`, see prefixes.py): the same tensors for
  a run of full 256-token blocks that several agents start with, in the
  mode's body encoding (`kv_mode`; files without it are q4, q8 or fp16 by
  `kv_bits`); a q4c block holds the 4-bit body and the exact sinks.

Metadata adds the model fingerprint, the quantization parameters and each
layer's span. The tensor names are spelled here only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..kvcache import KV_MODES, AgentCache, LayerCache, Segment, StoredShape, kv_mode, slice_tokens
from ..q4 import BLOCK_TOKENS, GROUP_SIZE, KEY_GROUP, VALUE_GROUP
from . import formats, numbers, segments
from .container import MAX_DIM, CacheFileError, read_arrays, write_tensors
from .layout import Layout

ENCODINGS = ("fp16", "q8", "q4", "q4c")

FORMAT, FORMAT_V1, MANIFEST = formats.FORMAT, formats.FORMAT_V1, formats.MANIFEST
FORMATS = formats.AGENT_FORMATS
BLOCK_FORMAT = formats.BLOCK
ARCHIVE_KEYS = ("format", "fingerprint", "model", "kv_bits", "kv_keys", "kv_mode", "group_size", "block_tokens", "n_tokens", "extra")


def tensor_name(layer: int, part: str, j: int, run: int = 0) -> str:
    """`part` is "k" or "v"; `j` indexes the stored tuple (codes, scales, biases) or the fp16 tensor;
    `run` the layer's run of one encoding (q4c layers have several)."""
    return f"layers.{layer}.{part}.{j}" if run == 0 else f"layers.{layer}.{run}.{part}.{j}"


def sinks_name(layer: int, part: str) -> str:
    return f"layers.{layer}.sinks.{part}"


NAMES = (tensor_name, sinks_name)  # handed to segments.py, which keeps codec's tensor names


def layer_tensors(layers: list[LayerCache], first: Callable[[LayerCache], int]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Per-layer tensors from position `first(layer)` on, as numpy views of MLX memory."""
    out, spans, arrays = {}, [], []
    for i, layer in enumerate(layers):
        a = first(layer)
        runs = layer.stored_segments(a) if layer.offset > a else []
        has_v = any(v is not None for _, _, v in runs) or any(s.values is not None for s in layer.segments)
        span = {"start": a, "offset": layer.offset, "window": layer.window, "values": has_v}
        if layer.mode == "q4c":
            span["runs"] = [[e, int(k[0].shape[-2])] for e, k, _ in runs]
            if layer.sink_count and a == 0:
                span["sinks"] = layer.sink_count
                for part, x in zip("kv", layer.sinks):
                    arrays.append(x)
                    out[sinks_name(i, part)] = x
        spans.append(span)
        for r, (_, k, v) in enumerate(runs):
            for part, xs in (("k", k), ("v", v or ())):
                for j, x in enumerate(xs):
                    arrays.append(x)
                    out[tensor_name(i, part, j, r)] = x
    mx.eval(arrays)
    return {n: np.array(x, copy=False) for n, x in out.items()}, spans


def snapshot(cache: AgentCache, fingerprint: str, prefix: tuple[str, int] | None = None, extra: dict | None = None, model: str | None = None) -> tuple[dict, dict]:
    """Everything a save needs, taken now: (tensors, metadata).

    The tensors are views of the cache's current MLX buffers; MLX arrays are
    never changed in place below a segment's length, so a writer thread can
    checksum and write them while the agent goes on decoding.
    """
    n_prefix = prefix[1] if prefix else 0

    def first(layer: LayerCache) -> int:
        return n_prefix if prefix else layer.persisted_span()[0]

    tensors, spans = layer_tensors(cache.layers, first)
    tensors = {"tokens": np.asarray(cache.tokens, dtype=np.int32), **tensors}
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "model": model or "",
        "kv_bits": str(cache.layers[0].bits),
        "kv_mode": cache.layers[0].mode,
        "group_size": str(GROUP_SIZE),
        "block_tokens": str(BLOCK_TOKENS),
        "n_tokens": str(len(cache.tokens)),
        "layers": json.dumps(spans),
        "prefix": json.dumps({"hash": prefix[0], "tokens": n_prefix} if prefix else None),
        "extra": json.dumps(extra or {}),
    }
    if cache.layers[0].rotate_keys:  # q4k: keys are stored Hadamard-rotated (kvcache.rotate)
        meta["kv_keys"] = "hadamard"
    if cache.foreign_from is not None:
        meta["foreign_from"] = str(cache.foreign_from)
    return tensors, meta


def block_snapshot(layers: list[tuple[tuple, tuple | None, tuple | None]], tokens: list[int], fingerprint: str, mode: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a prefix block file holding `layers` (keys, values, q4c sinks) for `tokens`."""
    body = LayerCache(mode).encoding
    caches = [LayerCache.restore(mode, None, 0, len(tokens), (), None, runs=[(body, k, v)], sinks=s) for k, v, s in layers]
    tensors, spans = layer_tensors(caches, lambda layer: 0)
    meta = {
        "format": BLOCK_FORMAT,
        "fingerprint": fingerprint,
        "kv_bits": str(KV_MODES[mode][0]),
        "kv_mode": mode,
        "tokens": json.dumps(tokens),
        "layers": json.dumps(spans),
    }
    return tensors, meta


def save(path: Path, cache: AgentCache, fingerprint: str, extra: dict | None = None, prefix: tuple[str, int] | None = None, model: str | None = None) -> int:
    """Write `cache` to `path` atomically as one self-contained file (format 2: agent
    archives, tests); agents are saved as segments (`save_segments`). Returns bytes written.

    `prefix` = (hash, tokens): the first `tokens` positions live in that
    shared prefix block file and are not written here.
    """
    return write_tensors(path, *snapshot(cache, fingerprint, prefix, extra, model))


def save_segments(layout: Layout, agent: str, tensors: dict, meta: dict, changed: list[int] | None = None,
                  base: str | None = None) -> tuple[int, int, str]:
    """A snapshot written as the agent's new segment and manifest (segments.save):
    (bytes written, bytes of old segments deleted, generation)."""
    body = LayerCache(meta["kv_mode"]).encoding
    return segments.save(layout, agent, tensors, meta, changed, base, body, NAMES)


PrefixSource = Callable[[str, int, list[int]], list[tuple[Segment, tuple | None]]]  # per layer: shared segment, sinks


def load(path: Path, fingerprint: str, expect_layers: list[LayerCache] | None = None, prefix_source: PrefixSource | None = None,
         meta_out: dict | None = None) -> tuple[AgentCache, dict]:
    """Read, verify and rebuild an AgentCache. Raises CacheFileError on any doubt.
    A manifest's segments are read and joined first (segments.py); `meta_out` receives the
    file's metadata.

    `prefix_source(hash, n, tokens)` returns one (shared segment, sinks) per layer
    for a file that refers to a prefix block (see prefixes.py); without it the
    block file of the same cache directory is read.
    """
    path = Path(path)

    def same_model(meta: dict) -> None:
        if meta.get("fingerprint") != fingerprint:
            raise CacheFileError(f"{path.name}: cache was made by another model (fingerprint {meta.get('fingerprint')}, this model {fingerprint})")

    arrays, meta = read_arrays(path, FORMATS, same_model)
    if meta["format"] == MANIFEST:
        arrays, meta = segments.assemble(path, arrays, meta, fingerprint, NAMES)
    if meta_out is not None:
        meta_out.update(meta)
    try:
        spans = json.loads(meta["layers"])
        bits = numbers.count(meta["kv_bits"], "kv_bits", 1, 16)
        mode = meta.get("kv_mode") if meta["format"] != FORMAT_V1 else None
        extra = json.loads(meta.get("extra", "{}"))
        prefix = json.loads(meta.get("prefix", "null"))
        tokens = arrays.pop("tokens")
        if tokens.ndim != 1 or tokens.dtype != mx.int32:
            raise ValueError("token ids must be one int32 vector")
        tokens = tokens.tolist()
        foreign = meta.get("foreign_from")
        foreign = None if foreign is None else numbers.count(foreign, "foreign_from", 0, len(tokens))
        rotated = {"plain": False, "hadamard": True}[meta.get("kv_keys", "plain")]
        mode = mode or kv_mode(bits) + ("k" if rotated else "")
        if mode not in KV_MODES or KV_MODES[mode][:2] != (bits, rotated) or numbers.count(meta["group_size"], "group_size") != GROUP_SIZE:
            raise ValueError("unsupported quantization")
        spans = [_span(i, sp, len(tokens)) for i, sp in enumerate(spans if isinstance(spans, list) else [None])]
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise CacheFileError(f"{path.name}: malformed metadata ({e})") from None
    if expect_layers is not None and len(spans) != len(expect_layers):
        raise CacheFileError(f"{path.name}: {len(spans)} layers, model has {len(expect_layers)}")
    shared = None
    if prefix is not None:
        try:
            h, n = str(prefix["hash"]), numbers.count(prefix["tokens"], "prefix tokens", 1, len(tokens))
        except (KeyError, TypeError, ValueError):
            raise CacheFileError(f"{path.name}: malformed prefix reference") from None
        if not 0 < n <= len(tokens) or n % BLOCK_TOKENS:
            raise CacheFileError(f"{path.name}: prefix of {n} tokens does not fit the token list")
        if prefix_source is None:
            block = Layout(path.parent).block_file(h)
            if not block.exists():
                raise CacheFileError(f"{path.name}: shared prefix {h} is missing (no {block.relative_to(path.parent)})")
            body = LayerCache(mode).encoding
            shared = [(Segment(slice_tokens(k, 0, n), None if v is None else slice_tokens(v, 0, n), n, shared=True, encoding=body), s)
                      for k, v, s in read_block(block, fingerprint, mode, tokens[:n])]
        else:
            shared = prefix_source(h, n, tokens[:n])
    if expect_layers is not None and expect_layers and expect_layers[0].mode != mode:
        raise CacheFileError(f"{path.name}: stored with {mode} KV, runtime uses {expect_layers[0].mode}")
    layers = []
    try:
        for i, s in enumerate(spans):
            window = expect_layers[i].window if expect_layers is not None else s["window"]
            if window != s["window"] or s["offset"] != len(tokens):
                raise CacheFileError(f"{path.name}: layer {i} does not match the model or the token list")
            body = LayerCache(mode).encoding
            expect = expect_layers[i].expect if expect_layers is not None else None
            runs = []
            for r, (encoding, n) in enumerate(s.get("runs") or ([[body, None]] if (tensor_name(i, "k", 0) in arrays) else [])):
                if encoding not in ENCODINGS or (mode != "q4c" and encoding != body):
                    raise ValueError(f"run of encoding {encoding!r} in a {mode} cache")
                k = tuple(arrays.pop(tensor_name(i, "k", j, r)) for j in range(3) if tensor_name(i, "k", j, r) in arrays)
                v = tuple(arrays.pop(tensor_name(i, "v", j, r)) for j in range(3) if tensor_name(i, "v", j, r) in arrays)
                v = v if s["values"] else None
                _check_run(path, i, encoding, k, v, n, expect if encoding in (body, "q4") else None)
                if expect is not None:
                    _check_heads(path, i, encoding, k, v, expect, body)
                runs.append((encoding, k, v))
            sinks = _sinks(path, i, s, arrays, runs, mode)
            layers.append(_restore_layer(path, i, mode, window, s, runs, None if shared is None else shared[i], sinks))
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CacheFileError(f"{path.name}: layer data inconsistent ({e})") from None
    if arrays:
        raise CacheFileError(f"{path.name}: unexpected tensors {sorted(arrays)[:3]}")
    return AgentCache(layers, tokens, foreign), extra


def block_mode(meta: dict) -> str | None:
    """The KV mode of a prefix block file's metadata (None when it names none that exists)."""
    try:
        return kv_mode(meta.get("kv_mode") or meta.get("kv_bits", ""))
    except (ValueError, TypeError):
        return None


def read_block(path: Path, fingerprint: str, mode: str, tokens: list[int], expect: list[StoredShape | None] | None = None) -> list[tuple[tuple, tuple | None, tuple | None]]:
    """A prefix block file, verified and checked to start with `tokens` (and,
    with `expect`, to hold what each layer of the model stores): per layer
    (keys, values, sinks), sinks for q4c only."""
    path = Path(path)
    body = LayerCache(mode).encoding

    def same(meta: dict) -> None:
        if meta.get("fingerprint") != fingerprint or block_mode(meta) != mode:
            raise CacheFileError(f"{path.name}: prefix block of another model or KV mode")
        try:
            ok = json.loads(meta["tokens"])[: len(tokens)] == list(tokens)
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise CacheFileError(f"{path.name}: prefix block does not hold these tokens")

    arrays, meta = read_arrays(path, (BLOCK_FORMAT,), same)
    n = len(formats.block_tokens(meta))
    out = []
    try:
        for i, s in enumerate(json.loads(meta["layers"])):
            s = _span(i, s, n)
            if s.get("runs", [[body, n]]) != [[body, n]] or s["start"] or s["window"] is not None:
                raise ValueError(f"layer {i} is not one {body} run of {n} tokens")
            k = tuple(arrays.pop(tensor_name(i, "k", j)) for j in range(3) if tensor_name(i, "k", j) in arrays)
            v = tuple(arrays.pop(tensor_name(i, "v", j)) for j in range(3) if tensor_name(i, "v", j) in arrays) if s["values"] else None
            _check_run(path, i, body, k, v, n, expect[i] if expect is not None and i < len(expect) else None)
            sinks = _sinks(path, i, s, arrays, [(body, k, v)], mode)
            if (sinks is None) != (body != "q4c"):
                raise ValueError(f"layer {i} sinks do not fit a {mode} block")
            out.append((k, v, sinks))
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CacheFileError(f"{path.name}: prefix block layers inconsistent ({e})") from None
    if arrays or (expect is not None and len(out) != len(expect)):
        raise CacheFileError(f"{path.name}: prefix block has {len(out)} layers or unexpected tensors")
    return out


def _span(i: int, s: object, n_tokens: int) -> dict:
    """A layer's span from the metadata, every number checked (numbers.py)."""
    if not isinstance(s, dict):
        raise ValueError(f"layer {i} span is not an object")
    what = f"layer {i}"
    out = {**s, "start": numbers.count(s["start"], f"{what} start", 0, n_tokens), "offset": numbers.count(s["offset"], f"{what} offset", 0, n_tokens)}
    if s.get("window") is not None:
        out["window"] = numbers.count(s["window"], f"{what} window", 1, MAX_DIM)
    if not isinstance(s.get("values"), bool):
        raise ValueError(f"{what} 'values' is not true or false")
    if s.get("runs") is not None:
        if not isinstance(s["runs"], list) or not all(isinstance(r, list) and len(r) == 2 for r in s["runs"]):
            raise ValueError(f"{what} runs are not [encoding, tokens] pairs")
        out["runs"] = [[e, numbers.count(n, f"{what} run tokens", 0, n_tokens)] for e, n in s["runs"]]
    if s.get("sinks") is not None:
        out["sinks"] = numbers.count(s["sinks"], f"{what} sinks", 1, n_tokens)
    return out


def inline_prefix(arrays: dict[str, np.ndarray], meta: dict, block: dict[str, np.ndarray], n: int) -> tuple[dict, dict]:
    """An agent file's tensors with the first `n` tokens of its prefix block put back in:
    (tensors, metadata) of a self-contained file (a cache card)."""
    spans = json.loads(meta["layers"])
    tensors = dict(arrays)
    for i, s in enumerate(spans):
        runs = s.get("runs")
        if runs is not None and (not runs or runs[0][0] != "q4c"):  # q4c with only a tail after the prefix: the block is run 0
            for r in range(len(runs), 0, -1):
                for part in ("k", "v"):
                    for j in range(3):
                        if tensor_name(i, part, j, r - 1) in tensors:
                            tensors[tensor_name(i, part, j, r)] = tensors.pop(tensor_name(i, part, j, r - 1))
            runs.insert(0, ["q4c", 0])
        for part in ("k", "v"):
            for j in range(3):
                key = tensor_name(i, part, j)
                if key in block:
                    head = _head(block[key], n, block[tensor_name(i, part, 0)].shape[-2])
                    tensors[key] = np.concatenate([head, tensors[key]], axis=-2) if key in tensors else np.ascontiguousarray(head)
        for part in ("k", "v"):
            if sinks_name(i, part) in block:
                tensors[sinks_name(i, part)] = block[sinks_name(i, part)]
                s["sinks"] = int(block[sinks_name(i, part)].shape[-2])
        if runs is not None:
            runs[0][1] += n
        s["start"] = 0
    return tensors, {**meta, "layers": json.dumps(spans), "prefix": "null"}


def _head(x: np.ndarray, n: int, tokens: int) -> np.ndarray:
    """The rows of a stored part holding its first `n` tokens (q4c key scales: one row per group)."""
    return x[..., : n * x.shape[-2] // tokens, :]


def _sinks(path: Path, i: int, span: dict, arrays: dict, runs: list, mode: str) -> tuple | None:
    """A q4c layer's exact sinks: fp16, the heads and dims of its runs, at the start of the context."""
    n = span.get("sinks")
    if n is None:
        return None
    k, v = arrays.pop(sinks_name(i, "k")), arrays.pop(sinks_name(i, "v"))
    enc, rk, rv = runs[0] if runs else (None, None, None)
    want_k = (rk[0].shape[0], int(n), _width(enc, "k", rk)) if runs else None
    want_v = (rv[0].shape[0], int(n), _width(enc, "v", rv)) if runs and rv else None
    if (mode != "q4c" or span["start"] != 0 or not 0 < int(n) <= span["offset"] or tuple(k.shape) != want_k
            or tuple(v.shape) != want_v or {k.dtype, v.dtype} != {mx.float16}):
        raise CacheFileError(f"{path.name}: layer {i} sinks do not fit the layer")
    return k, v


def _restore_layer(path, i, mode, window, span, runs, shared: tuple[Segment, tuple | None] | None, sinks=None) -> LayerCache:
    if shared is None:
        return LayerCache.restore(mode, window, span["start"], span["offset"], (), None, runs=runs, sinks=sinks)
    seg, sinks = shared
    n = sum(k[0].shape[-2] for _, k, _ in runs)
    if window is not None or span["start"] != seg.length or span["start"] + n != span["offset"] or (len(runs) > 1 and mode != "q4c"):
        raise CacheFileError(f"{path.name}: layer {i} does not continue its shared prefix")
    layer = LayerCache(mode, window)
    layer.offset = span["offset"]
    layer.segments = [seg] + [Segment(k, v, k[0].shape[-2], encoding=e) for e, k, v in runs]
    layer.sinks = sinks
    return layer


def _describe(shape: StoredShape) -> str:
    parts = lambda t: "+".join(f"{d} {dt}" for d, dt, _ in t)  # noqa: E731
    return f"{shape.heads} heads x keys ({parts(shape.keys)})" + (f", values ({parts(shape.values)})" if shape.values else ", no values")


def _check_run(path: Path, i: int, encoding: str, k: tuple, v: tuple | None, n: int | None,
               expect: StoredShape | None) -> None:
    """One run of a layer: every part (heads, rows, dim) with one row per token (q4c key
    scales: per KEY_GROUP tokens), the dtypes and group sizes of its encoding, `n` tokens
    when given, what the model stores (`expect`). Finite values were checked as the
    file was read (container.py)."""
    parts = list(k) + list(v or ())
    if not k or any(x.ndim != 3 for x in parts) or len({x.shape[0] for x in parts}) != 1:
        raise CacheFileError(f"{path.name}: layer {i} tensors disagree on shape")
    tokens = k[0].shape[-2]
    for part, t in (("k", k), ("v", v)):
        if t is None:
            continue
        if not _layout_ok(encoding, part, t, tokens):
            raise CacheFileError(f"{path.name}: layer {i} quantization layout mismatch")
    if n is not None and tokens != n:
        raise CacheFileError(f"{path.name}: layer {i} holds {tokens} tokens, its span says {n}")
    if expect is not None:
        got = StoredShape.of(k, v)
        if got != expect:
            raise CacheFileError(f"{path.name}: layer {i} stores {_describe(got)}; this model stores {_describe(expect)}")


def _dim(encoding: str, last: int) -> int:
    """Values per row (the head dim) of a stored tensor whose last dimension is `last`."""
    return last * {"fp16": 1, "q8": 4}.get(encoding, 8)


def _check_heads(path: Path, i: int, encoding: str, k: tuple, v: tuple | None, expect: StoredShape, body: str) -> None:
    """Any run (q4c's q8 tail and fp16 runs too): the model's kv heads and head dims."""
    want = (expect.heads, _dim(body, expect.keys[0][0]), None if expect.values is None else _dim(body, expect.values[0][0]))
    got = (k[0].shape[0], _dim(encoding, k[0].shape[-1]), None if v is None else _dim(encoding, v[0].shape[-1]))
    if got != want or (v is not None and v[0].shape[0] != expect.heads):
        raise CacheFileError(f"{path.name}: layer {i} {encoding} run holds {got[0]} heads of {got[1]}; this model stores {want[0]} heads of {want[1]}")


def _width(encoding: str, part: str, t: tuple) -> int:
    """Values per row of a stored tuple (the head dim)."""
    if encoding == "fp16":
        return t[0].shape[-1]
    return t[0].shape[-1] * (4 if encoding == "q8" else 8)


def _layout_ok(encoding: str, part: str, t: tuple, tokens: int) -> bool:
    """dtypes and shapes of one stored tuple against its encoding (encodings.py)."""
    dt = [str(x.dtype).rsplit(".", 1)[-1] for x in t]  # numpy or MLX arrays
    rows = [x.shape[-2] for x in t]
    if encoding == "fp16":
        return dt == ["float16"] and rows == [tokens]
    if encoding == "q4c" and part == "v":
        return (dt == ["uint32", "float16"] and rows == [tokens, tokens]
                and t[1].shape[-1] * VALUE_GROUP == t[0].shape[-1] * 8)
    if encoding == "q4c":
        return (dt == ["uint32", "float16", "float16"] and t[1].shape == t[2].shape and tokens % KEY_GROUP == 0
                and rows[1] * KEY_GROUP == tokens and t[1].shape[-1] == t[0].shape[-1] * 8)
    bits = 4 if encoding == "q4" else 8
    return (dt == ["uint32", "float16", "float16"] and t[1].shape == t[2].shape and rows == [tokens] * 3
            and t[1].shape[-1] * GROUP_SIZE == t[0].shape[-1] * 32 // bits)
