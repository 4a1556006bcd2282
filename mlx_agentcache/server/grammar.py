"""Grammar-constrained decoding on llguidance: JSON output that parses and fits
its schema, and tool calls that name a given tool with valid arguments.

llguidance (MIT, one 3 MB abi3 wheel with no dependencies, the engine behind
llama.cpp's, vLLM's and SGLang's structured output) computes the set of
tokens that keep the output inside the grammar in tens of microseconds per
step; the scheduler applies it to that agent's logits only, so the other
rows of a batched decode step are untouched (docs/server.md, "Structured
output"). xgrammar needs torch (gigabytes) and outlines-core has no Lark
grammars, so llguidance it is.

A schema llguidance cannot compile is a 400 naming the deepest part of the
schema that fails on its own, as a JSON pointer.
"""

from __future__ import annotations

import copy
import json
import threading

import numpy as np

from .errors import APIError
from .tools import compact

# No free whitespace between JSON tokens: a small model given the choice may
# emit newlines until max_tokens runs out.
COMPACT = {"whitespace_flexible": False}
_TOKENIZERS: dict[int, object] = {}
_LOCK = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency; kept for a clear message
        raise APIError(501, "structured output needs the llguidance package (pip install llguidance)") from None
    return llguidance


def tokenizer(runner):
    """llguidance's view of the model's tokenizer, built once per model (seconds for a 262K vocabulary)."""
    llg = _llg()
    with _LOCK:
        tok = _TOKENIZERS.get(id(runner))
        if tok is None:
            hf = runner.tokenizer._tokenizer  # mlx-lm's wrapper around a fast Hugging Face tokenizer
            backend = hf.backend_tokenizer
            backend.no_padding()
            backend.no_truncation()
            n_vocab = max(int(runner.config.get("vocab_size") or 0), backend.get_vocab_size(with_added_tokens=True))
            tok = _TOKENIZERS[id(runner)] = llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=sorted(runner.eos_ids))
        return tok


def closed(schema):
    """The schema with `additionalProperties: false` wherever an object lists its
    properties and says nothing of others (OpenAI's strict mode asks for it; a
    small model otherwise invents keys until max_tokens)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("const", "enum", "default", "examples") else closed(v)) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema, where: str) -> str:
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}: the schema must be a JSON object", param=where)
    llg = _llg()
    grammar = llg.LLMatcher.grammar_from_json_schema(closed(schema), defaults=COMPACT)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        path = _failing_path(llg, schema, "")
        raise APIError(400, f"{where}: the schema does not compile at '{path or '/'}': {error}", param=where, code="invalid_schema")
    return grammar


def _failing_path(llg, schema, path: str) -> str:
    """The deepest subschema (JSON pointer) that does not compile on its own."""
    children = []
    if isinstance(schema, dict):
        for key in ("properties", "patternProperties", "$defs", "definitions"):
            if isinstance(schema.get(key), dict):
                children += [(f"{path}/{key}/{k}", v) for k, v in schema[key].items()]
        for key in ("items", "additionalProperties", "not", "contains"):
            if isinstance(schema.get(key), dict):
                children.append((f"{path}/{key}", schema[key]))
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if isinstance(schema.get(key), list):
                children += [(f"{path}/{key}/{i}", v) for i, v in enumerate(schema[key])]
    for child_path, child in children:
        if isinstance(child, dict) and "$ref" not in json.dumps(child) and llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema(child)):
            return _failing_path(llg, child, child_path)
    return path


def tool_call_grammar(tools: list[dict]) -> str:
    """Exactly one `<tool_call>{"name": N, "arguments": ...}</tool_call>` of one of `tools`."""
    options = []
    for t in tools:
        f = t["function"]
        params = closed(f.get("parameters") or {"type": "object"})
        json_schema_grammar(params, f"tools[{f['name']}].parameters")
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema["x-guidance"] = COMPACT
    return f'start: "<tool_call>" call "</tool_call>"\ncall: %json {compact(schema)}\n'


def response_format_grammar(rf) -> str | None:
    """OpenAI's response_format as a grammar (None for plain text)."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "response_format must be {type: text}, {type: json_object} or {type: json_schema, json_schema: {name, schema}}",
                       param="response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError(400, "response_format.json_schema must be an object {name, schema, strict}", param="response_format")
    return json_schema_grammar(spec.get("schema") or {"type": "object"}, "response_format.json_schema.schema")


class Constraint:
    """One turn's grammar state: which tokens may come next, advanced per token
    on the engine thread (scheduler.Turn.constraint)."""

    def __init__(self, runner, grammar: str):
        llg = _llg()
        self.tok = tokenizer(runner)
        self.matcher = llg.LLMatcher(self.tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise APIError(400, f"the grammar does not compile: {self.matcher.get_error()}")
        self.n_vocab = self.tok.vocab_size
        self.bitmask = np.zeros((1, (self.n_vocab + 31) // 32), dtype=np.int32)
        from llguidance.numpy import fill_next_token_bitmask

        self._fill = fill_next_token_bitmask

    def allowed(self, size: int) -> np.ndarray:
        """A boolean mask over `size` logits: True where the token keeps the output in the grammar."""
        self._fill(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:size].astype(bool)
        if bits.size < size:
            bits = np.concatenate([bits, np.zeros(size - bits.size, dtype=bool)])
        return bits

    def fork(self) -> "Constraint":
        """The same grammar state for another choice of the same prompt (`n` > 1)."""
        other = copy.copy(self)
        other.matcher = self.matcher.deep_copy()
        other.bitmask = self.bitmask.copy()
        return other

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: only an end of turn may follow."""
        return self.matcher.is_stopped()
