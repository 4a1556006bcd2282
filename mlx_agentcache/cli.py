"""`agentcache`: chat with named agents, script single turns, manage caches.

Option names (`--model`, `--cache-dir`, `--max-tokens`, `--seed`,
`--temperature`, `--json`) and JSON keys are a stable interface for scripts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
agents_app = typer.Typer(no_args_is_help=True, help="List and manage agent caches.")
app.add_typer(agents_app, name="agents")

Model = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, gemma3-270m, deepseek-v2-tiny-random, or an MLX model folder.")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where agent caches live [default: $AGENTCACHE_HOME or ~/.agentcache].")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens generated per turn.")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 means greedy.")]
KvBits = Annotated[int, typer.Option("--kv-bits", help="KV cache precision: 4 (default), 8 or 16.")]
Budget = Annotated[Optional[str], typer.Option("--cache-budget", help="Memory for hot caches, e.g. 2GiB [default: unlimited].")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str | None) -> int | None:
    """'2GiB', '512MB', '1e9' -> bytes."""
    if not text:
        return None
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m:
        raise typer.BadParameter(f"not a size: {text!r} (try 2GiB or 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _runtime(model, cache_dir, max_tokens, seed, temperature, kv_bits=4, budget=None):
    from .runtime import Runtime

    try:
        return Runtime(model=model, cache_dir=cache_dir, kv_bits=kv_bits, max_tokens=max_tokens, temperature=temperature, seed=seed, budget_bytes=parse_size(budget))
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)


def _agent(rt, name, system=None):
    try:
        return rt.agent(name, system=system)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)


def _stats_line(s) -> str:
    return (
        f"[{s.tier}] ttft {s.ttft_ms:.0f} ms | restored {s.restored_tokens} | prefilled {s.prefilled_tokens} | "
        f"generated {s.generated_tokens} ({s.decode_tokens_per_s:.1f} tok/s) | cache {s.cache_tokens} tok, {s.cache_bytes / 1024:.0f} KiB"
    )


@app.command()
def chat(
    agent: Annotated[list[str], typer.Option("--agent", "-a", help="An agent name; repeat for several.")] = ["assistant"],
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for new agents.")] = None,
    model: Model = "smollm2-135m",
    cache_dir: CacheDir = None,
    max_tokens: MaxTokens = 256,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    kv_bits: KvBits = 4,
    cache_budget: Budget = None,
):
    """Talk to several named agents: '@name text' picks one, /agents, /stats, /quit."""
    rt = _runtime(model, cache_dir, max_tokens, seed, temperature, kv_bits, cache_budget)
    agents = {n: _agent(rt, n, system) for n in agent}
    current = agent[0]
    typer.echo(f"agents: {', '.join('@' + n for n in agents)} | model {model} | cache {rt.cache_dir}")
    typer.echo("'@name text' talks to one agent; /agents lists them; /stats shows the last turn; /quit leaves.")
    last = None
    while True:
        try:
            line = input(f"{current}> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/agents":
            for info in rt.agents():
                mark = "*" if info["name"] == current else " "
                typer.echo(f"{mark} {info['name']:<16} {info['tier']:<5} {info['tokens']:>6} tok {info['bytes'] / 1024:>9.1f} KiB")
            continue
        if line == "/stats":
            typer.echo(_stats_line(last) if last else "no turn yet")
            continue
        if line.startswith("/"):
            typer.echo("commands: /agents /stats /quit; '@name text' to address an agent")
            continue
        if line.startswith("@"):
            name, _, line = line[1:].partition(" ")
            if name not in agents:
                agents[name] = _agent(rt, name, system)
            current = name
            if not line.strip():
                continue
        a = agents[current]
        typer.echo(f"{current}: ", nl=False)
        for piece in a.stream(line):
            typer.echo(piece, nl=False)
        typer.echo("")
        last = a.last_stats


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="What to say.")],
    agent: Annotated[str, typer.Option("--agent", "-a")] = "assistant",
    system: Annotated[Optional[str], typer.Option("--system")] = None,
    model: Model = "smollm2-135m",
    cache_dir: CacheDir = None,
    max_tokens: MaxTokens = 256,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    kv_bits: KvBits = 4,
    json_out: Json = False,
):
    """One turn for one agent; prints the reply (or JSON with --json)."""
    rt = _runtime(model, cache_dir, max_tokens, seed, temperature, kv_bits)
    a = _agent(rt, agent, system)
    if json_out:
        r = a.chat(text)
        typer.echo(json.dumps({"agent": agent, "reply": r.text, **r.stats.as_dict()}))
    else:
        for piece in a.stream(text):
            typer.echo(piece, nl=False)
        typer.echo("")


@agents_app.command("ls")
def agents_ls(
    model: Model = "smollm2-135m",
    cache_dir: CacheDir = None,
    json_out: Json = False,
):
    """Agents in the cache directory with tier, tokens and bytes."""
    rt = _runtime(model, cache_dir, 0, 0, 0.0)
    infos = rt.agents()
    if json_out:
        typer.echo(json.dumps(infos))
        return
    for i in infos:
        typer.echo(f"{i['name']:<20} {i['tier']:<5} {i['tokens']:>7} tok {i['bytes'] / 1024:>10.1f} KiB  {i.get('last_used') or ''}")


@app.command()
def doctor(json_out: Json = False):
    """Which BLAS, MLX device and kernels this machine uses."""
    from . import _blas
    import mlx.core as mx

    import mlx_lm

    info = {
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "blas": _blas.STATE["blas"],
        "blas_library": _blas.STATE["detail"],
        "q4_kernels": "metal" if mx.metal.is_available() else "portable (mx.quantize)",
    }
    if json_out:
        typer.echo(json.dumps(info))
    else:
        for k, v in info.items():
            typer.echo(f"{k:<12} {v}")


if __name__ == "__main__":
    app()
