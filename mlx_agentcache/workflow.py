"""Multi-agent workflows from YAML: named agents, system prompts, turn order.

    name: plan-execute-review
    agents:
      planner: {system: "You split a task into three short numbered steps."}
      executor: {system: "You carry out a plan briefly."}
    rounds: 2                      # round-robin over `order` (default: agents in order)
    start: "Task: {task}"          # first message; later ones default to "{last}"
    vars: {task: "..."}
  or a fixed script instead of rounds:
    script:
      - planner: "Plan this: {task}"
      - executor: "Carry out this plan:\\n{last}"

In messages (and system prompts, from `vars`), `{last}` is the previous turn's reply, `{last_agent}` who said
it, `{<agent>}` that agent's latest reply, and any name from `vars`; other
braces are left alone. The order is known in advance, so while one agent
speaks the next one's cache is already being read (`Runtime.prefetch`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


class WorkflowError(ValueError):
    """A workflow file that cannot be run; the message says why."""


@dataclass
class Step:
    agent: str
    message: str


@dataclass
class Workflow:
    name: str
    agents: dict[str, str | None]  # name -> system prompt
    steps: list[Step]
    max_tokens: int | None = None
    vars: dict[str, str] = field(default_factory=dict)


def load(path: str | Path) -> Workflow:
    """Parse and check a workflow file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise WorkflowError(f"{path}: cannot read ({e})") from None
    return parse(data, path.stem)


def parse(data: dict, default_name: str = "workflow") -> Workflow:
    if not isinstance(data, dict) or not isinstance(data.get("agents"), dict) or not data["agents"]:
        raise WorkflowError("a workflow needs an 'agents' mapping: name -> {system: ...}")
    agents = {}
    for name, spec in data["agents"].items():
        spec = spec if isinstance(spec, dict) else {"system": spec}
        agents[str(name)] = None if spec.get("system") is None else str(spec["system"])
    if "script" in data:
        steps = []
        for item in data["script"] or []:
            if not isinstance(item, dict) or len(item) != 1:
                raise WorkflowError(f"script steps are one 'agent: message' pair each, got {item!r}")
            (agent, message), = item.items()
            steps.append(Step(str(agent), str(message)))
    else:
        order = [str(a) for a in data.get("order") or agents]
        rounds = int(data.get("rounds", 1))
        start, message = str(data.get("start", "{last}")), str(data.get("message", "{last}"))
        steps = [Step(a, start if i == 0 else message) for i, a in enumerate(order * rounds)]
    unknown = sorted({s.agent for s in steps} - set(agents))
    if unknown:
        raise WorkflowError(f"steps name agents not declared under 'agents': {', '.join(unknown)}")
    if not steps:
        raise WorkflowError("the workflow has no steps")
    max_tokens = data.get("max_tokens")
    return Workflow(str(data.get("name", default_name)), agents, steps, None if max_tokens is None else int(max_tokens), {str(k): str(v) for k, v in (data.get("vars") or {}).items()})


def render(message: str, values: dict[str, str]) -> str:
    """Fill `{name}` fields that have a value; leave any other braces as written."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), message)


@dataclass
class TurnResult:
    step: int
    agent: str
    message: str
    reply: str
    stats: object


def run(rt, wf: Workflow, max_tokens: int | None = None, on_start: Callable | None = None, on_text: Callable | None = None, on_end: Callable | None = None) -> list[TurnResult]:
    """Run every step in order on `rt`; callbacks let a CLI stream the output."""
    for name, system in wf.agents.items():
        rt.agent(name, system=None if system is None else render(system, wf.vars))
    values = dict(wf.vars, last="", last_agent="")
    results = []
    for i, step in enumerate(wf.steps):
        message = render(step.message, values)
        h = rt.submit(step.agent, message, max_tokens=max_tokens or wf.max_tokens)
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
