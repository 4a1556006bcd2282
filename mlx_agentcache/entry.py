"""The `agentcache` command's entry. `agents ls` is answered here, before the CLI
framework loads: typer builds pydantic validators for a command's options each time
it runs one, and with numpy that was most of a listing's time (it imports neither).
Every other command, and `agents ls` with an option not spelled here (`--help`), goes
to cli.py, which declares them all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LS_OPTIONS = {"--model": "model", "-m": "model", "--cache-dir": "cache_dir", "--json": "json_out"}


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.1f} MiB"


def agents_ls(model: str | None = None, cache_dir: Path | str | None = None, json_out: bool = False) -> None:
    """Agents on disk: tier (warm: cache file, cold: history only), tokens, size, model, last use."""
    from .config import default_home
    from .store import index  # not catalog: a listing imports no MLX

    d = Path(cache_dir).expanduser() if cache_dir else default_home()
    infos = index.listing(d)
    if model:  # only an installed model: listing never builds one
        from .models.runner import fingerprint

        found = [p for p in (Path(model), default_home() / "models" / model, d / "models" / model) if (p / "config.json").is_file()]
        fp = fingerprint(found[0]) if found else None
        for i in infos:
            i["model_match"] = fp is not None and i.get("fingerprint") == fp
    if json_out:
        print(json.dumps(infos))
        return
    if not infos:
        print(f"no agents in {d}")
        return
    lines = [f"{'NAME':<20} {'TIER':<7} {'TOKENS':>7} {'FILE':>12} {'SHARED':>12}  {'MODEL':<16} LAST USED"]
    lines += [f"{i['name']:<20} {i['tier']:<7} {i['tokens']:>7} {kib(i['bytes']):>12} {kib(i['shared_bytes']):>12}  "
              f"{(i.get('model') or '-')[:16]:<16} {i.get('last_used') or '-'}" for i in infos]
    print("\n".join(lines))


def _ls_options(args: list[str]) -> dict | None:
    """`agents ls` options as agents_ls takes them; None where cli.py must answer."""
    out, it = {}, iter(args)
    for a in it:
        key, eq, value = a.partition("=")
        if key not in LS_OPTIONS or (eq and (key == "--json" or not key.startswith("--"))):
            return None
        if key == "--json":
            out["json_out"] = True
        elif not eq and (value := next(it, None)) is None:
            return None
        else:
            out[LS_OPTIONS[key]] = value
    return out


def main() -> None:
    args = sys.argv[1:]
    if args[:2] == ["agents", "ls"] and (opts := _ls_options(args[2:])) is not None:
        return agents_ls(**opts)
    from .cli import app

    app(prog_name="agentcache")
