"""Multi-agent workflows from YAML: named agents, system prompts, turn order.

    name: plan-execute-review
    agents:
      planner: {system: "You split a task into three short numbered steps."}
      executor: {system: "You carry out a plan briefly."}
    rounds: 2                      # round-robin over `order` (default: agents in order)
    start: "Task: {task}"          # first message; later ones default to "{last}"
    vars: {task: "..."}
    max_tokens: 120                # optional; --max-tokens overrides it
    temperature: 0.7               # optional; --temperature overrides it
  or a fixed script instead of rounds:
    script:
      - planner: "Plan this: {task}"
      - executor: "Carry out this plan:\\n{last}"
  a script step can also hand one agent's context to another as a cache card
  (cards.py: no text passed, no re-prefill), optionally with `bits` and `range`:
      - handoff: {from: planner, to: executor, bits: 4, range: last-turn}

In messages (and system prompts, from `vars`), `{last}` is the previous turn's reply, `{last_agent}` who said
it, `{<agent>}` that agent's latest reply, and any name from `vars`; other
braces are left alone. The order is known in advance, so while one agent
speaks the next one's cache is already being read (`Runtime.prefetch`).

A workflow file is untrusted input, checked in full before any model loads:
unknown keys, wrong types and out-of-range values are errors that name the
key; YAML aliases are limited and their expansion bounded (no "billion
laughs"); the file, each text, the number of steps and every rendered
message have size limits (the constants below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from . import limits

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

MAX_FILE_BYTES = 1 << 20  # the YAML file
MAX_ALIASES = 64  # `*alias` uses in one file
MAX_NODES = 100_000  # YAML nodes after alias expansion
MAX_DEPTH = 32  # nesting of YAML collections
MAX_TEXT_CHARS = 1_000_000  # a system prompt, message or var, and a message once rendered
MAX_AGENTS = 256
MAX_ROUNDS = 1000
MAX_STEPS = 10_000  # turns in one run (rounds x order, or script entries)
RESERVED_VARS = ("last", "last_agent")

TOP_KEYS = ("name", "agents", "rounds", "order", "start", "message", "script", "vars", "max_tokens", "temperature")
ROUND_KEYS = ("rounds", "order", "start", "message")
AGENT_KEYS = ("system",)


class WorkflowError(ValueError):
    """A workflow file that cannot be run; the message says why."""


@dataclass
class Step:
    agent: str
    message: str
    handoff: dict | None = None  # {"from", "bits", "range"}: a cache card from that agent to `agent`


@dataclass
class Workflow:
    name: str
    agents: dict[str, str | None]  # name -> system prompt
    steps: list[Step]
    max_tokens: int | None = None
    vars: dict[str, str] = field(default_factory=dict)
    temperature: float | None = None


# -- reading YAML, bounded ---------------------------------------------------
class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses more than MAX_ALIASES aliases while composing."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise WorkflowError(f"more than {MAX_ALIASES} YAML aliases (*name); write the text out instead")
        return super().compose_node(parent, index)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes the document has once every alias is expanded; refuses cycles, deep
    nesting, duplicate keys and more than MAX_NODES nodes, without expanding."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int, path: tuple[int, ...]) -> int:
        if id(node) in path:
            raise WorkflowError("a YAML alias refers to itself (recursive structure)")
        if depth > MAX_DEPTH:
            raise WorkflowError(f"YAML nested deeper than {MAX_DEPTH} levels")
        if id(node) in sizes:
            return sizes[id(node)]
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            seen = set()
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if (k.tag, k.value) in seen:
                        raise WorkflowError(f"key {limits.show(k.value)} appears twice in one mapping")
                    seen.add((k.tag, k.value))
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child, depth + 1, path + (id(node),))
            if total > MAX_NODES:
                raise WorkflowError(f"the YAML expands to more than {MAX_NODES} values (aliases or size); simplify it")
        sizes[id(node)] = total
        return total

    size(root, 0, ())
    return sizes[id(root)]


def read_yaml(text: str) -> object:
    """Parse one YAML document with aliases and expansion bounded (see module doc)."""
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except RecursionError:
        raise WorkflowError(f"YAML nested deeper than {MAX_DEPTH} levels") from None
    except WorkflowError:
        raise
    except yaml.YAMLError as e:
        raise WorkflowError(f"not valid YAML ({_yaml_problem(e)})") from None
    except Exception as e:  # PyYAML's constructors are not hardened: `!!int ''` is an IndexError,
        # 2024-13-45 a ValueError, a 5000-digit int another; any of them is a bad file
        raise WorkflowError(f"not valid YAML ({type(e).__name__}: {_one_line(e)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line 2, column 1: expected ...' from a PyYAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "reason", None)
    if mark is not None and problem:
        return _one_line(f"line {mark.line + 1}, column {mark.column + 1}: {problem}")
    return _one_line(e)


def loads(text: str, default_name: str = "workflow") -> Workflow:
    """Parse and check a workflow given as YAML text."""
    if len(text) > MAX_FILE_BYTES:
        raise WorkflowError(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    return parse(read_yaml(text), default_name)


def load(path: str | Path) -> Workflow:
    """Read, parse and check a workflow file; any problem is a WorkflowError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise WorkflowError(f"larger than {MAX_FILE_BYTES >> 20} MiB")
        return loads(raw.decode("utf-8"), path.stem)
    except WorkflowError as e:
        raise WorkflowError(f"{path}: {e}") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise WorkflowError(f"{path}: cannot read ({e.strerror or e})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


# -- checking the document ---------------------------------------------------
def _text(value: object, key: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise WorkflowError(f"{key} must be a string, got {limits.show(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise WorkflowError(f"{key} is {len(value)} characters; at most {MAX_TEXT_CHARS} are allowed")
    return value


def _unknown(data: dict, allowed: tuple[str, ...], where: str) -> None:
    extra = [k for k in data if k not in allowed]
    if extra:
        raise WorkflowError(f"unknown key {limits.show(extra[0])}{where}; allowed: {', '.join(allowed)}")


def _limit(check: Callable, value: object, key: str):
    try:
        return check(value, key)
    except limits.LimitError as e:
        raise WorkflowError(str(e)) from None


def _agent_name(name: object, key: str) -> str:
    from .store.layout import validate_agent_name

    if not isinstance(name, str):
        raise WorkflowError(f"{key}: agent names must be strings, got {limits.show(name)}")
    try:
        return validate_agent_name(name)
    except ValueError as e:
        raise WorkflowError(f"{key}: {e}") from None


def _vars(data: object) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WorkflowError(f"vars must be a mapping of names to strings, got {limits.show(data)}")
    out = {}
    for k, v in data.items():
        if not isinstance(k, str) or not _VAR_NAME.fullmatch(k):
            raise WorkflowError(f"vars: {limits.show(k)} is not a variable name (letters, digits, '_', '.', '-'; not starting with a digit)")
        if k in RESERVED_VARS:
            raise WorkflowError(f"vars.{k} is reserved: {{{k}}} is filled in by the workflow")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        out[k] = _text(v, f"vars.{k}")
    return out


def _agents(data: object) -> dict[str, str | None]:
    if not isinstance(data, dict) or not data:
        raise WorkflowError("a workflow needs an 'agents' mapping: name -> {system: ...}")
    if len(data) > MAX_AGENTS:
        raise WorkflowError(f"agents: {len(data)} agents; at most {MAX_AGENTS} are allowed")
    agents = {}
    for name, spec in data.items():
        name = _agent_name(name, "agents")
        if isinstance(spec, dict):
            _unknown(spec, AGENT_KEYS, f" under agents.{name}")
            agents[name] = _text(spec.get("system"), f"agents.{name}.system", allow_none=True)
        else:  # `name: "system prompt"` or `name:` with nothing
            agents[name] = _text(spec, f"agents.{name}", allow_none=True)
    return agents


def _declared(agent: object, agents: dict, key: str) -> str:
    name = _agent_name(agent, key)
    if name not in agents:
        raise WorkflowError(f"{key}: agent '{name}' is not declared under 'agents'")
    return name


def _script(data: object, agents: dict) -> list[Step]:
    if not isinstance(data, list) or not data:
        raise WorkflowError(f"script must be a non-empty list of 'agent: message' pairs, got {limits.show(data)}")
    if len(data) > MAX_STEPS:
        raise WorkflowError(f"script has {len(data)} steps; at most {MAX_STEPS} are allowed")
    steps = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or len(item) != 1:
            raise WorkflowError(f"script[{i}] must be one 'agent: message' pair, got {limits.show(item)}")
        ((agent, message),) = item.items()
        if agent == "handoff" and isinstance(message, dict):
            steps.append(_handoff(message, agents, f"script[{i}].handoff"))
            continue
        agent = _declared(agent, agents, f"script[{i}]")
        steps.append(Step(agent, _text(message, f"script[{i}].{agent}")))
    return steps


def _handoff(data: dict, agents: dict, key: str) -> Step:
    _unknown(data, ("from", "to", "bits", "range"), f" in {key}")
    if "from" not in data or "to" not in data:
        raise WorkflowError(f"{key} needs 'from' and 'to' agents")
    src, dst = _declared(data["from"], agents, key + ".from"), _declared(data["to"], agents, key + ".to")
    if src == dst:
        raise WorkflowError(f"{key}: an agent cannot hand its context to itself")
    bits = data.get("bits", 4.0)
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 2.5 <= bits <= 16:
        raise WorkflowError(f"{key}.bits must be a number from 2.5 to 16, got {limits.show(bits)}")
    span = data.get("range", "all")
    if span not in ("all", "last-turn"):
        raise WorkflowError(f"{key}.range must be 'all' or 'last-turn', got {limits.show(span)}")
    return Step(dst, f"[cache card from {src}]", {"from": src, "bits": float(bits), "range": span})


def _rounds(data: dict, agents: dict) -> list[Step]:
    order = data.get("order")
    if order is None:
        order = list(agents)
    elif not isinstance(order, list) or not order:
        raise WorkflowError(f"order must be a non-empty list of agent names, got {limits.show(order)}")
    elif len(order) > MAX_STEPS:
        raise WorkflowError(f"order has {len(order)} entries; at most {MAX_STEPS} are allowed")
    order = [_declared(a, agents, f"order[{i}]") for i, a in enumerate(order)]
    rounds = data.get("rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise WorkflowError(f"rounds must be an integer between 1 and {MAX_ROUNDS}, got {limits.show(rounds)}")
    if rounds * len(order) > MAX_STEPS:
        raise WorkflowError(f"rounds x order is {rounds * len(order)} turns; at most {MAX_STEPS} are allowed")
    start = _text(data.get("start", "{last}"), "start")
    message = _text(data.get("message", "{last}"), "message")
    return [Step(a, start if i == 0 else message) for i, a in enumerate(order * rounds)]


def parse(data: object, default_name: str = "workflow") -> Workflow:
    """Check a parsed YAML document and build the Workflow; WorkflowError names the bad key."""
    if not isinstance(data, dict):
        raise WorkflowError(f"a workflow is a mapping with an 'agents' key, got {limits.show(data)}")
    _unknown(data, TOP_KEYS, "")
    agents = _agents(data.get("agents"))
    if "script" in data:
        mixed = [k for k in ROUND_KEYS if k in data]
        if mixed:
            raise WorkflowError(f"'script' and '{mixed[0]}' cannot be used together: a script fixes every turn")
        steps = _script(data["script"], agents)
    else:
        steps = _rounds(data, agents)
    name = _text(data.get("name", default_name), "name")
    if not name.strip() or len(name) > 200 or "\n" in name:
        raise WorkflowError(f"name must be one line of 1 to 200 characters, got {limits.show(name)}")
    max_tokens = data.get("max_tokens")
    temperature = data.get("temperature")
    wf = Workflow(
        name,
        agents,
        steps,
        None if max_tokens is None else _limit(limits.max_tokens, max_tokens, "max_tokens"),
        _vars(data.get("vars")),
        None if temperature is None else _limit(limits.temperature, temperature, "temperature"),
    )
    for agent, system in wf.agents.items():
        if system is not None:
            render(system, wf.vars, f"agents.{agent}.system")
    for text in {s.message for s in wf.steps if s.handoff is None}:  # replies are filled in later; vars are known now
        render(text, wf.vars, "a message")
    return wf


def render(message: str, values: dict[str, str], what: str = "a message") -> str:
    """Fill `{name}` fields that have a value; leave any other braces as written.
    Refuses (before building it) a result longer than MAX_TEXT_CHARS."""
    size = len(message)
    for m in _FIELD.finditer(message):
        if m.group(1) in values:
            size += len(values[m.group(1)]) - len(m.group(0))
    if size > MAX_TEXT_CHARS:
        raise WorkflowError(f"{what} would be {size} characters once its {{fields}} are filled in; at most {MAX_TEXT_CHARS} are allowed")
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), message)


@dataclass
class TurnResult:
    step: int
    agent: str
    message: str
    reply: str
    stats: object
    handoff_from: str | None = None  # a cache card handed from that agent (no reply)


def run(
    rt,
    wf: Workflow,
    max_tokens: int | None = None,
    on_start: Callable | None = None,
    on_text: Callable | None = None,
    on_end: Callable | None = None,
    temperature: float | None = None,
) -> list[TurnResult]:
    """Run every step in order on `rt`; callbacks let a CLI stream the output.
    `max_tokens` and `temperature` override the workflow's own when given."""
    max_tokens = wf.max_tokens if max_tokens is None else limits.max_tokens(max_tokens)
    temperature = wf.temperature if temperature is None else limits.temperature(temperature)
    for name, system in wf.agents.items():
        rt.agent(name, system=None if system is None else render(system, wf.vars, f"agents.{name}.system"))
    values = dict(wf.vars, last="", last_agent="")
    results = []
    for i, step in enumerate(wf.steps):
        if step.handoff is not None:
            src = step.handoff["from"]
            if on_start:
                on_start(i, f"{src} -> {step.agent}", step.message)
            stats = rt.handoff(src, step.agent, step.handoff["bits"], step.handoff["range"])
            if on_text:
                on_text(step.message)
            results.append(TurnResult(i, step.agent, step.message, "", stats, handoff_from=src))
            if on_end:
                on_end(results[-1])
            continue
        message = render(step.message, values, f"the message of turn {i + 1} ({step.agent})")
        h = rt.submit(step.agent, message, max_tokens=max_tokens, temperature=temperature)
        nxt = wf.steps[i + 1].agent if i + 1 < len(wf.steps) else None
        if nxt is not None and nxt != step.agent:
            rt.prefetch(nxt)  # read it from disk while this agent speaks
        if on_start:
            on_start(i, step.agent, message)
        for piece in h:
            if on_text:
                on_text(piece)
        reply = h.text
        values.update(last=reply, last_agent=step.agent)
        values[step.agent] = reply
        results.append(TurnResult(i, step.agent, message, reply, h.stats))
        if on_end:
            on_end(results[-1])
    return results
