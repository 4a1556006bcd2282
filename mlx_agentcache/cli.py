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

from . import limits, listing
from .benchreport import BENCHES, METAL_ONLY
from .config import DEFAULT_KV, DEFAULT_MODEL, default_home
from .turnlock import TurnBusyError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
agents_app = typer.Typer(no_args_is_help=True, help="List and manage agent caches.")
app.add_typer(agents_app, name="agents")
card_app = typer.Typer(no_args_is_help=True, help="Hand an agent's context to another as a quantized cache card (no re-prefill).")
app.add_typer(card_app, name="card")

Model = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, gemma3-270m, deepseek-v2-tiny-random, or an MLX model folder.")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where agent caches live [default: $AGENTCACHE_HOME or ~/.agentcache].")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens generated per turn.")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 means greedy.")]
Kv = Annotated[str, typer.Option("--kv", "--kv-bits", help="KV cache: q4c (default: 4-bit, per-channel keys), q4, q4k (Q4 with Hadamard-rotated keys), q8 or fp16; 4, 8, 16 also accepted.")]
Mla = Annotated[str, typer.Option("--mla", help="DeepSeek-V2 only: cache the compressed latent (default) or mlx-lm's full per-head K/V.")]
Budget = Annotated[Optional[str], typer.Option("--cache-budget", help="Memory for hot caches, e.g. 2GiB [default: 40% of available memory].")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
EXIT_NOT_SAVED = 3  # the turn ran, but its history or cache is not on disk (README: Limits and exit codes)


def parse_size(text: str | None, option: str = "--cache-budget") -> int | None:
    """'2GiB', '512MiB', '1e9' -> bytes; limits.LimitError (a ValueError) naming `option` if not a finite positive size."""
    return limits.parse_size(text, option)


def _runtime(model, cache_dir, max_tokens, seed, temperature, kv=DEFAULT_KV, budget=None, mla="latent"):
    from .kvcache import kv_mode
    from .runtime import Runtime

    try:
        kv_mode(kv)  # a bad --kv is a usage error before the model loads
        return Runtime(model=model, cache_dir=cache_dir, kv_bits=kv, mla_mode=mla, max_tokens=max_tokens, temperature=temperature,
                       seed=seed, budget_bytes=parse_size(budget))
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)
    except OSError as e:  # e.g. a cache directory under a read-only parent
        _fail(f"cannot use {e.filename}: {e.strerror}" if e.filename else str(e))


def _save_error(rt, name: str, stats) -> str | None:
    """Why the agent's last turn is not durably on disk (history or cache), once the
    background saves are done; None when both landed."""
    rt.histories.wait(name)
    errors = [rt.histories.errors(name).get(name), rt.pool.flush(name).get(name)]
    if stats is not None and not stats.saved:
        errors.append("its cache could not be saved")
    errors = [re.sub(r"^\[Errno \d+\] ", "", e) for e in errors if e]
    return "; ".join(dict.fromkeys(errors)) or None


def _check_names(names: list[str]) -> None:
    """Agent names are checked before the model loads, like every other value."""
    from .store.layout import validate_agent_name

    for name in names:
        try:
            validate_agent_name(name)
        except ValueError as e:
            _fail(str(e), 2)


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
    model: Model = DEFAULT_MODEL,
    cache_dir: CacheDir = None,
    max_tokens: MaxTokens = 256,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    kv: Kv = DEFAULT_KV,
    mla: Mla = "latent",
    cache_budget: Budget = None,
):
    """Talk to several named agents: '@name text' picks one, /agents, /stats, /handoff A -> B, /quit."""
    _check_names(agent)
    rt = _runtime(model, cache_dir, max_tokens, seed, temperature, kv, cache_budget, mla)
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
            s = rt.pool.summary()
            typer.echo(
                f"pool: {s['hot_bytes'] / 1024:.0f} KiB hot of {(s['budget_bytes'] or 0) / 1024:.0f} KiB | hits hot {s['hits']['hot']} "
                f"warm {s['hits']['warm']} cold {s['hits']['cold']} | written {s['bytes_written'] / 1024:.0f} KiB, "
                f"read {s['bytes_read'] / 1024:.0f} KiB | evictions {s['evictions']} | shared prefix saves {s['shared_prefix_bytes_saved'] / 1024:.0f} KiB"
            )
            continue
        if line == "/stats":
            typer.echo(_stats_line(last) if last else "no turn yet")
            continue
        if line.startswith("/handoff"):
            m = re.fullmatch(r"/handoff\s+(\S+)\s*->\s*(\S+)(?:\s+--bits\s+(\S+))?", line)
            if not m:
                typer.echo("usage: /handoff FROM -> TO [--bits B]")
                continue
            try:
                src, dst = rt.agent(m[1]), agents.get(m[2]) or rt.agent(m[2], system=system)
                card = src.export_card(bits=float(m[3] or 4.0))
                s = dst.inject(card)
            except (ValueError, TurnBusyError, OSError) as e:
                typer.secho(f"error: {e}", fg="red", err=True)
                continue
            agents[m[2]] = dst
            typer.echo(f"handed {card.n} tokens of {m[1]} to {m[2]} at {card.avg_bits:.2f} bits ({s.total_ms:.0f} ms); {m[2]} continues from them")
            continue
        if line.startswith("/"):
            typer.echo("commands: /agents /stats /handoff FROM -> TO [--bits B] /quit; '@name text' to address an agent")
            continue
        if line.startswith("@"):
            name, _, line = line[1:].partition(" ")
            if name not in agents:
                try:
                    agents[name] = rt.agent(name, system=system)
                except ValueError as e:  # a bad name ends this line, not the session
                    typer.secho(f"error: {e}", fg="red", err=True)
                    continue
            current = name
            if not line.strip():
                continue
        a = agents[current]
        try:
            pieces = a.stream(line)
            first = next(pieces, "")
        except (limits.LimitError, TurnBusyError) as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            continue
        typer.echo(f"{current}: {first}", nl=False)
        for piece in pieces:
            typer.echo(piece, nl=False)
        typer.echo("")
        last = a.last_stats


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="What to say.")],
    agent: Annotated[str, typer.Option("--agent", "-a")] = "assistant",
    system: Annotated[Optional[str], typer.Option("--system")] = None,
    model: Model = DEFAULT_MODEL,
    cache_dir: CacheDir = None,
    max_tokens: MaxTokens = 256,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    kv: Kv = DEFAULT_KV,
    mla: Mla = "latent",
    json_out: Json = False,
):
    """One turn for one agent; prints the reply (or JSON with --json)."""
    _check_names([agent])
    rt = _runtime(model, cache_dir, max_tokens, seed, temperature, kv, mla=mla)
    a = _agent(rt, agent, system)
    try:
        if json_out:
            r = a.chat(text)
        else:
            for piece in a.stream(text):
                typer.echo(piece, nl=False)
            typer.echo("")
    except limits.LimitError as e:  # e.g. a prompt longer than the model's context
        _fail(str(e), 2)
    except TurnBusyError as e:  # another process kept this agent in a turn past the wait
        _fail(str(e), 1)
    error = _save_error(rt, agent, a.last_stats)
    if json_out:
        typer.echo(json.dumps({"agent": agent, "reply": r.text, **r.stats.as_dict(), "saved": error is None, "save_error": error}))
    if error:
        _fail(f"the turn of agent '{agent}' was not saved to disk ({error})", EXIT_NOT_SAVED)


@app.command()
def run(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML: agents, system prompts, rounds or a script (see examples/).")],
    model: Model = DEFAULT_MODEL,
    cache_dir: CacheDir = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Most tokens generated per turn, 1 or more [default: the workflow's, else 256].")] = None,
    seed: Seed = 0,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 means greedy [default: the workflow's, else 0].")] = None,
    kv: Kv = DEFAULT_KV,
    mla: Mla = "latent",
    cache_budget: Budget = None,
    reset: Annotated[bool, typer.Option("--reset", help="Start the workflow's agents with empty histories.")] = False,
    json_out: Json = False,
):
    """Run a multi-agent workflow: each turn streams as 'name: text', then TTFT and tier."""
    from . import workflow as wfm

    try:
        wf = wfm.load(workflow)
    except wfm.WorkflowError as e:
        _fail(str(e), 2)
    rt = _runtime(model, cache_dir, max_tokens if max_tokens is not None else wf.max_tokens or 256, seed,
                  temperature if temperature is not None else wf.temperature or 0.0, kv, cache_budget, mla)
    if reset:
        for name in wf.agents:
            _agent(rt, name).reset()

    def start(i, agent, message):
        if not json_out:
            typer.secho(f"{agent}: ", bold=True, nl=False)

    def text(piece):
        if not json_out:
            typer.echo(piece, nl=False)

    def end(r):
        s = r.stats
        if not json_out:
            how = f"{s.tier}, prefetched" if s.prefetched else s.tier
            typer.secho(f"\n  [{r.handoff_from + ' -> ' if r.handoff_from else ''}{r.agent}: {how} | ttft {s.ttft_ms:.0f} ms | load {s.load_ms:.0f} ms | prefilled {s.prefilled_tokens} | "
                        f"generated {s.generated_tokens} ({s.decode_tokens_per_s:.1f} tok/s)]", dim=True)

    try:
        results = wfm.run(rt, wf, max_tokens, start, text, end, temperature)
    except (ValueError, OSError) as e:
        _fail(str(e), 2 if isinstance(e, (limits.LimitError, wfm.WorkflowError)) else 1)
    finally:
        rt.close()
    if json_out:
        typer.echo(json.dumps({"workflow": wf.name, "turns": [{"agent": r.agent, "message": r.message, "reply": r.reply, **r.stats.as_dict(), **({"handoff_from": r.handoff_from} if r.handoff_from else {})} for r in results]}))
    failed = sorted({*rt.histories.errors(), *rt.pool.flush()})
    if failed:
        reasons = "; ".join(_save_error(rt, n, None) or "not saved" for n in failed)
        _fail(f"not saved: {', '.join(failed)} ({reasons}): their last turns are not in their files on disk", EXIT_NOT_SAVED)


@app.command()
def serve(
    model: Model = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback exposes your agents to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    cache_dir: CacheDir = None,
    cache_budget: Budget = None,
    kv: Kv = DEFAULT_KV,
    mla: Mla = "latent",
    api_key: Annotated[list[str], typer.Option("--api-key", envvar="AGENTCACHE_API_KEY", help="Require this key on every route but /health; "
                                               "repeat for several; KEY:PREFIX* limits a key to agents whose names start with PREFIX.")] = [],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens generated when a request does not say.")] = 256,
    seed: Seed = 0,
    temperature: Annotated[float, typer.Option("--temperature", help="Used when a request does not say; 0 means greedy.")] = 0.0,
    rate_limit: Annotated[Optional[float], typer.Option("--rate-limit", help="Requests per minute for the whole server (429 beyond).")] = None,
    agent_rate_limit: Annotated[Optional[float], typer.Option("--agent-rate-limit", help="Requests per minute per agent (429 beyond).")] = None,
    alias: Annotated[list[str], typer.Option("--model-alias", help="Another model name to answer to (e.g. what a client insists on sending); repeat for several.")] = [],
    max_body: Annotated[str, typer.Option("--max-body", help="Largest JSON request body.")] = "8MiB",
    anon_agents: Annotated[int, typer.Option("--anon-agents", help="Anonymous conversations (no agent id) kept at most.")] = 64,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Connections open at once; beyond: 503 and closed.")] = 512,
    header_timeout: Annotated[float, typer.Option("--header-timeout", help="Seconds a client has to send a request's headers.")] = 10.0,
    compact_tools: Annotated[bool, typer.Option("--compact-tools", help="Models without a tool template: each tool as one signature line, not its "
                                                "whole JSON Schema (Claude Code's 24 tools fit SmolLM2's context).")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
):
    """OpenAI- and Anthropic-compatible HTTP server; each agent keeps its cache (see docs/server.md)."""
    from .kvcache import kv_mode
    from .server import ServerConfig, serve as run_server
    from .server.state import parse_keys

    try:
        kv_mode(kv)
        limits.options(max_tokens, temperature, seed)
        for name, v in (("--rate-limit", rate_limit), ("--agent-rate-limit", agent_rate_limit)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be a positive number of requests per minute")
        if anon_agents < 1:
            raise ValueError("--anon-agents must be at least 1")
        parse_keys([k for k in api_key if k])
        if max_connections < 1:
            raise ValueError("--max-connections must be at least 1")
        if not 0 < header_timeout <= 3600:
            raise ValueError("--header-timeout must be a number of seconds above 0, at most 3600")
        config = ServerConfig(model=model, cache_dir=cache_dir, budget_bytes=parse_size(cache_budget), kv=kv, mla=mla, api_key=[k for k in api_key if k] or None,
                              temperature=temperature, seed=seed, default_max_tokens=max_tokens, max_body_bytes=parse_size(max_body, "--max-body"),
                              agent_rpm=agent_rate_limit, global_rpm=rate_limit, aliases=list(alias), anon_agents=anon_agents,
                              host=host, max_connections=max_connections, header_timeout=header_timeout,
                              compact_tools=compact_tools)
    except ValueError as e:
        _fail(str(e), 2)
    run_server(config, host, port, log_level)


def _cache_dir(cache_dir: Path | None) -> Path:
    from .config import default_home

    return Path(cache_dir).expanduser() if cache_dir else default_home()


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        typer.secho(f"{question} Not confirmed (no terminal); pass --yes to go ahead.", err=True)
        return False
    return typer.confirm(question, default=False)


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code)


@agents_app.command("ls")
def agents_ls(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Mark caches made by this installed model.")] = None,
    cache_dir: CacheDir = None,
    json_out: Json = False,
):
    """Agents on disk: tier (warm: cache file, cold: history only), tokens, size, model, last use."""
    listing.agents_ls(model, cache_dir, json_out)  # answered there, without this framework, when the options allow


@agents_app.command("show")
def agents_show(
    name: Annotated[str, typer.Argument(help="Agent name.")],
    cache_dir: CacheDir = None,
    json_out: Json = False,
):
    """One agent in detail; every checksum is verified."""
    from . import catalog

    d = _cache_dir(cache_dir)
    if name not in catalog.names(d):
        _fail(f"no agent '{name}' in {d}")
    info = catalog.describe(d, name, verify=True)
    if json_out:
        typer.echo(json.dumps(info))
        return
    for k, v in info.items():
        typer.echo(f"{k:<14} {listing.kib(v) if k in ('bytes', 'shared_bytes') else v}")
    if info.get("error"):
        raise typer.Exit(1)


@agents_app.command("rm")
def agents_rm(
    names: Annotated[list[str], typer.Argument(help="Agent names.")],
    cache_dir: CacheDir = None,
    keep_history: Annotated[bool, typer.Option("--keep-history", help="Remove only the cache; the next turn re-prefills.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
):
    """Remove agents' caches and histories."""
    from . import catalog

    d = _cache_dir(cache_dir)
    missing = [n for n in names if n not in catalog.names(d)]
    if missing:
        _fail(f"no agent {', '.join(repr(n) for n in missing)} in {d}")
    what = "cache" if keep_history else "cache and history"
    if not _confirm(f"Remove the {what} of {', '.join(names)}?", yes):
        raise typer.Exit(1)
    for n in names:
        try:
            for p in catalog.remove(d, n, history=not keep_history):
                typer.echo(f"removed {p}")
        except OSError as e:  # a read-only directory, a lock held past its wait
            _fail(f"could not remove agent '{n}' from {d}: {e.strerror or e}")


@agents_app.command("export")
def agents_export(
    name: Annotated[str, typer.Argument(help="Agent name.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Archive file [default: NAME.archive.safetensors].")] = None,
    cache_dir: CacheDir = None,
):
    """Write an agent archive: one checked file with the agent's whole cache (shared blocks inlined) and history."""
    from . import catalog
    from .store.container import CacheFileError, CacheWriteError

    try:
        path = catalog.export_archive(_cache_dir(cache_dir), name, out or Path(name + catalog.ARCHIVE_SUFFIX))
    except (FileNotFoundError, ValueError, CacheFileError, CacheWriteError) as e:
        _fail(str(e))
    typer.echo(f"exported '{name}' to {path} ({listing.kib(path.stat().st_size)})")


@agents_app.command("import")
def agents_import(
    archive: Annotated[Path, typer.Argument(help="An agent archive written by `agents export`.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Import under this name [default: the archive's].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing agent of that name.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Also check the archive against this model (loads it): "
                                                 "its fingerprint, KV mode and every layer's shapes.")] = None,
    kv: Annotated[str, typer.Option("--kv", help="With --model: the KV mode the archive must be in.")] = DEFAULT_KV,
    cache_dir: CacheDir = None,
):
    """Install an agent archive as an agent, after checking every byte of it (and, with --model, that it is that model's)."""
    from . import catalog
    from .store.container import CacheFileError, CacheWriteError

    if name is not None and not name:
        _fail("--name must not be empty (leave it out to use the archive's name)", 2)
    expect = None
    if model is not None:
        from .models.runner import ModelRunner

        try:
            runner = ModelRunner.load(model, default_home(), kv_bits=kv)
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e), 2)
        expect = (runner.fingerprint, runner.new_cache().layers)
    try:
        got = catalog.import_archive(_cache_dir(cache_dir), archive, name, force, model=expect)
    except (FileNotFoundError, FileExistsError, ValueError, CacheFileError) as e:
        _fail(str(e))
    except OSError as e:  # CacheWriteError included: a read-only or full directory; nothing is left half-imported
        msg = re.sub(r"^\[Errno \d+\] ", "", str(e)) if isinstance(e, CacheWriteError) else f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        _fail(f"could not import {archive} into {_cache_dir(cache_dir)}: {msg}")
    typer.echo(f"imported {archive} as agent '{got}'")


@agents_app.command("gc")
def agents_gc(
    cache_dir: CacheDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
):
    """Remove caches of models that are not installed, older formats, unused shared
    blocks, damaged files set aside and leftovers of interrupted saves. Histories stay."""
    from . import catalog
    from .config import default_home

    d = _cache_dir(cache_dir)
    known = catalog.installed_fingerprints(default_home()) | catalog.installed_fingerprints(d)
    if not known:
        typer.echo("no installed models found: caches are kept whatever model made them")
    plan = catalog.gc_plan(d, known)
    if not plan:
        typer.echo("nothing to remove")
        return
    for p, why in plan:
        typer.echo(f"{listing.kib(p.stat().st_size):>12}  {p.relative_to(d)}  ({why})")
    if dry_run or not _confirm(f"Remove these {len(plan)} files?", yes):
        raise typer.Exit(0 if dry_run else 1)
    typer.echo(f"freed {listing.kib(catalog.gc_apply(d, plan))}")


@app.command()
def doctor(json_out: Json = False):
    """The CPU and its features, the BLAS chosen and why (with a measured GFLOP/s), MLX device and kernels."""
    from . import blas
    import mlx.core as mx

    import mlx_lm

    choice = blas.CHOICE
    cpu = choice.cpu or blas.read_cpuinfo()
    info = {
        "cpu": cpu.model,
        "arch": cpu.arch,
        "cpu_features": cpu.features(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "blas": choice.summary(),
        "blas_reason": choice.reason,
        "blas_library": choice.library,
        "sgemm_gflops_1024": round(blas.measure_gflops(), 1),
        "q4_kernels": "metal" if mx.metal.is_available() else "portable (mx.quantize)",
    }
    if json_out:
        typer.echo(json.dumps(info))
        return
    for k, v in info.items():
        if k == "cpu_features":
            v = " ".join(f"{name}={'yes' if on else 'no'}" for name, on in v.items())
        typer.echo(f"{k:<17} {v}")


@app.command()
def bench(
    which: Annotated[str, typer.Argument(help=f"all, or comma separated names: {', '.join(BENCHES)}; {', '.join(METAL_ONLY)} (Apple GPU only, "
                                         "never in all). docs/bench.md says what each measures and how long a full run takes.")] = "all",
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: checks that everything runs (minutes), numbers not comparable.")] = False,
    models: Annotated[Optional[str], typer.Option("--models", help="Comma separated models for the benchmarks that take them.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where the JSON, plots and REPORT.md go [bench_results; with --quick, "
                                                 "bench_quick, so that a smoke run never replaces the results].")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rewrite REPORT.md and the plots from the JSON in --out.")] = False,
    readme: Annotated[Optional[Path], typer.Option("--readme", help="Also regenerate this README's performance section from --out.")] = None,
):
    """Run the benchmarks (scripts/ of a source checkout), record the machine, write REPORT.md with plots."""
    from . import benchreport

    out = (out or Path("bench_quick" if quick and not report_only else "bench_results")).resolve()  # the scripts run in the checkout
    names = list(benchreport.BENCHES) if which == "all" else [n.strip() for n in which.split(",") if n.strip()]
    unknown = [n for n in names if n not in benchreport.SPECS]
    if unknown or not names:
        _fail(f"unknown benchmark {', '.join(unknown) or repr(which)}; choose all or from {', '.join(benchreport.SPECS)}", 2)
    if not report_only and set(names) & set(benchreport.METAL_ONLY):
        import mlx.core as mx

        if not mx.metal.is_available():
            _fail("metal measures the Metal kernels on an Apple GPU; mx.metal.is_available() is False on this machine, so nothing was run", 2)
    failed = []
    if not report_only:
        try:
            benchreport.checkout_root()
        except benchreport.NotACheckout as e:
            _fail(str(e), 2)
        out.mkdir(parents=True, exist_ok=True)
        from .config import default_home

        typer.echo("recording the machine (CPU, memory, MLX, BLAS, peers, disk read bandwidth)...")
        info = benchreport.machine(default_home(), (64 if quick else 256) << 20)
        (out / benchreport.MACHINE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        runs = benchreport.run(names, out, quick, models.split(",") if models else None, typer.echo)
        failed = [n for n in names if runs.get(n, {}).get("rc") not in (0, None)]
    elif not out.is_dir():
        _fail(f"{out} is not a directory of benchmark results", 2)
    typer.echo(f"wrote {benchreport.report(out)}")
    if readme is not None:
        benchreport.update_readme(readme, out)
        typer.echo(f"updated the performance section of {readme}")
    if failed:
        _fail(f"failed: {', '.join(failed)} (logs in {out / 'logs'})")


eval_app = typer.Typer(no_args_is_help=True, help="Measure what a quantized KV cache costs in quality.")
app.add_typer(eval_app, name="eval")


@eval_app.command("ppl")
def eval_ppl(
    file: Annotated[Path, typer.Argument(help="UTF-8 text to score.", exists=True, dir_okay=False)],
    model: Model = DEFAULT_MODEL,
    kv: Annotated[str, typer.Option("--kv", help="KV cache: q4c (default), fp16, q8, q4, or q4k.")] = DEFAULT_KV,
    context: Annotated[int, typer.Option("--context", help="Window length in tokens; each window starts from an empty cache, with BOS where the model's prompts have one.")] = 2048,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N tokens of FILE.")] = None,
    json_out: Json = False,
):
    """Perplexity of FILE with the KV cache in mode --kv (later tokens attend to quantized earlier ones)."""
    from . import quality
    from .kvcache import KV_MODES
    from .models.runner import ModelRunner
    from .config import default_home

    if kv not in KV_MODES:
        _fail(f"--kv must be one of {', '.join(KV_MODES)}", 2)
    if context < 2:
        _fail("--context must be at least 2", 2)
    if limit is not None and limit < 2:  # a negative slice would silently drop the end of FILE
        _fail(f"--limit must be at least 2, got {limit}", 2)
    try:
        runner = ModelRunner.load(model, default_home(), kv_bits=kv)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    ids = runner.tokenizer.encode(file.read_text(encoding="utf-8"), add_special_tokens=False)[:limit]
    bos = quality.prompt_bos(runner.tokenizer)
    if len(ids) < 2:
        _fail(f"{file} holds fewer than 2 tokens", 2)
    if context <= len(bos):
        _fail(f"--context must be above {len(bos)} (each window starts with BOS)", 2)
    tokens = quality.as_prompts(ids, context, bos)  # every window starts as a prompt does
    try:
        r = {"model": model, "kv": kv, "file": str(file), "bos": bool(bos), **quality.perplexity(runner, tokens, kv, context)}
    except ValueError as e:  # e.g. q4k on a latent (MLA) cache
        _fail(str(e), 2)
    if json_out:
        typer.echo(json.dumps(r))
    else:
        typer.echo(f"ppl {r['ppl']:.4f} | {r['tokens']} tokens scored, context {context}, kv {kv} | {r['seconds']:.1f} s")


if __name__ == "__main__":
    app()


# -- cache cards (cards.py) ----------------------------------------------------------


def _span(text: str):
    """--range: all, last-turn, or a message span I:J."""
    if text in ("all", "last-turn"):
        return text
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m:
        _fail(f"--range must be all, last-turn or I:J (messages I to J-1), got {text!r}", 2)
    return int(m[1]), int(m[2])


@card_app.command("export")
def card_export(
    out: Annotated[Path, typer.Argument(help="The card file to write, e.g. plan.card.")],
    agent: Annotated[str, typer.Option("--agent", "-a", help="The agent whose context is handed over.")],
    bits: Annotated[float, typer.Option("--bits", help="Average bits per stored value, scales included (2.5 at least).")] = 4.0,
    span: Annotated[str, typer.Option("--range", help="all, last-turn, or I:J (messages I to J-1).")] = "all",
    uniform: Annotated[bool, typer.Option("--uniform", help="One width for every token instead of per-token widths.")] = False,
    model: Model = DEFAULT_MODEL,
    cache_dir: CacheDir = None,
    kv: Kv = DEFAULT_KV,
    mla: Mla = "latent",
    json_out: Json = False,
):
    """Write a cache card of an agent's context: per-token 2/3/4/8-bit keys and values under a bit budget."""
    from .store.container import CacheWriteError

    _check_names([agent])
    rng = _span(span)
    rt = _runtime(model, cache_dir, 1, 0, 0.0, kv, mla=mla)
    try:
        card = rt.agent(agent).export_card(out, bits=bits, span=rng, mode="uniform" if uniform else "mixed")
    except (ValueError, TurnBusyError, CacheWriteError) as e:
        _fail(str(e))
    finally:
        rt.close()
    info = card.summary()
    typer.echo(json.dumps(info) if json_out else f"exported {info['tokens']} tokens of '{agent}' to {out} ({listing.kib(info['bytes'])}, {info['avg_bits']:.3f} bits, hop {info['hops']})")


@card_app.command("show")
def card_show(
    card: Annotated[Path, typer.Argument(help="A card written by `card export`.")],
    json_out: Json = False,
):
    """What a card holds: tokens, bytes, average bits, hops, source, model (every checksum verified)."""
    from . import cards
    from .store.container import CacheFileError

    try:
        info = cards.read(card).summary()
    except (FileNotFoundError, ValueError, CacheFileError) as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(info))
        return
    for k in ("source", "model", "created", "tokens", "bytes", "avg_bits", "budget", "hops", "mode", "first_position", "widths", "layers"):
        typer.echo(f"{k:<15} {info[k]}")


@card_app.command("inject")
def card_inject(
    card: Annotated[Path, typer.Argument(help="A card written by `card export`.")],
    agent: Annotated[str, typer.Option("--agent", "-a", help="The receiving agent (created if new).")],
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt of a new receiving agent.")] = None,
    model: Model = DEFAULT_MODEL,
    cache_dir: CacheDir = None,
    kv: Kv = DEFAULT_KV,
    mla: Mla = "latent",
    json_out: Json = False,
):
    """Append a card's context to an agent's: its next turn reuses it (restored_tokens) and prefills only its own message."""
    from .store.container import CacheFileError

    _check_names([agent])
    rt = _runtime(model, cache_dir, 1, 0, 0.0, kv, mla=mla)
    try:
        a = _agent(rt, agent, system)
        s = a.inject(card)
        tokens = len(a.context["tokens"])
        error = _save_error(rt, agent, s)
    except (FileNotFoundError, ValueError, CacheFileError, TurnBusyError) as e:
        _fail(str(e))
    finally:
        rt.close()
    if json_out:
        typer.echo(json.dumps({"agent": agent, "context_tokens": tokens, **s.as_dict(), "saved": error is None, "save_error": error}))
    else:
        typer.echo(f"injected {card} into '{agent}': its context is now {tokens} tokens ({s.total_ms:.0f} ms)")
    if error:
        _fail(f"agent '{agent}' was not saved to disk ({error})", EXIT_NOT_SAVED)
