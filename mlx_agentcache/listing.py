"""Agent listings, printed without the CLI framework or MLX: `agents ls` is answered from
here by entry.py before typer loads, and by cli.py for the spellings only it parses."""

from __future__ import annotations

import json
from pathlib import Path


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
