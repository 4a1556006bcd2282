"""The `agentcache` command's entry. `agents ls` is answered here, before the CLI
framework loads: typer builds pydantic validators for a command's options each time
it runs one, and with numpy that was most of a listing's time (it imports neither).
Every other command, and `agents ls` with an option not spelled here (`--help`), goes
to cli.py, which declares them all.
"""

from __future__ import annotations

import sys

from .listing import agents_ls

LS_OPTIONS = {"--model": "model", "-m": "model", "--cache-dir": "cache_dir", "--json": "json_out"}


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
